"""CPU threads from the CPUs this process may use (affinity, cgroup quota), shared fairly between trainings at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

SLOTS_DIR = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"d2l-mlp-train-slots-{os.getuid()}"
PROC_SELF = Path("/proc/self")


@contextmanager
def shared_threads() -> Iterator[int]:
    """Hold a training slot; torch gets the CPUs this process may use divided by the slots held at the start.
    OMP_NUM_THREADS, when set, wins: that is the documented way to choose by hand."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        yield torch.get_num_threads()
        return
    cpus = available_cpus()
    slot = _take_slot(cpus)
    try:
        threads = max(1, cpus // max(1, _slots_held()))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(previous)
    finally:
        if slot is not None:
            slot.close()


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask and its cgroup's CPU quota, the smaller, at least 1.
    os.cpu_count() counts every core of the host, which taskset, Slurm or a container's quota may deny us."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS has no affinity mask
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, int(quota))  # rounded down: a thread past the quota is throttled and stalls the others
    return max(1, cpus)


def cgroup_cpu_limit(proc_self: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroups in CPUs (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cfs_period_us),
    the tightest from its own cgroup up to the root; None where there is no quota or no cgroup file system."""
    proc_self = proc_self or PROC_SELF
    try:
        memberships = (proc_self / "cgroup").read_text().splitlines()
        mounts = (proc_self / "mountinfo").read_text().splitlines()
    except OSError:  # macOS, or no /proc
        return None
    limits = []
    for line in memberships:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, controllers listed in the cgroup's own files
            found, read = _cgroup_directory(mounts, "cgroup2", None, path), _v2_limit
        elif "cpu" in controllers.split(","):
            found, read = _cgroup_directory(mounts, "cgroup", "cpu", path), _v1_limit
        else:
            continue
        if found is not None:
            directory, mount_point = found
            limits += [limit for limit in map(read, _up_to(directory, mount_point)) if limit is not None]
    return min(limits, default=None)


def _cgroup_directory(mounts: list[str], fstype: str, controller: str | None, path: str) -> tuple[Path, Path] | None:
    """Where the cgroup `path` (as /proc/self/cgroup names it) is mounted, and that mount's top directory."""
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
            continue
        if controller is not None and controller not in tail[2].split(","):
            continue
        root, mount_point = fields[3], Path(_unescape(fields[4]))
        relative = path[len(root) :] if path == root or path.startswith(root.rstrip("/") + "/") else ""
        if ".." in Path(relative).parts:  # a cgroup outside our namespace's view: its mount top is all we see
            relative = ""
        return mount_point / relative.lstrip("/"), mount_point
    return None


def _up_to(directory: Path, top: Path) -> list[Path]:
    """directory, its parents, ..., top: a parent's quota caps its children too."""
    chain = [directory]
    while chain[-1] != top and chain[-1] != chain[-1].parent:
        chain.append(chain[-1].parent)
    return chain


def _v2_limit(directory: Path) -> float | None:
    """cpu.max holds '<quota> <period>' in microseconds, or 'max <period>' for no quota."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(directory: Path) -> float | None:
    """cpu.cfs_quota_us is -1 for no quota; otherwise the CPU time allowed per cpu.cfs_period_us."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    for code, character in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, character)
    return field


def _take_slot(cpus: int) -> IO | None:
    """The first free slot file of `cpus`, locked for as long as this training runs; None if none is usable."""
    try:
        SLOTS_DIR.mkdir(mode=0o700, exist_ok=True)
        for index in range(cpus):
            handle = open(SLOTS_DIR / f"slot-{index}", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
    except OSError:
        return None
    return None


def _slots_held() -> int:
    """How many slots are locked now, this process's own included."""
    held = 0
    for path in SLOTS_DIR.glob("slot-*"):
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                held += 1
    return held
