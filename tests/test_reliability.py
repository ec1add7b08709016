"""Faults and interruptions with real processes: nothing half-written, no run left RUNNING, no hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import tensors
from pipeline.stages import prepare
from tests.conftest import (
    REPO,
    copy_repo,
    edit_params,
    idx_bytes,
    make_split,
    run_tool,
    tiny_params,
    tool_env,
    under_ulimit,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_dataset) -> dict:
    """Tiny prepared tensors and a params.yaml for them, for running stages directly."""
    root = tmp_path_factory.mktemp("prepared")
    raw = root / "raw"
    raw.mkdir()
    for kind, data in tiny_dataset["files"].items():
        (raw / prepare.FILE_KINDS[kind]).write_bytes(data)
    figures = prepare.run(raw, root / "data", normalize=True, validation=100, seed=0)
    (root / "stats.json").write_text(json.dumps(figures))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny_params(tiny_dataset, epochs=3)(params)
    params["train"]["seeds"] = [0]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"data": root / "data", "params": root / "params.yaml", "stats": root / "stats.json"}


def train_command(prepared: dict, out: Path, variant: str = "base") -> list[str]:
    """The train stage run directly (not under dvc), writing into `out`."""
    return [
        sys.executable,
        "-m",
        "pipeline.stages.train",
        "--params",
        str(prepared["params"]),
        "--variant",
        variant,
        "--data",
        str(prepared["data"]),
        "--stats",
        str(prepared["stats"]),
        "--models",
        str(out / "models"),
        "--summary",
        str(out / "train.json"),
        "--history",
        str(out / "history.csv"),
    ]


def statuses(uri: str, since: float = 0) -> dict[str, str]:
    return {run.info.run_name: run.info.status for run in runs(uri, since)}


def runs(uri: str, since: float = 0) -> list:
    """The runs in the d2l-mlp experiment started after `since` (a time.time())."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("d2l-mlp")
    found = client.search_runs([experiment.experiment_id]) if experiment else []
    return [run for run in found if run.info.start_time >= since * 1000]


def wait_for(predicate, timeout: float = 120, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(interval)


def comparable(history_csv: Path) -> list[str]:
    """History rows (figures only: the seconds are in MLflow)."""
    return history_csv.read_text().splitlines()


# --- signals and exceptions: the MLflow run ends KILLED or FAILED, never RUNNING or FINISHED ---


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_train_ends_it_with_no_run_opened_and_nothing_written(prepared, tmp_path, signum):
    """A training opens its MLflow runs only once its figures exist: stopped while it trains, it leaves no run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = yaml.safe_load(prepared["params"].read_text())
    params["train"]["epochs"] = 500
    prepared = {**prepared, "params": tmp_path / "params.yaml"}
    prepared["params"].write_text(yaml.safe_dump(params))
    process = subprocess.Popen(
        train_command(prepared, tmp_path / "out"),
        cwd=REPO,
        env=tool_env(MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("seed 0  epoch   1")  # training is under way
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "interrupted" in stderr
    assert not (tmp_path / "mlflow.db").exists() or statuses(uri) == {}
    assert not (tmp_path / "out").exists()


LOGGING_UNTIL_SIGNALLED = """
from pipeline import cli, tracking
from pipeline.cli import stage_entry


@stage_entry
def main():
    with tracking.logged_run("train", "d2l-mlp"):
        import mlflow

        print("logging", flush=True)
        step = 0
        while not cli.interrupt_pending():  # nearly all the time is spent inside MLflow's SQLAlchemy store
            mlflow.log_metrics({"a": step, "b": 2 * step}, step=step)
            step += 1


main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_mlflow_logging_waits_for_the_store_and_ends_the_run_killed(tmp_path, signum):
    """A signal landing inside an SQLite transaction used to leave the store locked: end_run('KILLED') then
    failed with 'database is locked' and the run stayed RUNNING. Held, it cuts no call short: every step the
    stage logged is whole, and the run ends KILLED."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for attempt in range(2):
        process = subprocess.Popen(
            [sys.executable, "-c", LOGGING_UNTIL_SIGNALLED],
            cwd=REPO,
            env=tool_env(MLFLOW_TRACKING_URI=uri),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline() == "logging\n"
        time.sleep(0.1 + 0.2 * attempt)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
        assert (process.returncode, stderr.strip().splitlines()[-1]) == (
            130,
            f"interrupted: signal {signal.Signals(signum).name}",
        )
    assert [run.info.status for run in runs(uri)] == ["KILLED", "KILLED"]
    client = MlflowClient(tracking_uri=uri)
    for run in runs(uri):
        steps = {name: [metric.step for metric in client.get_metric_history(run.info.run_id, name)] for name in "ab"}
        assert steps["a"] == steps["b"] == list(range(len(steps["a"]))) and steps["a"]


def test_full_disk_while_saving_fails_clearly_and_keeps_the_old_model(prepared, tmp_path, mlflow_server):
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models/seed-0.pt").write_bytes(b"the previous model")
    started = time.time()
    # 586 KiB (600 kB): the small files fit; the 800 kB state dict does not. (The store is a server: not limited.)
    env = tool_env(MLFLOW_TRACKING_URI=mlflow_server)
    result = run_tool(under_ulimit("-f", 586, train_command(prepared, out)), REPO, env, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write {out / 'models/seed-0.pt'}: File too large"
    assert (out / "models/seed-0.pt").read_bytes() == b"the previous model"
    assert sorted(path.name for path in out.rglob("*")) == ["models", "seed-0.pt"]  # no temp file left behind
    assert "train@base" not in statuses(mlflow_server, since=started)  # the runs are logged only after the outputs


def test_unreachable_tracking_server_fails_in_seconds_naming_it(tmp_path, tiny_dataset):
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.prepare",
            "--raw",
            str(tiny_dataset["dir"]),
            "--out",
            str(tmp_path / "p"),
            "--stats",
            str(tmp_path / "stats.json"),
        ],
        cwd=REPO,
        env=tool_env(MLFLOW_TRACKING_URI="http://127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 40
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLflow tracking at http://127.0.0.1:1 failed")
    assert not (tmp_path / "p").exists() and not (tmp_path / "stats.json").exists()


def test_two_trainings_at_once_share_the_embedded_store_and_agree(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = tool_env(MLFLOW_TRACKING_URI=uri)
    processes = [
        subprocess.Popen(
            train_command(prepared, tmp_path / name),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
        assert "database is locked" not in stderr
    assert {run.info.status for run in runs(uri)} == {"FINISHED"} and len(runs(uri)) == 4  # 2 variants, 2 seeds
    # Same seed on CPU: identical figures, apart from wall-clock time and run ids.
    volatile = {"mlflow_run_id", "train_seconds"}
    seeds = [
        {
            seed: {k: v for k, v in figures.items() if k not in volatile}
            for seed, figures in json.loads((tmp_path / name / "train.json").read_text())["per_seed"].items()
        }
        for name in ("a", "b")
    ]
    assert seeds[0] == seeds[1]
    assert comparable(tmp_path / "a/history.csv") == comparable(tmp_path / "b/history.csv")
    assert (tmp_path / "a/models/seed-0.pt").read_bytes() == (tmp_path / "b/models/seed-0.pt").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reproducibility_as_documented(prepared):
    """On CUDA the same seed gives the same weights at the start (drawn on the CPU) and the same shuffles
    (a seeded CUDA generator). The GEMMs are bit-identical run to run on the same GPU, driver and
    torch build (cuBLAS picks the same kernels); they are NOT bit-identical to the CPU or across GPU
    models, where accuracies agree only to about 1e-3."""
    from pipeline import config
    from pipeline.stages import train

    params = config.load(prepared["params"]).variant("base")
    data = [tensors.load_split(prepared["data"] / f"{split}.pt") for split in ("train", "validation")]
    first, second = (train.run(params, 0, *data).history for _ in range(2))
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    assert strip(first) == strip(second)


# --- kill -9 under dvc: nothing half-written, dvc sees the stage as changed, the rerun recovers ---


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory, mlflow_server) -> dict:
    """A repo copy on 20000 generated images: enough for a kill to land mid-write and mid-training."""
    import gzip
    import hashlib

    source = tmp_path_factory.mktemp("big_idx")
    sha256 = {}
    train, test = make_split(20000, seed=7), make_split(2000, seed=8)
    for kind, array in zip(prepare.FILE_KINDS, [train[0], train[1], test[0], test[1]]):
        data = idx_bytes(array)
        (source / f"{prepare.FILE_KINDS[kind]}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        sha256[kind] = hashlib.sha256(data).hexdigest()
    repo = copy_repo(tmp_path_factory.mktemp("big_repo"))
    edit_params(repo, tiny_params({"dir": source, "sha256": sha256}, epochs=6))
    edit_params(repo, lambda params: params.update(variants={"base": {"init_std": 0.01}}))
    edit_params(repo, lambda params: params["train"].update(seeds=[0]))
    env = tool_env(MLFLOW_TRACKING_URI=mlflow_server)
    run_tool(["dvc", "repro", "download"], repo, env)
    return {"repo": repo, "env": env}


def kill_dvc_when(repo: Path, env: dict, stage: str, ready) -> None:
    """Run only `stage` (forced, so it runs whatever ran before) and kill dvc and the stage when `ready()`."""
    process = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", stage],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(ready)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def snapshot(paths: list[Path]) -> dict:
    """What is at each path now (None when absent): a failed stage must leave exactly this."""

    def contents(path: Path):
        if path.is_dir():
            return {
                child.relative_to(path).as_posix(): child.read_bytes() for child in path.rglob("*") if child.is_file()
            }
        return path.read_bytes() if path.exists() else None

    return {path: contents(path) for path in paths}


def test_kill_9_during_prepare_leaves_nothing_half_written(big_repo):
    repo, env = big_repo["repo"], big_repo["env"]
    prepared_dir = repo / "data/prepared"
    kill_dvc_when(repo, env, "prepare", lambda: any(prepared_dir.glob(".tiny.*.tmpdir/train.pt")))
    assert not (prepared_dir / "tiny").exists()  # DVC removed the old output; nothing half-written took its place
    assert "prepare:" in run_tool(["dvc", "status", "dvc.yaml"], repo, env).stdout.splitlines()
    run_tool(["dvc", "repro", "prepare"], repo, env)
    assert not list(prepared_dir.glob(".tiny.*"))  # the killed run's temp dir is cleaned up
    images, labels = tensors.load_split(prepared_dir / "tiny/train.pt")
    assert images.shape == (19900, 784) and labels.shape == (19900,)  # 100 held out for validation
    assert abs(images.mean().item()) < 1e-4  # normalized with the train statistics
    prepare.run(repo / "data/raw/tiny", repo.parent / "uninterrupted", normalize=True, validation=100, seed=0)
    for split in ("train", "validation", "test"):  # the same tensors as a run nobody killed
        for recovered, reference in zip(
            tensors.load_split(prepared_dir / f"tiny/{split}.pt"),
            tensors.load_split(repo.parent / f"uninterrupted/{split}.pt"),
        ):
            assert torch.equal(recovered, reference)


def test_kill_9_during_train_keeps_the_old_outputs_and_resumes_to_the_uninterrupted_result(big_repo, tmp_path):
    repo, env = big_repo["repo"], big_repo["env"]
    run_tool(["dvc", "repro", "prepare"], repo, env)
    outputs = [repo / "models/base", repo / "results/base/train.json", repo / "results/base/history.csv"]
    before = snapshot(outputs)
    checkpoint = repo / "checkpoints/base/checkpoint.pt"  # the variant's seeds train together: one checkpoint
    kill_dvc_when(
        repo, env, "train@base", lambda: checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] >= 2
    )
    assert snapshot(outputs) == before  # persistent outputs: the last good ones stay
    if before[outputs[1]] is None:  # never trained before: dvc sees the stage as not done
        assert "train@base:" in run_tool(["dvc", "status", "dvc.yaml"], repo, env).stdout.splitlines()
    resumed = run_tool(["dvc", "repro", "--force", "--single-item", "train@base"], repo, env).stdout
    assert "resuming from checkpoints/base/checkpoint.pt after epoch" in resumed
    assert not checkpoint.exists()  # removed once the stage succeeded
    reference = tmp_path / "reference"
    prepared = {
        "data": repo / "data/prepared/tiny",
        "params": repo / "params.yaml",
        "stats": repo / "metrics/prepare.json",
    }
    run_tool(train_command(prepared, reference), REPO, env)
    assert comparable(repo / "results/base/history.csv") == comparable(reference / "history.csv")
    assert (repo / "models/base/seed-0.pt").read_bytes() == (reference / "models/seed-0.pt").read_bytes()


def stage_pid(repo: Path, variant: str) -> int | None:
    """The pid of the Python process of `variant`'s train stage under this repo, while it runs. The interpreter
    itself, never the shell DVC starts it with: dash (`/bin/sh` where SHELL is unset) does not exec a `-c`
    command, and killing that shell would leave the stage training on, orphaned."""
    import psutil

    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            arguments = process.info["cmdline"] or []  # dvc.yaml's command: python -m <stage> --variant <key> ...
            if arguments[1:5] == ["-m", "pipeline.stages.train", "--variant", variant] and process.cwd() == str(repo):
                return process.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize("edit", [True, False], ids=["next-repro-retrains", "next-repro-runs-nothing"])
def test_kill_9_of_the_stage_mid_training_then_dvc_repro_leaves_no_run_running(big_repo, edit):
    """Only the stage process dies (not dvc) while it trains: it opened no run yet, so none stays RUNNING,
    whether the next `dvc repro` retrains (the change is still pending) or runs nothing at all (a forced
    rerun of an unchanged stage was killed: its last good outputs are intact)."""
    repo, env = big_repo["repo"], big_repo["env"]
    uri = env["MLFLOW_TRACKING_URI"]
    original = (repo / "params.yaml").read_text()
    edit_params(repo, lambda params: params["train"].update(epochs=30))  # time to kill it mid-training
    run_tool(["dvc", "repro", "train@base"], repo, env)
    if edit:
        edit_params(repo, lambda params: params["variants"]["base"].update(lr=0.11))
    started = time.time()
    checkpoint = repo / "checkpoints/base/checkpoint.pt"
    try:
        process = subprocess.Popen(
            ["dvc", "repro", "--force", "--single-item", "train@base"], cwd=repo, env=env, stdout=subprocess.DEVNULL
        )
        try:
            wait_for(lambda: checkpoint.exists() and stage_pid(repo, "base"), interval=0.2)
            os.kill(stage_pid(repo, "base"), signal.SIGKILL)
        finally:
            assert process.wait(timeout=120) != 0  # dvc saw its stage die
        assert stage_pid(repo, "base") is None  # and no stage trains on behind its back
        assert [run.info.run_name for run in runs(uri, started)] == []  # killed mid-training: no run was opened
        output = run_tool(["dvc", "repro", "train@base"], repo, env).stdout
    finally:
        (repo / "params.yaml").write_text(original)
    assert ("Running stage 'train@base'" in output) == edit, output
    after = runs(uri, started)
    assert [run.info.run_name for run in after if run.info.status == "RUNNING"] == []
    assert sorted(run.info.run_name for run in after) == (["train@base", "train@base seed 0"] if edit else [])


def test_failing_stage_keeps_its_outputs_is_not_locked_and_stops_downstream(big_repo):
    repo, env = big_repo["repo"], big_repo["env"]
    run_tool(["dvc", "repro", "compare"], repo, env)  # a locked train@base and its outputs to keep
    outputs = [
        repo / "models/base",
        repo / "results/base/train.json",
        repo / "results/base/history.csv",
        repo / "reports/evaluation/base.json",
    ]
    before, lock_before, started = snapshot(outputs), (repo / "dvc.lock").read_text(), time.time()
    original = (repo / "params.yaml").read_text()
    edit_params(repo, lambda params: params["variants"]["base"].update(seeds=[5]))
    try:
        # A 586 KiB (600 kB) file-size limit, as on a full disk: the 800 kB checkpoint cannot be written.
        result = run_tool(under_ulimit("-f", 586, ["dvc", "repro", "compare"]), repo, env, check=False)
    finally:
        (repo / "params.yaml").write_text(original)
    assert result.returncode != 0
    assert "cannot write checkpoints/base/checkpoint.pt" in result.stdout + result.stderr
    assert "Running stage 'compare'" not in result.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train@base"] == yaml.safe_load(lock_before)["stages"]["train@base"]
    assert snapshot(outputs) == before  # nothing lost: the previous results are still in place
    assert "train@base" not in statuses(env["MLFLOW_TRACKING_URI"], since=started)  # it failed before logging
