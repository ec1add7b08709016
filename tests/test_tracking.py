"""Where runs go, what they say about their origin and owner, how they end, and which runs are orphans."""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline import cli, store, tracking
from pipeline.errors import PipelineError


@pytest.fixture(autouse=True)
def no_mlflow_leftovers(monkeypatch):
    """stage_run sets MLflow's global tracking URI and MLFLOW_EXPERIMENT_ID: undo both after each test."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    yield
    import mlflow

    mlflow.set_tracking_uri(None)


def test_an_experiments_copy_finds_the_workspace(tmp_path, monkeypatch):
    copy = tmp_path / "repo/.dvc/tmp/exps/run/abc123"
    copy.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.workspace_root(copy) == tmp_path / "repo"
    assert store.workspace_root(tmp_path / "repo") == tmp_path / "repo"
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_a_dvc_subproject_logs_to_the_repos_store(tmp_path, monkeypatch):
    """DVC sets DVC_ROOT to a subproject (lessons/mnist): its runs still go to the store at the git root."""
    (tmp_path / "repo/.git").mkdir(parents=True)
    lesson = tmp_path / "repo/lessons/mnist"
    (lesson / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(lesson))
    assert store.workspace_root() == tmp_path / "repo"
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert store.workspace_root(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # no git: where it started


def git(repo, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "CI", "GITHUB_REF"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_a_clean_workspace_run_may_move_the_champion(repo):
    tags = tracking.lineage_tags("train", "d2l")
    assert tags["git_commit"] == git(repo, "rev-parse", "HEAD") and tags["git_dirty"] == "false"
    assert tags["stage"] == "train" and tags["variant"] == "d2l" and "dvc_exp_name" not in tags


def test_dvcs_own_outputs_do_not_make_the_tree_dirty_but_params_do(repo):
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert tracking.lineage_tags("train")["git_dirty"] == "false"
    (repo / "params.yaml").write_text("a: 2\n")
    assert tracking.lineage_tags("train")["git_dirty"] == "true"


def test_a_lessons_untracked_outputs_do_not_make_the_tree_dirty_but_its_code_does(repo):
    (repo / "lessons/mnist/results/mlp_512").mkdir(parents=True)
    (repo / "lessons/mnist/results/mlp_512/eval.json").write_text("{}")  # what `dvc repro` there leaves
    (repo / "lessons/mnist/dvc.lock").write_text("schema: '2.0'\n")
    assert not tracking.code_dirty()
    (repo / "lessons/mnist/params.yaml").write_text("lr: 0.1\n")
    assert tracking.code_dirty()
    (repo / "lessons/mnist/params.yaml").unlink()
    (repo / "lessons/mnist/lesson.py").write_text("print(1)\n")
    assert tracking.code_dirty()


def test_an_experiment_is_tagged_with_its_name_and_baseline(repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lr-02")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    tags = tracking.lineage_tags("compare")
    assert tags["dvc_exp_name"] == "lr-02" and tags["git_commit"] == "0" * 40


def test_the_dvc_hash_of_an_output_comes_from_dvc_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("stages:\n  prepare:\n    outs:\n    - path: data/prepared/tiny\n      md5: abc.dir\n")
    assert tracking.dvc_hash("data/prepared/tiny", lock) == "abc.dir"
    assert tracking.dvc_hash("data/prepared/other", lock) is None
    assert tracking.dvc_hash("data/prepared/tiny", tmp_path / "missing.lock") is None


def test_a_store_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    with pytest.raises(PipelineError, match=r"^MLflow tracking at sqlite:///.*/file/mlflow.db failed: cannot create"):
        with tracking.stage_run("prepare", "d2l-mlp"):
            pass


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("gone", artifact_location=(tmp_path / "a").as_uri())
    mlflow.delete_experiment(experiment_id)
    with pytest.raises(PipelineError, match=rf"experiment 'gone' at {uri} is deleted; restore it .* {experiment_id}"):
        with tracking.stage_run("prepare", "gone"):
            pass
    with tracking.stage_run("prepare", "kept") as run:
        pass
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    kept = client.get_experiment_by_name("kept")
    assert kept.tags["mlflow.experimentKind"] == "custom_model_development"


# --- who owns a run, and which runs are orphans ---


def a_finished_process() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_owner_tags_name_this_process_of_this_boot():
    tags = tracking.owner_tags()
    assert tags["pid"] == str(os.getpid()) and tags["boot_id"] == tracking.boot_id()
    assert tags["pid_started"] == tracking.process_started(os.getpid()) is not None
    assert not tracking.orphaned(tags, tracking.boot_id())


def test_a_process_that_is_gone_or_a_later_process_with_its_pid_is_an_orphan():
    machine = tracking.boot_id()
    gone = {"boot_id": machine, "pid": str(a_finished_process()), "pid_started": "1"}
    assert tracking.process_started(int(gone["pid"])) is None and tracking.orphaned(gone, machine)
    reused = {**tracking.owner_tags(), "pid_started": "0"}  # this pid, but a process that started at another time
    assert tracking.orphaned(reused, machine)


def test_a_run_of_another_machine_or_without_owner_tags_is_never_an_orphan():
    gone = {"pid": str(a_finished_process()), "pid_started": "1"}
    assert not tracking.orphaned({**gone, "boot_id": "another machine's boot"}, tracking.boot_id())
    assert not tracking.orphaned({**gone, "host": socket.gethostname()}, tracking.boot_id())  # what runs used to carry


def test_psutil_reads_the_same_processes_as_proc():
    """The branch macOS takes, checked where both exist: it knows a live process and not a finished one."""
    assert tracking._psutil_started(os.getpid()) is not None
    assert tracking._psutil_started(a_finished_process()) is None


def test_close_orphans_ends_only_the_runs_of_processes_of_this_boot_that_are_gone(tmp_path, capsys):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("d2l-mlp", artifact_location=(tmp_path / "a").as_uri())
    other = client.create_experiment("a lesson", artifact_location=(tmp_path / "b").as_uri())
    here = tracking.owner_tags()
    gone = {**here, "pid": str(a_finished_process())}
    elsewhere = {**gone, "boot_id": "another machine's boot"}
    runs = {
        name: client.create_run(experiment, run_name=name, tags=tags).info.run_id
        for name, experiment, tags in [
            ("killed", experiment_id, gone),
            ("killed in a lesson", other, gone),
            ("alive", experiment_id, here),
            ("on another machine", experiment_id, elsewhere),
        ]
    }
    tracking.close_orphans(experiment_id)
    statuses = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert statuses == {
        "killed": "FAILED",
        "killed in a lesson": "FAILED",
        "alive": "RUNNING",
        "on another machine": "RUNNING",
    }
    assert capsys.readouterr().out.count("closed MLflow run") == 2


# --- how a run ends ---


@pytest.fixture
def store_uri(tmp_path, monkeypatch):
    """A store of the test's own, as MLFLOW_TRACKING_URI names it; stage_entry's handlers while the test runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    saved = {signum: signal.signal(signum, cli._interrupt) for signum in cli.HELD}
    yield uri
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def run_status(uri: str, run_id: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)


def test_a_logged_run_ends_finished_with_what_was_logged(store_uri):
    import mlflow

    with tracking.logged_run("prepare", "d2l-mlp") as run:
        mlflow.log_metric("mean", 0.5)
    finished = run_status(store_uri, run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics == {"mean": 0.5}
    assert finished.data.tags["boot_id"] == tracking.boot_id()


def test_a_signal_while_a_run_is_logged_waits_and_ends_the_run_killed(store_uri):
    """Nothing the block logs is cut short: the signal is raised after the run has ended KILLED."""
    import mlflow

    logged = []
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
        with tracking.logged_run("train", "d2l-mlp", variant="base") as run:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # to this thread, not any
            for step in range(20):
                mlflow.log_metrics({"a": step, "b": 2 * step}, step=step)
                logged.append(step)
    ended = run_status(store_uri, run.info.run_id)
    assert logged == list(range(20)) and ended.info.status == "KILLED"
    history = mlflow.MlflowClient(tracking_uri=store_uri).get_metric_history(run.info.run_id, "b")
    assert [metric.step for metric in history] == list(range(20))
    assert mlflow.active_run() is None


def test_an_error_ends_the_run_failed_and_an_interrupt_killed(store_uri):
    import mlflow

    with pytest.raises(ValueError), tracking.stage_run("prepare", "d2l-mlp") as failed:
        raise ValueError("a bug")
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("prepare", "d2l-mlp") as killed:
        raise KeyboardInterrupt
    with tracking.stage_run("train", "d2l-mlp"), tracking.child_runs({0: ("seed 0", {})}) as children:
        pass
    assert run_status(store_uri, failed.info.run_id).info.status == "FAILED"
    assert run_status(store_uri, killed.info.run_id).info.status == "KILLED"
    child = run_status(store_uri, children[0])
    assert child.info.status == "FINISHED" and child.data.tags["pid"] == str(os.getpid())
    assert mlflow.active_run() is None


def test_the_store_module_does_not_import_tracking():
    """One direction only: tracking uses the store; the store knows nothing of runs."""
    tree = ast.parse((Path(store.__file__)).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "tracking" not in imported and "pipeline.tracking" not in modules
