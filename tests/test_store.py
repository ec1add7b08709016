"""The embedded MLflow store: a copied repo logs into its own copy, the store is backed up and restored, and it
fails in one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline import store, tracking
from pipeline.errors import PipelineError
from tests.conftest import REPO, tool_env

MODEL_FILES = {"MLmodel": "flavors: {}\n", "weights.bin": "the weights of repo A"}


def make_store(root: Path) -> None:
    """What the stages leave in repo A: a run with an artifact, its logged model as version 1 of d2l-mlp
    under @champion, all in mlflow.db with artifacts in mlartifacts/."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # the registry resolves models:/m-... through the global URI
    try:
        _log_champion(MlflowClient(), root)
    finally:
        mlflow.set_tracking_uri(None)


def _log_champion(client, root: Path) -> None:
    experiment_id = client.create_experiment("d2l-mlp", artifact_location=store.artifact_root(root / "mlflow.db"))
    run_id = client.create_run(experiment_id, run_name="train@base").info.run_id
    client.log_text(run_id, "notes of repo A", "notes.txt")
    model_id = client.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id
    files = root.parent / "model_files"
    files.mkdir()
    for name, text in MODEL_FILES.items():
        (files / name).write_text(text)
    client.log_model_artifacts(model_id, str(files))
    client.finalize_logged_model(model_id, "READY")
    client.set_terminated(run_id)
    client.create_registered_model("d2l-mlp")
    version = client.create_model_version("d2l-mlp", f"models:/{model_id}", run_id=run_id, model_id=model_id)
    client.set_registered_model_alias("d2l-mlp", "champion", version.version)


@pytest.fixture(scope="module")
def repo_a(tmp_path_factory) -> Path:
    """Built once; a test that changes it works on its own copy (copy_of)."""
    root = tmp_path_factory.mktemp("repo_a") / "repo"
    root.mkdir()
    make_store(root)
    return root


def copy_of(repo: Path, destination: Path) -> Path:
    """`cp -a repo destination`, as a user copies a repo."""
    shutil.copytree(repo, destination, symlinks=True)
    return destination


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sqlite_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


@pytest.fixture
def global_tracking(monkeypatch):
    """Code that uses MLflow's global tracking URI (stage_run, compare) runs against a test's store, then not."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield mlflow
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment, for subprocesses to inherit


# --- a copied store: new runs beside the copy, nothing written into the original ---


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` and its digest."""
    return {path.relative_to(root).as_posix(): digest(path) for path in sorted(root.rglob("*")) if path.is_file()}


def register_champion(client, experiment_id: str, files: Path) -> None:
    """A model logged in the active store's experiment, registered and moved to @champion, as compare does."""
    run_id = client.create_run(experiment_id, run_name="compare").info.run_id
    model_id = client.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id
    files.mkdir()
    for name, text in MODEL_FILES.items():
        (files / name).write_text(text.replace("repo A", "repo B"))
    client.log_model_artifacts(model_id, str(files))
    client.finalize_logged_model(model_id, "READY")
    client.set_terminated(run_id)
    version = client.create_model_version("d2l-mlp", f"models:/{model_id}", run_id=run_id, model_id=model_id)
    client.set_registered_model_alias("d2l-mlp", "champion", version.version)


def test_a_stage_in_a_copied_repo_logs_into_the_copy_and_writes_nothing_into_the_original(
    repo_a, tmp_path, monkeypatch, global_tracking, capsys
):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    repo_b = copy_of(repo_a, tmp_path / "b")
    before = {"db": digest(repo_a / "mlflow.db"), "artifacts": tree(repo_a / "mlartifacts")}
    monkeypatch.setenv("DVC_ROOT", str(repo_b))  # the workspace root, as under dvc repro
    with tracking.logged_run("compare", "d2l-mlp") as run:
        global_tracking.log_text("logged in repo B", "compare.md")
        register_champion(MlflowClient(), run.info.experiment_id, tmp_path / "files")
    copied_name = f"d2l-mlp (logged in {repo_a}, id 1)"
    assert capsys.readouterr().out == (
        f"MLflow experiment 'd2l-mlp' keeps its artifacts in another copy of this store "
        f"({store.artifact_root(repo_a / 'mlflow.db')}): renamed it {copied_name!r}; "
        f"new runs go to {store.artifact_root(repo_b / 'mlflow.db')}\n"
    )
    assert (repo_b / f"mlartifacts/{run.info.run_id}/artifacts/compare.md").read_text() == "logged in repo B"
    assert {"db": digest(repo_a / "mlflow.db"), "artifacts": tree(repo_a / "mlartifacts")} == before
    assert len(store.backups(repo_b / "mlflow.db")) == 1  # the stage backed the store up before MLflow opened it

    client = MlflowClient()
    copied = client.get_experiment_by_name(copied_name)  # the history, still read from where it was logged
    notes = download_artifacts(
        run_id=client.search_runs([copied.experiment_id])[0].info.run_id, artifact_path="notes.txt"
    )
    assert Path(notes).read_text() == "notes of repo A"
    aside = repo_a.parent / "mlartifacts.aside"
    (repo_a / "mlartifacts").rename(aside)  # what B registered can only come from B
    try:
        champion = Path(download_artifacts("models:/d2l-mlp@champion", dst_path=str(tmp_path / "download")))
    finally:
        aside.rename(repo_a / "mlartifacts")  # the module's repo A, as it was
    assert (champion / "weights.bin").read_text() == "the weights of repo B"
    with tracking.logged_run("compare", "d2l-mlp") as again:
        pass
    assert again.info.experiment_id == run.info.experiment_id and "renamed" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("location", "elsewhere"),
    [
        ("file:///old/repo/mlartifacts", True),
        ("file:///old/repo/mlartifacts/", True),
        ("file:///new/repo/mlartifacts", False),  # this store's own
        ("file:///old/repo/mlruns/0", False),  # MLflow's Default experiment
        ("file:///old/repo/mlartifacts_2", False),
        ("s3://bucket/mlartifacts", False),  # chosen by a user
        ("mlflow-artifacts:/mlartifacts", False),
    ],
)
def test_only_experiments_made_beside_another_copy_of_the_store_are_set_aside(location, elsewhere):
    assert tracking._logged_elsewhere(location, "file:///new/repo/mlartifacts") is elsewhere


# --- compare refuses a champion whose files are gone ---


def test_compare_refuses_a_model_whose_artifacts_are_missing(tmp_path, global_tracking):
    from pipeline.stages import compare

    root = tmp_path / "repo"
    root.mkdir()
    make_store(root)
    global_tracking.set_tracking_uri(sqlite_uri(root))
    model_uri = global_tracking.MlflowClient().get_model_version_by_alias("d2l-mlp", "champion").source
    compare._check_artifacts(model_uri)  # all there
    shutil.rmtree(root / "mlartifacts/models")
    with pytest.raises(PipelineError) as raised:
        compare._check_artifacts(model_uri)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"compare: refusing to register {model_uri}: its artifacts are missing")


# --- backups ---


def test_a_truncated_store_is_restored_from_its_backup(repo_a, tmp_path):
    from mlflow import MlflowClient

    db = copy_of(repo_a, tmp_path / "b") / "mlflow.db"
    backup = store.backup(db)
    assert store.backups(db) == [backup]
    half = db.stat().st_size // 2
    os.truncate(db, half)
    with pytest.raises(PipelineError, match="is damaged"), sqlite3.connect(db) as connection:
        store._check(connection, db)
    aside = store.restore(db, store.newest_backup(db))
    assert aside.name.startswith("mlflow.db.broken-") and aside.stat().st_size == half
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("d2l-mlp").experiment_id])
    assert [run.info.run_name for run in runs] == ["train@base"]


def test_restore_refuses_a_damaged_backup_and_leaves_the_store(repo_a, tmp_path):
    db = copy_of(repo_a, tmp_path / "b") / "mlflow.db"
    backup = store.backup(db)
    os.truncate(backup, backup.stat().st_size // 2)
    before = digest(db)
    with pytest.raises(PipelineError, match=f"{backup} is damaged"):
        store.restore(db, backup)
    assert digest(db) == before and not list(db.parent.glob("mlflow.db.broken-*"))


def test_backups_are_taken_when_due_and_only_the_last_five_kept(repo_a, tmp_path):
    db = copy_of(repo_a, tmp_path / "b") / "mlflow.db"
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    taken = [store.backup(db, now=an_hour_ago + timedelta(minutes=minute)) for minute in range(7)]
    assert store.backups(db) == taken[2:]
    newest = store.backup_if_due(db)  # the newest is 54 minutes old
    assert newest is not None and store.backups(db) == [*taken[3:], newest]
    assert store.backup_if_due(db) is None  # one was just taken


def test_a_failed_backup_is_a_warning(repo_a, tmp_path, capsys):
    db = copy_of(repo_a, tmp_path / "b") / "mlflow.db"
    (db.parent / store.BACKUPS).write_text("a file where the backup directory should be")
    assert store.backup_if_due(db) is None
    assert capsys.readouterr().out.startswith(f"warning: could not back up the MLflow store {db}: ")


# --- a locked or damaged store, seen from a stage process ---

LOGGING_FOREVER = """
from pipeline import tracking
from pipeline.cli import stage_entry


@stage_entry
def main():
    with tracking.logged_run("train", "d2l-mlp"):
        import mlflow

        print("logging", flush=True)
        for step in range(10**9):
            mlflow.log_metrics({"a": step}, step=step)


main()
"""

ONE_STAGE = """
from pipeline import tracking
from pipeline.cli import stage_entry


@stage_entry
def main():
    with tracking.logged_run("train", "d2l-mlp"):
        import mlflow

        mlflow.log_metric("a", 1.0)


main()
"""


def stage_process(script: str, workspace: Path) -> subprocess.Popen:
    """A stage (the script) whose workspace root, and so embedded store, is `workspace`."""
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=tool_env(DVC_ROOT=str(workspace)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stderr_lines(stderr: str) -> list[str]:
    """What the stage itself said on stderr (MLflow's INFO lines about creating its tables aside)."""
    return [line for line in stderr.splitlines() if " INFO mlflow" not in line]


def run_statuses(workspace: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(workspace))
    runs = client.search_runs([client.get_experiment_by_name("d2l-mlp").experiment_id], order_by=["start_time"])
    return [run.info.status for run in runs]


@pytest.mark.integration
def test_a_store_locked_by_another_process_fails_the_stage_in_one_line_and_the_next_stage_closes_its_run(tmp_path):
    db = tmp_path / "mlflow.db"
    process = stage_process(LOGGING_FOREVER, tmp_path)
    try:
        assert process.stdout.readline() == "logging\n"
        holder = sqlite3.connect(db, timeout=30, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # as a stuck writer would
        stdout, stderr = process.communicate(timeout=120)  # MLflow waits 20 s for the lock, then gives up
        holder.execute("ROLLBACK")
        holder.close()
    finally:
        process.kill()
    assert process.returncode == 2, stderr
    expected = f"error: MLflow tracking at sqlite:///{db} failed: (sqlite3.OperationalError) database is locked"
    assert stderr_lines(stderr) == [expected]
    assert "warning: could not end the MLflow run as FAILED: (sqlite3.OperationalError) database is locked" in stdout
    assert run_statuses(tmp_path) == ["RUNNING"]
    after = stage_process(ONE_STAGE, tmp_path)
    stdout, stderr = after.communicate(timeout=120)
    assert after.returncode == 0, stderr
    assert "closed MLflow run" in stdout
    assert run_statuses(tmp_path) == ["FAILED", "FINISHED"]


@pytest.mark.integration
def test_a_truncated_store_fails_the_stage_in_one_line_and_restore_brings_it_back(repo_a, tmp_path):
    workspace = copy_of(repo_a, tmp_path / "b")
    db = workspace / "mlflow.db"
    store.backup(db)
    os.truncate(db, db.stat().st_size // 2)
    failed = stage_process(ONE_STAGE, workspace)
    _, stderr = failed.communicate(timeout=120)
    assert failed.returncode == 2
    expected = (
        f"error: MLflow tracking at sqlite:///{db} failed: (sqlite3.DatabaseError) database disk image is malformed; "
        "python -m pipeline.store restore puts back the newest backup"
    )
    assert stderr_lines(stderr) == [expected]
    restore = subprocess.run(
        [sys.executable, "-m", "pipeline.store", "restore"],
        cwd=REPO,
        check=False,
        env=tool_env(DVC_ROOT=str(workspace)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert restore.returncode == 0, restore.stderr
    assert restore.stdout.startswith(f"restored {db} from {store.newest_backup(db)}; the store it replaced is ")
    again = stage_process(ONE_STAGE, workspace)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert run_statuses(workspace) == ["FINISHED"]  # in the copy's own experiment: repo A's run is set aside
