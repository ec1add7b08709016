"""A team stack on this machine: PostgreSQL 15, an MLflow server with basic auth, sshd for a DVC remote.

    bin/team-server start  [postgres|mlflow|ssh ...]   idempotent; all three when none is named
    bin/team-server stop   [postgres|mlflow|ssh ...]   leaves no process behind
    bin/team-server status                             what runs where, and the lines a user exports
    bin/team-server env                                only the export lines, for eval "$(...)"

State, logs and secrets live in --state-dir (default: .team/ in the repo root, git-ignored). Secrets are
generated there (mode 0600) and never printed: `status` prints `$(cat <file>)` instead. Everything binds
127.0.0.1; every wait is bounded. docs/team.md says how to use it and how to deploy the same on servers.
bin/team-server runs this module (`python -m pipeline.team_server`) with the repo's venv; it needs the `team`
extra (pip install -e '.[team]', which bin/setup installs).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("TEAM_PG_BIN", "/usr/lib/postgresql/15/bin"))
SSHD = Path(os.environ.get("TEAM_SSHD", "/usr/sbin/sshd"))
HOST = "127.0.0.1"
COMPONENTS = ("postgres", "mlflow", "ssh")
ADMIN, MEMBER = "admin", "member"
DB_ROLE = DB_NAME = "mlflow"
WAIT_S = 90  # the longest any single wait may take: first mlflow start migrates an empty database


class TeamError(Exception):
    """A problem to report in one line."""


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="bin/team-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("components", nargs="*", metavar="component", help=" | ".join(COMPONENTS) + " (default: all)")
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("TEAM_STATE_DIR", REPO / ".team")))
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `bin/team-server status | head` ends quietly
    if unknown := set(args.components) - set(COMPONENTS):
        parser.error(f"unknown component {', '.join(sorted(unknown))}: expected {', '.join(COMPONENTS)}")
    team = Team(args.state_dir.resolve())
    components = args.components or list(COMPONENTS)
    try:
        if args.command == "start":
            team.start(components)
            print(team.status())
        elif args.command == "stop":
            team.stop(components)
        elif args.command == "status":
            print(team.status())
        elif team.state_file.exists():
            print(team.exports())
        else:
            raise TeamError(f"no team stack in {team.root}: bin/team-server start")
    except TeamError as error:
        print(f"team-server: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


class Team:
    def __init__(self, root: Path):
        self.root = root
        self.secrets = root / "secrets"
        self.pg_data, self.pg_run = root / "postgres" / "data", root / "postgres" / "run"
        self.mlflow_dir, self.ssh_dir = root / "mlflow", root / "ssh"
        self.dvc_store, self.git_remote = root / "dvc-store", root / "git" / "project.git"
        self.state_file = root / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    # --- start / stop / status -------------------------------------------------------------------
    def start(self, components: list[str]) -> None:
        self.prepare()
        if "postgres" in components or "mlflow" in components:
            self.start_postgres()  # mlflow cannot run without its database
        if "mlflow" in components:
            self.start_mlflow()
        if "ssh" in components:
            self.start_sshd()

    def stop(self, components: list[str]) -> None:
        if "mlflow" in components:
            stop_process_group(self.mlflow_pid(), "mlflow server")
        if "ssh" in components:
            stop_process_group(self.sshd_pid(), "sshd")
        if "postgres" in components:
            self.stop_postgres()

    def status(self) -> str:
        if not self.state_file.exists():
            return f"no team stack in {self.root}: bin/team-server start"
        ports = self.state["ports"]
        lines = [
            f"team state: {self.root}",
            _line("postgres", self.postgres_pid(), f"postgresql://{DB_ROLE}@{HOST}:{ports.get('postgres')}/{DB_NAME}"),
            _line("mlflow", self.mlflow_pid(), self.tracking_uri()),
            _line("ssh", self.sshd_pid(), self.dvc_remote_url()),
            f"git remote:  {self.git_remote}",
            "",
            "# point the pipeline at the team server:",
            self.exports(),
            "",
            "# DVC remote and git remote, once per clone:",
            f"dvc remote add -d team {self.dvc_remote_url()}",
            f"dvc remote modify --local team keyfile {self.secrets / 'ssh_user_key'}",
            f"git remote add origin {self.git_remote}",
        ]
        return "\n".join(lines)

    def exports(self, user: str = MEMBER) -> str:
        return "\n".join(
            [
                f"export MLFLOW_TRACKING_URI={self.tracking_uri()}",
                f"export MLFLOW_TRACKING_USERNAME={user}",
                f'export MLFLOW_TRACKING_PASSWORD="$(cat {self.secrets / (user + ".password")})"',
            ]
        )

    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.state.get('ports', {}).get('mlflow')}"

    def dvc_remote_url(self) -> str:
        return (
            f"ssh://{pwd.getpwuid(os.getuid()).pw_name}@{HOST}:{self.state.get('ports', {}).get('ssh')}{self.dvc_store}"
        )

    # --- one-time setup ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Directories, ports and secrets; kept across restarts so URLs and passwords stay the same."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # postgres must traverse it; nobody else may list it
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        self.mlflow_dir.mkdir(mode=0o700, exist_ok=True)  # its auth.db holds the password hashes
        for directory in (self.ssh_dir, self.dvc_store, self.git_remote.parent):
            directory.mkdir(parents=True, exist_ok=True)
        ports = self.state.setdefault("ports", {})
        for name in COMPONENTS:
            ports.setdefault(name, free_port())
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")
        for name in (ADMIN, MEMBER, "db", "flask_secret_key"):
            secret_file(self.secrets / f"{name}.password" if name != "flask_secret_key" else self.secrets / name)
        # libpq reads the database password from here, so it is in no URI, command line or log.
        pgpass = self.secrets / "pgpass"
        if not pgpass.exists():
            write_secret(pgpass, f"{HOST}:*:{DB_NAME}:{DB_ROLE}:{read_secret(self.secrets / 'db.password')}\n")
        if not (self.git_remote / "HEAD").exists():
            run(["git", "init", "--bare", "-q", str(self.git_remote)])

    # --- PostgreSQL --------------------------------------------------------------------------------
    def start_postgres(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise TeamError(f"no PostgreSQL binaries in {PG_BIN}: run bin/setup (as root) or set TEAM_PG_BIN")
        owner = db_owner()
        if not (self.pg_data / "PG_VERSION").exists():
            self.init_postgres(owner)
        if self.postgres_pid() is None:
            log = self.root / "postgres" / "postgres.log"
            as_user(
                owner,
                [PG_BIN / "pg_ctl", "-D", self.pg_data, "-l", log, "-w", "-t", str(WAIT_S), "start"],
                f"PostgreSQL did not start within {WAIT_S} s; see {log}",
            )
        self.create_database(owner)

    def init_postgres(self, owner: str) -> None:
        """A cluster owned by an unprivileged user (postgres refuses root), local peer auth, TCP with scram."""
        self.pg_data.mkdir(parents=True, exist_ok=True)
        self.pg_run.mkdir(exist_ok=True)
        for directory in (self.pg_data.parent, self.pg_data, self.pg_run):
            shutil.chown(directory, owner, owner) if os.getuid() == 0 else None
        self.pg_data.chmod(0o700)
        as_user(
            owner,
            [
                PG_BIN / "initdb",
                "-D",
                self.pg_data,
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            "initdb failed",
        )
        with open(self.pg_data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\n# bin/team-server\nlisten_addresses = '{HOST}'\nport = {self.state['ports']['postgres']}\n"
                f"unix_socket_directories = '{self.pg_run}'\n"
            )

    def create_database(self, owner: str) -> None:
        """The mlflow role (its password fed on stdin, never in argv) and its database, once."""
        psql = [
            PG_BIN / "psql",
            "-h",
            self.pg_run,
            "-p",
            str(self.state["ports"]["postgres"]),
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-tAq",
        ]
        exists = as_user(owner, [*psql, "-c", f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_ROLE}'"], "psql failed")
        if exists.strip() == "1":
            return
        password = read_secret(self.secrets / "db.password")
        as_user(
            owner,
            psql,
            "cannot create the mlflow role and database",
            stdin=f"CREATE ROLE {DB_ROLE} LOGIN PASSWORD '{password}';\nCREATE DATABASE {DB_NAME} OWNER {DB_ROLE};\n",
        )

    def stop_postgres(self) -> None:
        pid = self.postgres_pid()
        if pid is None:
            return
        try:
            as_user(db_owner(), [PG_BIN / "pg_ctl", "-D", self.pg_data, "-m", "fast", "-w", "-t", "60", "stop"], "")
        except TeamError:
            pass  # pg_ctl could not stop it in time: the process group below can
        stop_process_group(self.postgres_pid(), "postgres")

    def postgres_pid(self) -> int | None:
        try:
            pid = int((self.pg_data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if process_alive(pid, "postgres") else None

    # --- MLflow --------------------------------------------------------------------------------------
    def start_mlflow(self) -> None:
        if self.mlflow_pid() is None:
            self.write_auth_config()
            destination = os.environ.get("TEAM_ARTIFACTS_DESTINATION", (self.mlflow_dir / "artifacts").as_uri())
            port = self.state["ports"]["mlflow"]
            # +psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which we do not install.
            command = [
                mlflow_python(),
                "-m",
                "mlflow",
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                "2",
                "--backend-store-uri",
                f"postgresql+psycopg2://{DB_ROLE}@{HOST}:{self.state['ports']['postgres']}/{DB_NAME}",
                "--artifacts-destination",
                destination,
            ]
            # No job runner: it serves GenAI features (online scoring, trace archival) that we do not use,
            # and costs eight processes on a small machine.
            env = {
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **os.environ,
                "PGPASSFILE": str(self.secrets / "pgpass"),
                "MLFLOW_AUTH_CONFIG_PATH": str(self.mlflow_dir / "basic_auth.ini"),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": read_secret(self.secrets / "flask_secret_key"),
                "MLFLOW_AUTH_ADMIN_PASSWORD": read_secret(self.secrets / "admin.password"),
            }
            pid = spawn(command, self.mlflow_dir / "server.log", env)
            (self.mlflow_dir / "server.pid").write_text(f"{pid}\n")
            stopped_on_failure(
                pid, "mlflow server", wait_http, f"{self.tracking_uri()}/health", pid, self.mlflow_dir / "server.log"
            )
        self.ensure_member()

    def write_auth_config(self) -> None:
        """Auth DB in the team dir, default READ: users see everything, change only what they own or are granted."""
        (self.mlflow_dir / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{self.mlflow_dir / 'auth.db'}\n"
            f"admin_username = {ADMIN}\n"
            "# admin_password comes from MLFLOW_AUTH_ADMIN_PASSWORD (secrets/admin.password), only at first start\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )

    def ensure_member(self) -> None:
        """The regular user, created by the admin through the auth REST API if it is not there yet."""
        admin = (ADMIN, read_secret(self.secrets / "admin.password"))
        status, _ = http(f"{self.tracking_uri()}/api/2.0/mlflow/users/get?username={MEMBER}", admin)
        if status == 200:
            return
        body = {"username": MEMBER, "password": read_secret(self.secrets / f"{MEMBER}.password")}
        status, text = http(f"{self.tracking_uri()}/api/2.0/mlflow/users/create", admin, body)
        if status != 200:
            raise TeamError(f"cannot create user {MEMBER}: HTTP {status} {text[:200]}")

    def mlflow_pid(self) -> int | None:
        return pid_from(self.mlflow_dir / "server.pid", "mlflow")

    # --- sshd for the DVC remote ---------------------------------------------------------------------
    def start_sshd(self) -> None:
        if not SSHD.exists():
            raise TeamError(f"no sshd at {SSHD}: run bin/setup (as root; installs openssh-server) or set TEAM_SSHD")
        self.init_ssh()
        if self.sshd_pid() is None:
            config = self.ssh_dir / "sshd_config"
            if os.getuid() == 0:
                Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # Debian's sshd wants its privsep dir
            run([SSHD, "-t", "-f", config])
            pid = spawn(
                [SSHD, "-D", "-f", config, "-E", self.ssh_dir / "sshd.log"], self.ssh_dir / "sshd.out", os.environ
            )
            (self.ssh_dir / "sshd.pid").write_text(f"{pid}\n")
            stopped_on_failure(pid, "sshd", wait_ssh_banner, self.state["ports"]["ssh"], pid, self.ssh_dir / "sshd.log")

    def init_ssh(self) -> None:
        """A host key and a user key (generated once), and a config that admits only that key, only here."""
        host_key, user_key = self.ssh_dir / "ssh_host_ed25519_key", self.secrets / "ssh_user_key"
        for key, comment in ((host_key, "team-server host"), (user_key, "team-server dvc user")):
            if not key.exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key])
        authorized = self.ssh_dir / "authorized_keys"
        write_secret(authorized, "restrict " + Path(f"{user_key}.pub").read_text())
        user = pwd.getpwuid(os.getuid()).pw_name
        (self.ssh_dir / "sshd_config").write_text(
            f"ListenAddress {HOST}\nPort {self.state['ports']['ssh']}\nHostKey {host_key}\n"
            f"PidFile {self.ssh_dir / 'sshd.pid.sshd'}\nAuthorizedKeysFile {authorized}\nAllowUsers {user}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nX11Forwarding no\nAllowTcpForwarding no\n"
            "# The state dir may sit under /tmp (world-writable), which StrictModes rejects; this script\n"
            "# writes the key files itself, 0600 and owned by the user who runs it.\nStrictModes no\n"
            "Subsystem sftp internal-sftp\n"
        )

    def sshd_pid(self) -> int | None:
        return pid_from(self.ssh_dir / "sshd.pid", "sshd")


# --- processes -------------------------------------------------------------------------------------------
def spawn(command: list, log: Path, env: dict) -> int:
    """A daemon in its own session (so stop can end its whole group), output to a log file."""
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [str(part) for part in command],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return process.pid


def stopped_on_failure(pid: int, name: str, wait, *args) -> None:
    """wait(*args); a daemon that did not come up is stopped rather than left half-started."""
    try:
        wait(*args)
    except TeamError:
        stop_process_group(pid, name)
        raise


def stop_process_group(pid: int | None, name: str) -> None:
    """SIGTERM to the group and to the direct children (sshd's sessions run in their own), SIGKILL after 30 s."""
    if pid is None:
        return
    targets = {pid, *children(pid)}
    signal_group(pid, signal.SIGTERM)
    for child in targets - {pid}:
        signal_pid(child, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(process_alive(target) for target in targets):
        time.sleep(0.2)
    if any(process_alive(target) for target in targets):
        print(f"team-server: {name} did not stop within 30 s, killing it", file=sys.stderr)
        signal_group(pid, signal.SIGKILL)
        for target in targets:
            signal_pid(target, signal.SIGKILL)


def children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10)
    return [int(line) for line in result.stdout.split()]


def signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        signal_pid(pid, signum)


def signal_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def process_alive(pid: int, command_contains: str = "") -> bool:
    """Alive and not a zombie, and (when asked) running the expected program: a stale pid may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and command_contains in cmdline


def pid_from(path: Path, command_contains: str) -> int | None:
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid, command_contains) else None


def wait_http(url: str, pid: int, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not process_alive(pid):
            raise TeamError(f"{url} exited while starting; last lines of {log}:\n{tail(log)}")
        if http(url)[0] == 200:
            return
        time.sleep(0.5)
    raise TeamError(f"{url} did not answer within {WAIT_S} s; see {log}")


def wait_ssh_banner(port: int, pid: int, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not process_alive(pid):
            raise TeamError(f"sshd exited while starting; last lines of {log}:\n{tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=2) as connection:
                if connection.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TeamError(f"sshd on {HOST}:{port} did not answer within {WAIT_S} s; see {log}")


def http(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, str]:
    """(status, text) of one request with a 10 s timeout; (0, reason) when nothing answered."""
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return 0, str(error)


def db_owner() -> str:
    """The unprivileged user that owns and runs the cluster: `postgres` when we are root, else ourselves."""
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise TeamError("no system user 'postgres': run bin/setup (as root)") from None
    return "postgres"


def as_user(user: str, command: list, failure: str, stdin: str | None = None) -> str:
    """Run a PostgreSQL tool as the cluster's owner (runuser when we are root); its stdout."""
    command = [str(part) for part in command]
    if os.getuid() == 0 and user != "root":
        command = ["runuser", "-u", user, "--", *command]
    try:
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=WAIT_S + 10,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        raise TeamError(f"{failure}: {command[-1]} timed out") from None
    if result.returncode != 0:
        raise TeamError(f"{failure}: {(result.stderr or result.stdout).strip()[-500:]}")
    return result.stdout


def run(command: list) -> None:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise TeamError(f"{command[0]} failed: {(result.stderr or result.stdout).strip()[-500:]}")


def mlflow_python() -> str:
    """The repo's venv (bin/setup makes it), else the Python running this script."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


# --- small helpers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def secret_file(path: Path) -> None:
    if not path.exists():
        write_secret(path, secrets.token_urlsafe(24) + "\n")


def write_secret(path: Path, text: str) -> None:
    """Mode 0600 from the first byte: created with O_EXCL under a temporary name, then renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def read_secret(path: Path) -> str:
    return path.read_text().strip()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _line(name: str, pid: int | None, where: str) -> str:
    return f"{name + ':':12} {'running, pid ' + str(pid) if pid else 'stopped':22} {where}"


if __name__ == "__main__":
    main()
