"""Threads from the CPUs a process may use: cgroup quotas read from files written here, affinity set by taskset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cpu
from tests.conftest import REPO, tool_env


def fake_proc(tmp_path: Path, memberships: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """A /proc/self with these cgroup lines and mountinfo lines of (root, mount point, fstype, super options)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(memberships)
    escaped_space = "\\040"
    lines = [
        f"{30 + index} 23 0:{40 + index} {root} {point.replace(' ', escaped_space)} rw - {fstype} x {options}"
        for index, (root, point, fstype, options) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/vda rw", *lines]) + "\n")
    return proc


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_v2_quota_is_the_tightest_on_the_way_to_the_root(tmp_path):
    top = tmp_path / "cgroup v2"  # a space: mountinfo escapes it as \040
    write(top / "cpu.max", "max 100000")
    write(top / "jobs/cpu.max", "50000 100000")
    write(top / "jobs/job7/cpu.max", "150000 100000")
    proc = fake_proc(tmp_path, "0::/jobs/job7\n", [("/", str(top), "cgroup2", "rw,nsdelegate")])
    assert cpu.cgroup_cpu_limit(proc) == 0.5
    write(top / "jobs/cpu.max", "max 100000")
    assert cpu.cgroup_cpu_limit(proc) == 1.5


def test_v2_without_a_quota_is_none(tmp_path):
    top = tmp_path / "unified"
    write(top / "a/cpu.max", "max 100000")
    proc = fake_proc(tmp_path, "0::/a\n", [("/", str(top), "cgroup2", "rw")])
    assert cpu.cgroup_cpu_limit(proc) is None


def test_v1_quota_over_period(tmp_path):
    top = tmp_path / "cpu,cpuacct"
    write(top / "slurm/uid_0/job_3/cpu.cfs_quota_us", "300000")
    write(top / "slurm/uid_0/job_3/cpu.cfs_period_us", "100000")
    write(top / "cpu.cfs_quota_us", "-1")
    write(top / "cpu.cfs_period_us", "100000")
    memberships = "5:memory:/slurm/uid_0/job_3\n4:cpu,cpuacct:/slurm/uid_0/job_3\n"
    mounts = [("/", str(tmp_path / "memory"), "cgroup", "rw,memory"), ("/", str(top), "cgroup", "rw,cpu,cpuacct")]
    assert cpu.cgroup_cpu_limit(fake_proc(tmp_path, memberships, mounts)) == 3.0


def test_v1_no_quota_is_none(tmp_path):
    top = tmp_path / "cpu"
    write(top / "cpu.cfs_quota_us", "-1")
    write(top / "cpu.cfs_period_us", "100000")
    assert cpu.cgroup_cpu_limit(fake_proc(tmp_path, "1:cpu:/\n", [("/", str(top), "cgroup", "rw,cpu")])) is None


def test_v1_in_a_container_reads_the_mount_top(tmp_path):
    """A container mounts its own cgroup as the top: /proc/self/cgroup still names the host's path."""
    top = tmp_path / "cpu"
    write(top / "cpu.cfs_quota_us", "200000")
    write(top / "cpu.cfs_period_us", "100000")
    proc = fake_proc(tmp_path, "3:cpu,cpuacct:/docker/abc\n", [("/docker/abc", str(top), "cgroup", "rw,cpu,cpuacct")])
    assert cpu.cgroup_cpu_limit(proc) == 2.0


def test_hybrid_takes_v1_cpu_when_the_unified_tree_has_no_cpu_controller(tmp_path):
    write(tmp_path / "cpu/cpu.cfs_quota_us", "100000")
    write(tmp_path / "cpu/cpu.cfs_period_us", "100000")
    (tmp_path / "unified").mkdir()
    mounts = [("/", str(tmp_path / "unified"), "cgroup2", "rw"), ("/", str(tmp_path / "cpu"), "cgroup", "rw,cpu")]
    assert cpu.cgroup_cpu_limit(fake_proc(tmp_path, "1:cpu:/\n0::/\nnot a cgroup line\n", mounts)) == 1.0


def test_no_proc_files_is_none(tmp_path):
    assert cpu.cgroup_cpu_limit(tmp_path / "missing") is None


def quota_of(tmp_path: Path, cpus: float) -> Path:
    """A fake /proc/self whose cgroup v2 allows `cpus` CPUs."""
    write(tmp_path / "cg/cpu.max", f"{round(cpus * 100000)} 100000")
    return fake_proc(tmp_path, "0::/\n", [("/", str(tmp_path / "cg"), "cgroup2", "rw")])


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.parametrize("quota, expected", [(0.5, 1), (1.5, 1), (1000, None)])
def test_available_cpus_is_the_smaller_of_affinity_and_quota_and_at_least_one(tmp_path, monkeypatch, quota, expected):
    monkeypatch.setattr(cpu, "PROC_SELF", quota_of(tmp_path, quota))
    assert cpu.available_cpus() == (expected or affinity())


def test_trainings_at_once_share_the_cpus_of_the_quota(tmp_path, monkeypatch):
    """Under a 1-CPU quota a training gets 1 thread and there is one slot, however many cores the host has."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "PROC_SELF", quota_of(tmp_path, 1))
    monkeypatch.setattr(cpu, "SLOTS_DIR", tmp_path / "slots")
    with cpu.shared_threads() as first:
        assert first == 1 and torch.get_num_threads() == 1
        with cpu.shared_threads() as second:
            assert second == 1
    assert [path.name for path in (tmp_path / "slots").iterdir()] == ["slot-0"]


TRAIN_AND_COUNT = """
import dataclasses, torch
from pipeline import config, cpu
from pipeline.stages import train
from tests.conftest import REPO, make_split

def flat(split):
    return split[0].reshape(len(split[0]), -1).float() / 255, split[1].long()

params = dataclasses.replace(config.load(REPO / "params.yaml").train, epochs=2, batch_size=64, device="cpu", seeds=(0,))
seen = []
with cpu.shared_threads():
    report = lambda seed, record: seen.append(torch.get_num_threads())
    train.run(params, flat(make_split(256, 1)), flat(make_split(64, 2)), report=report)
print(cpu.available_cpus(), *seen)
"""


def threads_in_training(tmp_path: Path, prefix: list[str]) -> list[int]:
    """The CPUs counted and torch's threads at each epoch of a real training started as `prefix` python ..."""
    environment = tool_env(XDG_RUNTIME_DIR=str(tmp_path))  # its own slot directory
    environment.pop("OMP_NUM_THREADS", None)
    command = [*prefix, sys.executable, "-c", TRAIN_AND_COUNT]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(word) for word in result.stdout.split()]


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is Linux only")
def test_a_training_under_taskset_uses_one_thread(tmp_path):
    one_cpu = str(min(os.sched_getaffinity(0)))  # one this process may use: CPU 0 may not be ours
    assert threads_in_training(tmp_path, ["taskset", "-c", one_cpu]) == [1, 1, 1]
    if cpu.available_cpus() > 1:  # the same training unpinned uses more: the figure above comes from the pin
        assert threads_in_training(tmp_path, []) == [cpu.available_cpus()] * 3
