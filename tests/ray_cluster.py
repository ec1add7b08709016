"""A real two-node Ray cluster on this machine, started with `ray start` and stopped by the pids it started.

The head and the worker node are each one `ray start` with 1 CPU, its own temp dir and its own tag in the
environment (`D2L_RAY_TEST_NODE=<token>:<role>`), which every process of that node inherits: the GCS, the raylet,
the agents and the task workers (which rename themselves `ray::...`, so their command lines say nothing). Those
processes, found by their tag in /proc/<pid>/environ, are the only ones ever signalled: `ray stop` would stop
every Ray process of the user, other sessions' clusters included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = Path(sys.executable).parent / "ray"
TAG = "D2L_RAY_TEST_NODE"
WORKER_RESOURCE = "d2l_worker_node"  # a custom resource only the worker node has: tells the nodes apart
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 15
TERM_GRACE_S = 5  # then SIGKILL: a Ray process may take longer to exit on SIGTERM than a test should wait
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # small: the machine is shared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    """A head and a worker node, 1 CPU each; `address` is what ExecutorParams.ray_address takes."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(6))
    port: int = field(default_factory=free_port)
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RayCluster:
        dashboard = ["--include-dashboard", "false", "--dashboard-port", str(free_port())]  # its API starts anyway
        self._ray_start("head", "--head", "--port", str(self.port), *dashboard)
        self.start_worker()
        return self

    def start_worker(self) -> None:
        """(Re)start the worker node and wait until the cluster counts two live nodes."""
        resources = json.dumps({WORKER_RESOURCE: 1})
        self._ray_start("worker", "--address", self.address, "--resources", resources)
        self.wait_for_nodes(2)

    def _ray_start(self, role: str, *arguments: str) -> None:
        self.starts += 1
        temp_dir = self.root / f"{role}{self.starts}"  # short: Ray's unix socket paths must fit in 107 characters
        env = {**os.environ, TAG: f"{self.token}:{role}", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        command = [str(RAY), "start", *arguments, "--num-cpus", "1", "--temp-dir", str(temp_dir)]
        command += ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(OBJECT_STORE_BYTES)]
        command += ["--disable-usage-stats"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if result.returncode != 0:
            self.stop()
            raise AssertionError(f"ray start ({role}) failed: {result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def nodes(self) -> dict[str, str]:
        """Live nodes as {role: node id}, asked of the cluster itself."""
        import ray

        ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
        try:
            alive = [node for node in ray.nodes() if node["Alive"]]
        finally:
            ray.shutdown()
        return {"worker" if WORKER_RESOURCE in node["Resources"] else "head": node["NodeID"] for node in alive}

    def wait_for_nodes(self, count: int) -> dict[str, str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(nodes := self.nodes()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the Ray cluster has {len(nodes)} live nodes after {START_TIMEOUT_S} s")
            time.sleep(1)
        return nodes

    def processes(self, role: str | None = None) -> list[psutil.Process]:
        """This cluster's processes (of one node when `role` is given), by the tag in their environment."""
        wanted = {f"{self.token}:{role}"} if role else {f"{self.token}:head", f"{self.token}:worker"}
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG) in wanted:
                    found.append(process)
            except (psutil.Error, OSError):  # gone, or another user's
                continue
        return found

    def kill(self, role: str | None = None, sig: int = signal.SIGKILL, wait_s: float = STOP_TIMEOUT_S) -> list:
        """Signal this cluster's processes (one node's when `role` is given); wait until they are gone."""
        processes = self.processes(role)
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=wait_s)
        return alive

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for what is left, to this cluster's processes only; remove its temp dirs.
        SIGINT and SIGTERM to this process wait until it is done: a second Ctrl-C must not leave the cluster up."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if self.kill(sig=signal.SIGTERM, wait_s=TERM_GRACE_S):
                self.kill(sig=signal.SIGKILL)
            shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def start_cluster() -> RayCluster:
    """A two-node cluster in a fresh short temp dir; the caller stops it."""
    return RayCluster(Path(tempfile.mkdtemp(prefix="d2l-ray-"))).start()
