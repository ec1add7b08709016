"""A rerun of the whole pipeline rewrites the same bytes: what git and dvc.lock pin is what the inputs determine."""

from __future__ import annotations

import pytest

from tests.conftest import commit_all, copy_repo, edit_params, run_tool, tiny_params, tool_env

pytestmark = pytest.mark.integration


def test_a_forced_rerun_of_every_stage_leaves_the_tree_byte_identical(tmp_path, tiny_dataset):
    repo = copy_repo(tmp_path / "repo")
    edit_params(repo, tiny_params(tiny_dataset))
    commit_all(repo, "tiny params")
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = run_tool(["dvc", "repro"], repo, env).stdout
    assert "Running stage 'compare'" in first and "Running stage 'evaluate@base'" in first
    commit_all(repo, "results")
    second = run_tool(["dvc", "repro", "--force"], repo, env).stdout
    assert second.count("Running stage") == first.count("Running stage")  # every stage ran again
    changed = run_tool(["git", "status", "--porcelain"], repo, env).stdout
    assert changed == "", f"a rerun changed tracked files:\n{changed}"


def test_editing_tracking_or_the_store_reruns_no_training_or_evaluation(tmp_path, tiny_dataset):
    """Plumbing is no dep: `dvc status` after an edit of the tracking and store modules lists no train@ or
    evaluate@ stage (and an edit of the trainer does)."""
    repo = copy_repo(tmp_path / "repo")
    edit_params(repo, tiny_params(tiny_dataset))
    commit_all(repo, "tiny params")
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_tool(["dvc", "repro", "compare"], repo, env)
    for module in ("tracking.py", "store.py", "cli.py", "mlflow_runs.py"):
        with open(repo / "pipeline" / module, "a") as file:
            file.write("\n# an edit that changes no figure\n")
    status = run_tool(["dvc", "status", "compare"], repo, env).stdout
    assert "up to date" in status, status
    with open(repo / "pipeline" / "batched.py", "a") as file:
        file.write("\n# an edit of the trainer\n")
    status = run_tool(["dvc", "status", "compare"], repo, env).stdout
    assert "train@base" in status and "evaluate@base" in status, status
