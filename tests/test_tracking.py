"""Where runs go and what they say about their origin: the workspace's store, lineage tags, the promotion policy."""

from __future__ import annotations

import subprocess

import pytest

from pipeline import tracking
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
    assert tracking.workspace_root(copy) == tmp_path / "repo"
    assert tracking.workspace_root(tmp_path / "repo") == tmp_path / "repo"
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
    assert tracking.workspace_root() == tmp_path / "repo"
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking.workspace_root(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # no git: where it started


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
    assert tracking.promotable()[0]


def test_dvcs_own_outputs_do_not_make_the_tree_dirty_but_params_do(repo):
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert tracking.lineage_tags("train")["git_dirty"] == "false" and tracking.promotable()[0]
    (repo / "params.yaml").write_text("a: 2\n")
    assert tracking.lineage_tags("train")["git_dirty"] == "true"
    assert tracking.promotable() == (False, "code or params not committed")


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


def test_an_experiment_is_tagged_with_its_name_and_baseline_and_registers_a_challenger(repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lr-02")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    tags = tracking.lineage_tags("compare")
    assert tags["dvc_exp_name"] == "lr-02" and tags["git_commit"] == "0" * 40
    assert tracking.promotable() == (False, "a DVC experiment (lr-02)")


def test_ci_moves_the_champion_only_on_main(repo, monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("GITHUB_REF", "refs/pull/7/merge")
    assert not tracking.promotable()[0]
    monkeypatch.setenv("GITHUB_REF", "refs/heads/main")
    assert tracking.promotable()[0]


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
