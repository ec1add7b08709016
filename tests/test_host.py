"""The stage host (pipeline/host.py) with real processes: each test starts its own host in its own
socket directory and stops it afterwards. A stage run by the host has another pid than its client;
run in-process it has the client's pid, which is how the tests tell the two apart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30  # bound on every wait below; a healthy run needs well under a second for each

pytestmark = pytest.mark.integration

PROBE = """
import os, sys
print("pid", os.getpid())
print("cwd", os.getcwd())
print("argv", sys.argv[1:])
print("env", os.environ.get("PROBE_VALUE"))
print("stdin", sys.stdin.read().strip())
print("umask", oct(os.umask(0)))
print("to stderr", file=sys.stderr)
"""


@pytest.fixture
def host_env(tmp_path: Path):
    """Environment for clients of a host private to this test (no preloads: it starts in a blink)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "D2L_STAGE_HOST_DIR": str(tmp_path / "host"),
        "D2L_STAGE_HOST_PRELOAD": "",
        "D2L_STAGE_HOST_IDLE_S": "60",
    }
    env.pop("D2L_STAGE_HOST", None)
    yield env
    stop_hosts(tmp_path / "host")


def stop_hosts(directory: Path) -> None:
    for lock in directory.glob("*.lock"):
        pid = int(lock.read_text() or 0)
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda pid=pid: not alive(pid))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def write_module(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name.replace('.', '/')}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return directory


def client(module: str, *args: str, cwd: Path, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.host", module, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run_client(
    module: str, *args: str, cwd: Path, env: dict, stdin: str = "", umask: int = 0o022
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.host", module, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        umask=umask,
    )


def stage_pid(stdout: str) -> int:
    return int(next(line.split()[1] for line in stdout.splitlines() if line.startswith("pid ")))


def test_exit_codes_pass_through(tmp_path: Path, host_env: dict) -> None:
    work = write_module(
        tmp_path / "work",
        "exits",
        """
        import os, sys
        print("pid", os.getpid(), flush=True)
        if sys.argv[1] == "interrupt":
            raise KeyboardInterrupt
        if sys.argv[1] == "error":
            raise RuntimeError("broken stage")
        if sys.argv[1] == "message":
            sys.exit("a message")
        sys.exit(int(sys.argv[1]))
    """,
    )
    expected = {"0": 0, "2": 2, "interrupt": 130, "error": 1, "message": 1}
    for argument, code in expected.items():
        result = run_client("exits", argument, cwd=work, env=host_env)
        assert result.returncode == code, (argument, result.stderr)
        assert stage_pid(result.stdout) != os.getpid()
    result = run_client("exits", "error", cwd=work, env=host_env)
    assert "Traceback" in result.stderr and "RuntimeError: broken stage" in result.stderr
    assert run_client("exits", "message", cwd=work, env=host_env).stderr == "a message\n"
    assert stage_pid(result.stdout) != stage_pid(run_client("exits", "0", cwd=work, env=host_env).stdout)


def test_streams_cwd_env_and_argv_are_the_clients(tmp_path: Path, host_env: dict) -> None:
    work = write_module(tmp_path / "work", "probe", PROBE)
    for value in ("first", "second"):  # the same host, another environment each time
        result = run_client(
            "probe",
            "--flag",
            "x y",
            cwd=work,
            env={**host_env, "PROBE_VALUE": value},
            stdin="hello host",
            umask=0o027 if value == "first" else 0o002,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[1:] == [
            f"cwd {work}",
            "argv ['--flag', 'x y']",
            f"env {value}",
            "stdin hello host",
            "umask 0o27" if value == "first" else "umask 0o2",
        ]
        assert result.stderr == "to stderr\n"
    served = (tmp_path / "host").glob("*.log")
    assert sum(log.read_text().count(": probe in") for log in served) == 2


def test_each_client_imports_our_code_from_its_own_cwd(tmp_path: Path, host_env: dict) -> None:
    """Two working copies of the same package (as in DVC's experiment directories), one host."""
    copies = {}
    for version in ("1", "2"):
        work = write_module(tmp_path / f"copy{version}", "lessons.__init__", "")
        write_module(work, "lessons.version", f"VERSION = {version}\n")
        copies[version] = write_module(work, "lessons.show", "from lessons.version import VERSION\nprint(VERSION)\n")
    for _ in range(2):
        for version, work in copies.items():
            result = run_client("lessons.show", cwd=work, env=host_env)
            assert (result.returncode, result.stdout) == (0, f"{version}\n"), result.stderr


def test_atexit_handlers_and_threads_finish_before_the_stage_exits(tmp_path: Path, host_env: dict) -> None:
    """As at a normal interpreter exit: non-daemon threads are joined, then atexit handlers run."""
    work = write_module(
        tmp_path / "work",
        "finishing",
        """
        import atexit, threading, time
        atexit.register(print, "atexit ran", flush=True)
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread done", flush=True))).start()
        print("main done", flush=True)
    """,
    )
    result = run_client("finishing", cwd=work, env=host_env)
    assert (result.returncode, result.stdout) == (0, "main done\nthread done\natexit ran\n"), result.stderr


def test_sigterm_to_the_client_reaches_the_stage(tmp_path: Path, host_env: dict) -> None:
    """The stage's own handler runs (pipeline.cli: SIGTERM -> exit 130) and its finally block too."""
    marker = tmp_path / "finally"
    work = write_module(
        tmp_path / "work",
        "sleeper",
        f"""
        import time
        from pipeline.cli import stage_entry

        @stage_entry
        def main():
            try:
                print("ready", flush=True)
                time.sleep({WAIT_S})
            finally:
                open({str(marker)!r}, "w").close()

        main()
    """,
    )
    process = client("sleeper", cwd=work, env=host_env)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=WAIT_S)
    assert process.returncode == 130, stderr
    assert "interrupted: signal SIGTERM" in stderr
    assert marker.exists()


def test_kill_9_of_the_client_kills_the_stage(tmp_path: Path, host_env: dict) -> None:
    marker = tmp_path / "written later"
    work = write_module(
        tmp_path / "work",
        "slow_writer",
        f"""
        import os, time
        print("pid", os.getpid(), flush=True)
        time.sleep(3)
        open({str(marker)!r}, "w").close()
    """,
    )
    process = client("slow_writer", cwd=work, env=host_env)
    stage = stage_pid(process.stdout.readline())
    assert stage != process.pid
    process.kill()
    process.wait(timeout=WAIT_S)
    wait_until(lambda: not alive(stage))
    assert not marker.exists()


def test_two_clients_run_at_once(tmp_path: Path, host_env: dict) -> None:
    """Each stage waits for the other to have started: both finish only if they run concurrently."""
    work = write_module(
        tmp_path / "work",
        "meet",
        f"""
        import os, sys, time
        mine, other = sys.argv[1], sys.argv[2]
        open(mine, "w").close()
        deadline = time.monotonic() + {WAIT_S}
        while not os.path.exists(other):
            assert time.monotonic() < deadline, "the other stage never started"
            time.sleep(0.02)
        print("met", flush=True)
    """,
    )
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    processes = [
        client("meet", first, second, cwd=work, env=host_env),
        client("meet", second, first, cwd=work, env=host_env),
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=WAIT_S + 5)
        assert (process.returncode, stdout) == (0, "met\n"), stderr


@pytest.mark.parametrize("setting", [{"D2L_STAGE_HOST": "0"}, {"D2L_STAGE_HOST_DIR": "/proc/no/such/dir"}])
def test_without_a_host_the_stage_runs_in_process(tmp_path: Path, host_env: dict, setting: dict) -> None:
    work = write_module(tmp_path / "work", "probe", PROBE)
    process = client("probe", "a", cwd=work, env={**host_env, **setting, "PROBE_VALUE": "v"}, stdin=subprocess.PIPE)
    stdout, stderr = process.communicate("in", timeout=WAIT_S)
    assert process.returncode == 0, stderr
    assert stage_pid(stdout) == process.pid
    assert stdout.splitlines()[1:5] == [f"cwd {work}", "argv ['a']", "env v", "stdin in"]
    assert not (tmp_path / "host").exists()


def test_idle_host_exits_and_removes_its_socket(tmp_path: Path, host_env: dict) -> None:
    work = write_module(tmp_path / "work", "probe", PROBE)
    result = run_client("probe", cwd=work, env={**host_env, "D2L_STAGE_HOST_IDLE_S": "1"})
    assert result.returncode == 0, result.stderr
    host = int(next((tmp_path / "host").glob("*.lock")).read_text())
    wait_until(lambda: not alive(host))
    assert not list((tmp_path / "host").glob("*.sock"))


def test_a_stale_socket_is_replaced(tmp_path: Path, host_env: dict) -> None:
    """A host killed with -9 leaves its socket file; the next client starts a new host there."""
    work = write_module(tmp_path / "work", "probe", PROBE)
    assert run_client("probe", cwd=work, env=host_env).returncode == 0
    lock = next((tmp_path / "host").glob("*.lock"))
    killed = int(lock.read_text())
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not alive(killed))
    assert list((tmp_path / "host").glob("*.sock"))
    result = run_client("probe", cwd=work, env=host_env)
    assert result.returncode == 0, result.stderr
    assert stage_pid(result.stdout) != os.getpid()
    assert int(lock.read_text()) != killed


def test_preloaded_torch_follows_the_clients_thread_setting(tmp_path: Path, host_env: dict) -> None:
    """torch reads OMP_NUM_THREADS when imported, so the setting is part of which host serves a client."""
    work = write_module(
        tmp_path / "work",
        "threads",
        """
        import os, sys
        preloaded = "torch" in sys.modules
        import torch
        print(os.getpid(), preloaded, torch.get_num_threads())
    """,
    )
    env = {**host_env, "D2L_STAGE_HOST_PRELOAD": "torch"}
    for threads in ("1", "2"):
        result = run_client("threads", cwd=work, env={**env, "OMP_NUM_THREADS": threads})
        pid, preloaded, used = result.stdout.split()
        assert (preloaded, used) == ("True", threads), result.stderr
    assert len(list((tmp_path / "host").glob("*.sock"))) == 2


def test_a_host_that_drops_the_request_leaves_the_stage_to_the_client(tmp_path: Path, host_env: dict) -> None:
    """Where a host closes the connection before starting the stage (one exiting, idle, as the client
    connects), the client runs the stage itself."""
    work = write_module(tmp_path / "work", "probe", PROBE)
    assert run_client("probe", cwd=work, env=host_env).returncode == 0
    host = int(next((tmp_path / "host").glob("*.lock")).read_text())
    os.kill(host, signal.SIGKILL)
    wait_until(lambda: not alive(host))
    path = str(next((tmp_path / "host").glob("*.sock")))
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dropping:
        dropping.bind(path)
        dropping.listen()
        process = client("probe", cwd=work, env=host_env, stdin=subprocess.PIPE)
        dropping.accept()[0].close()
        stdout, stderr = process.communicate("", timeout=WAIT_S)
    assert process.returncode == 0, stderr
    assert stage_pid(stdout) == process.pid
    assert "running in-process" in stderr
