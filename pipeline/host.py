"""A warm stage host: DVC stage commands that skip the seconds of imports every fresh Python pays.

`python -m pipeline.host pipeline.stages.train --variant d2l ...` is the client. It imports only the
standard library, connects to a per-user host over a unix socket (starting one, detached, when none
answers) and hands it the module, arguments, cwd, environment, sys.path and its stdin/stdout/stderr.
The host has imported torch, MLflow and matplotlib once; per request it forks a child that becomes
the stage (`runpy`, as `python -m` would run it) and reports the child's pid, then its exit status.
Our own packages are never imported by the host: the child imports them fresh from the client's cwd.

If no host can be reached, the client runs the module in-process, so results never depend on the host.
`D2L_STAGE_HOST=0` always runs in-process. See docs/speed-loop.md for what it saves and its limits.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import sys
import time

SWITCH = "D2L_STAGE_HOST"  # "0": never use a host
DIR_VARIABLE = "D2L_STAGE_HOST_DIR"  # where sockets and logs live (default: per-user, mode 0700)
IDLE_VARIABLE = "D2L_STAGE_HOST_IDLE_S"  # a host without clients this long exits (default 600 s:
#   the "look" between two runs of the loop takes minutes, and a cold host costs more than a cold stage)
PRELOAD_VARIABLE = "D2L_STAGE_HOST_PRELOAD"  # comma-separated modules the host imports (default PRELOAD)
WAIT_VARIABLE = "D2L_STAGE_HOST_WAIT_S"  # how long a client waits for a host it started
# What our stages import, and what MLflow's log_model imports in the train stage (torch.export, pyfunc).
PRELOAD = (
    "torch",
    "torch.nn.functional",
    "torch._dynamo",
    "torch.export",
    "torch._export.serde.serialize",
    "torch._functorch.partitioners",
    "networkx",
    "numpy",
    "yaml",
    "pydantic",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.pytorch",
    "mlflow.models",
    "mlflow.pyfunc",
    "matplotlib",
    "matplotlib.pyplot",
)
OUR_PACKAGES = ("pipeline", "lessons", "benchmarks")  # may change between stages: always imported fresh
# Read when a library is imported (torch's thread count, hash seed, backends), so a host serves only
# clients whose values match: they are part of the socket's name.
IMPORT_TIME_PREFIXES = (
    "PYTHON",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "GOMP_",
    "TORCH",
    "PYTORCH",
    "CUDA",
    "MPL",
    "LD_",
    "MLFLOW_",
    "D2L_STAGE_HOST_",
)
READ_AT_USE = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "D2L_STAGE_HOST_WAIT_S",
)


# ---- client (standard library only: it runs before every stage) ----


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--serve":
        return serve(argv[1])
    if not argv or argv[0].startswith("-"):
        print("usage: python -m pipeline.host MODULE [ARG ...]", file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    if os.environ.get(SWITCH, "1") != "0":
        try:
            base = host_base()
        except OSError as error:
            note(f"no stage host ({error}); running in-process")
        else:
            connection = connect(base)
            if connection is not None:
                status = run_on_host(connection, module, args)
                if status is not None:
                    return status
    return run_in_process(module, args)


def note(message: str) -> None:
    print(f"stage host: {message}", file=sys.stderr, flush=True)


def host_base() -> str:
    """Path prefix of this interpreter's host: <private dir>/<key> (+ .sock, .log, .lock)."""
    default = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", f"d2l-stage-host-{os.getuid()}")
    directory = os.environ.get(DIR_VARIABLE) or default
    os.makedirs(directory, mode=0o700, exist_ok=True)
    status = os.stat(directory)
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise OSError(f"{directory} is not private to this user (mode {status.st_mode & 0o777:o})")
    return os.path.join(directory, host_key())


def host_key() -> str:
    """A new venv, a changed package set, this file changed, or other import-time settings: a new host."""
    import site

    digest = hashlib.sha256(sys.executable.encode())
    for directory in site.getsitepackages():
        if os.path.isdir(directory):
            digest.update(f"{directory}:{os.stat(directory).st_mtime_ns}".encode())
    with open(__file__, "rb") as source:
        digest.update(source.read())
    settings = sorted(
        (name, value)
        for name, value in os.environ.items()
        if name.startswith(IMPORT_TIME_PREFIXES) and name not in READ_AT_USE
    )
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()[:16]


def connect(base: str) -> socket.socket | None:
    """A connection to the host, starting it when none answers; None if it cannot be reached in time."""
    connection = try_connect(base + ".sock")
    if connection is not None:
        return connection
    host = start_host(base)
    deadline = time.monotonic() + float(os.environ.get(WAIT_VARIABLE, "60"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
        connection = try_connect(base + ".sock")
        if connection is not None:
            return connection
        if host.poll() is not None and host.returncode != 0:
            break
    note(f"host did not answer (log: {base}.log); running in-process")
    return None


def try_connect(path: str) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:  # no file yet, or a stale one nobody listens on
        connection.close()
        return None
    return connection


def start_host(base: str):
    """The host, detached: its own session (no terminal signals), output to a log, no inherited fds."""
    import subprocess

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(base + ".log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.host", "--serve", base],
            cwd=package_root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


# The client's resource limits the stage runs under, as it would in-process.
CLIENT_LIMITS = ("RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_CPU")


def run_on_host(connection: socket.socket, module: str, args: list[str]) -> int | None:
    """Run the module in a child of the host; its exit status, or None if the host dropped the request."""
    umask = os.umask(0o22)
    os.umask(umask)
    request = {
        "module": module,
        "argv": [module, *args],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "path": sys.path,
        "umask": umask,
        "limits": {name: resource.getrlimit(getattr(resource, name)) for name in CLIENT_LIMITS},
    }
    payload = json.dumps(request).encode()
    replies = connection.makefile("rb")
    try:
        socket.send_fds(connection, [len(payload).to_bytes(8, "big")], [standard_fd(fd) for fd in (0, 1, 2)])
        connection.sendall(payload)
        started = replies.readline()
    except OSError:  # e.g. a host that was just exiting, idle, with our connection in its backlog
        started = b""
    if not started:
        note("host closed the connection before starting the stage; running in-process")
        return None
    child = json.loads(started)["pid"]
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: forward(child, signum))  # the stage decides what to do
    finished = replies.readline()
    if not finished:
        note(f"host died while stage pid {child} ran")
        return 1
    code = json.loads(finished)["status"]
    return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it


def forward(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass  # it has just exited; its status is on its way


def standard_fd(fd: int) -> int:
    """fd itself, or /dev/null where the client was started with it closed."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def run_in_process(module: str, args: list[str]) -> int:
    import runpy

    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


# ---- host ----


def serve(base: str) -> int:
    """Import the heavy libraries once, then fork a child per request until idle for IDLE seconds."""
    import fcntl
    import gc

    lock = open(base + ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another host for this key is starting or running
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # who holds it: `kill $(cat <dir>/<key>.lock)` stops the host
    lock.flush()
    for name in [name for name in sys.modules if name.split(".")[0] in OUR_PACKAGES]:
        del sys.modules[name]  # `pipeline` came in with `-m pipeline.host`; children import it fresh
    preload()
    gc.freeze()  # the preloaded objects: children's collections skip them instead of copying their pages
    path = base + ".sock"
    if os.path.exists(path):
        os.unlink(path)  # we hold the lock: whoever made it is gone
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    owner = os.getpid()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log(f"serving on {path}")
    try:
        Host(listener, lock).loop(float(os.environ.get(IDLE_VARIABLE, "600")))
    finally:
        if os.getpid() == owner:  # (a child never gets here: it leaves by os._exit)
            listener.close()
            if os.path.exists(path):
                os.unlink(path)
            log("exiting")
    return 0


def preload() -> None:
    """Import, never run: no torch thread pool, no CUDA, no database connection before a fork."""
    import importlib

    started = time.perf_counter()
    names = os.environ.get(PRELOAD_VARIABLE)
    for name in PRELOAD if names is None else [name for name in names.split(",") if name]:
        if name == "matplotlib.pyplot":
            import matplotlib

            matplotlib.use("Agg")  # what our stages use; a display backend would connect to a display
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a missing library only costs its import later
            log(f"cannot preload {name}: {error}")
    log(f"preloaded {len(sys.modules)} modules in {time.perf_counter() - started:.1f} s")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {message}", flush=True)


class Host:
    """One selector loop, no threads: accept requests, fork children, watch clients and children."""

    def __init__(self, listener: socket.socket, lock) -> None:
        import selectors

        self.listener, self.lock = listener, lock
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, ("accept", 0))
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (client connection, pidfd)

    def loop(self, idle_s: float) -> None:
        idle_since = time.monotonic()
        while self.children or time.monotonic() - idle_since < idle_s:
            for key, _ in self.selector.select(timeout=1.0):
                kind, pid = key.data
                if kind == "accept":
                    self.accept()
                elif kind == "client":
                    self.client_closed(pid)
                else:
                    self.reap(pid)
            if self.children:
                idle_since = time.monotonic()

    def accept(self) -> None:
        import selectors

        connection, _ = self.listener.accept()
        try:
            same_user(connection)
            request, fds = read_request(connection)
        except (OSError, ValueError) as error:
            log(f"bad request: {error}")
            connection.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.close_in_child(connection)
            become_stage(request, fds)  # never returns
        for fd in fds:
            os.close(fd)  # else a pipe DVC reads from would stay open in the host
        try:
            os.setpgid(pid, pid)  # also in the child: killpg(pid) must work whichever runs first
        except OSError:
            pass  # the child has already done it, or has already exec'd or exited
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (connection, pidfd)
        self.selector.register(connection, selectors.EVENT_READ, ("client", pid))
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        log(f"pid {pid}: {request['module']} in {request['cwd']}")
        send(connection, {"pid": pid})

    def client_closed(self, pid: int) -> None:
        """The client sends nothing after its request: readable means it is gone (killed, perhaps)."""
        connection, _ = self.children[pid]
        self.selector.unregister(connection)
        log(f"pid {pid}: client gone, killing the stage")
        try:
            os.killpg(pid, signal.SIGKILL)  # the child leads its own group: its subprocesses go too
        except ProcessLookupError:
            pass

    def reap(self, pid: int) -> None:
        connection, pidfd = self.children.pop(pid)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        log(f"pid {pid}: exit {code}")
        send(connection, {"status": code})
        try:
            self.selector.unregister(connection)
        except KeyError:
            pass  # already unregistered when the client went away
        connection.close()

    def close_in_child(self, own: socket.socket) -> None:
        """Nothing of the host's stays open in a stage: not its lock, socket, selector or other clients."""
        for connection, pidfd in self.children.values():
            connection.close()
            os.close(pidfd)
        self.selector.close()
        self.listener.close()
        self.lock.close()
        own.close()


def same_user(connection: socket.socket) -> None:
    """The directory is private already; the peer's credentials say so again."""
    import struct

    _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.getuid():
        raise ValueError(f"client of uid {uid}, host of uid {os.getuid()}")


def read_request(connection: socket.socket) -> tuple[dict, list[int]]:
    """The 8-byte length with the client's fds 0, 1, 2 attached, then the JSON request."""
    connection.settimeout(10)  # a client sends it all at once; a stuck one must not stall the others
    header, fds, _, _ = socket.recv_fds(connection, 8, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    header += receive_exactly(connection, 8 - len(header))
    payload = receive_exactly(connection, int.from_bytes(header, "big"))
    connection.settimeout(None)
    return json.loads(payload), fds


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = connection.recv(min(size, 1 << 20))
        if not chunk:
            raise ValueError("client closed the connection mid-request")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def send(connection: socket.socket, message: dict) -> None:
    try:
        connection.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the client is gone; nobody is left to tell


# ---- the child: from a forked host to what `python -m module` would have been ----


def become_stage(request: dict, fds: list[int]) -> None:
    """Take the client's fds, cwd, environment, sys.path and argv, run the module as __main__, exit."""
    import runpy

    os.setpgid(0, 0)
    die_with_host()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    take_standard_streams(fds)
    os.chdir(request["cwd"])
    os.umask(request["umask"])  # the modes of the files the stage writes
    for name, (soft, hard) in request.get("limits", {}).items():  # e.g. a file-size cap stands for a full disk
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError):
            pass  # a limit above the host's own hard limit cannot be raised: the stage keeps the host's
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv, sys.path[:] = list(request["argv"]), request["path"]
    forget_our_modules()
    reseed_libraries()
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit_code(exit.code)
    except BaseException:  # noqa: BLE001 - the stage's own error: its traceback, as the interpreter prints it
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    exit_stage(code)


def exit_code(code: object) -> int:
    """What the interpreter makes of SystemExit(code)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def exit_stage(code: int) -> None:
    """Exit as the interpreter would (threads joined, atexit run, streams flushed), but skip tearing
    down the thousands of preloaded modules: that writes to every page shared with the host, which
    copies them all and took 2.7 s per stage here."""
    import atexit
    import threading

    threading._shutdown()  # what Py_FinalizeEx does first: join non-daemon threads (MLflow's async logging)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt: die of SIGINT, as python does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def die_with_host() -> None:
    """If the host is killed, its stages die too, rather than write outputs nobody waits for."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def take_standard_streams(fds: list[int]) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    # As a fresh interpreter would: stdout line-buffered on a terminal (the host's is a log file).
    sys.stdout.reconfigure(line_buffering=os.isatty(1))


def forget_our_modules() -> None:
    import importlib

    for name in [name for name in sys.modules if name.split(".")[0] in OUR_PACKAGES]:
        del sys.modules[name]
    importlib.invalidate_caches()  # directory listings cached by the host may predate the stage's files


def reseed_libraries() -> None:
    """Forked children share the host's random state; a fresh process would not (random reseeds itself)."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
