"""DVC experiments and MLflow joined both ways: workspace, --temp and queued runs (two workers) all land in the
workspace's embedded store, tagged with their experiment, and none of them moves @champion.

One module fixture runs the real commands once and records what they showed; the tests only read that record.
"""

from __future__ import annotations

import json
import re
import shlex
import time

import pytest

from tests.conftest import REPO, commit_all, copy_repo, edit_params, run_tool, tiny_params, tool_env

pytestmark = pytest.mark.integration

QUEUE_WAIT_S = 900


def readme_exp_lines() -> list[str]:
    """Every `dvc exp run ... -S ...` line in README's shell code blocks."""
    lines, fence = [], None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in ("sh", "bash", "") and line.startswith("dvc exp run") and " -S " in line:
            lines.append(line.split("#")[0].strip())
    return lines


def test_the_readme_shows_exp_run_lines():
    assert any("+variants." in line for line in readme_exp_lines())


def small_params(tiny: dict):
    """The tiny dataset with README's variant names, two epochs and one seed: quick enough to run many times."""

    def change(params: dict) -> None:
        tiny_params(tiny, epochs=2)(params)
        params["train"]["seeds"] = [0]
        params["variants"] = {"d2l": {"init_std": 0.01}, "d2l_scratch": {"impl": "scratch"}}

    return change


def wait_for_queue(repo, env) -> str:
    deadline = time.monotonic() + QUEUE_WAIT_S
    while time.monotonic() < deadline:
        status = run_tool(["dvc", "queue", "status"], repo, env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(3)
    raise AssertionError(f"queued experiments still running after {QUEUE_WAIT_S} s:\n{status}")


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, tiny_dataset):
    from mlflow import MlflowClient

    repo = copy_repo(tmp_path_factory.mktemp("exp_repo"))
    edit_params(repo, small_params(tiny_dataset))
    commit_all(repo, "small params")
    env = tool_env()  # no MLFLOW_TRACKING_URI: the embedded store at the workspace root
    run_tool(["dvc", "repro"], repo, env)
    commit_all(repo, "results")  # as a user would: the baseline has its results, so --only-changed means changed
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    record = {
        "repo": repo,
        "client": client,
        "readme": {},
        "champion": client.get_model_version_by_alias("d2l-mlp", "champion").version,
    }
    for line in readme_exp_lines():  # as written; a --queue line runs with the queue below
        record["readme"][line] = run_tool(shlex.split(line), repo, env, check=False)
        run_tool(["git", "checkout", "--", "."], repo, env)  # a workspace experiment leaves its changes there
        run_tool(["dvc", "checkout", "--force"], repo, env)
    record["temp"] = run_tool(
        ["dvc", "exp", "run", "--temp", "--name", "temp-lr", "-S", "+variants.d2l.lr=0.3"], repo, env, check=False
    )
    for index, lr in enumerate(("0.02", "0.04", "0.08")):
        run_tool(
            ["dvc", "exp", "run", "--queue", "--name", f"queued-{index}", "-S", f"+variants.d2l.lr={lr}"], repo, env
        )
    run_tool(["dvc", "queue", "start", "-j", "2"], repo, env)
    record["queue_status"] = wait_for_queue(repo, env)
    record["show"] = run_tool(["dvc", "exp", "show", "--only-changed", "--no-pager"], repo, {**env, "COLUMNS": "200"})
    record["show_json"] = json.loads(run_tool(["dvc", "exp", "show", "--json"], repo, env).stdout)
    record["champion_after"] = client.get_model_version_by_alias("d2l-mlp", "champion").version
    record["round_trip"] = round_trip(repo, env)
    yield record
    run_tool(["dvc", "queue", "stop", "--kill"], repo, env, check=False)


def round_trip(repo, env) -> str:
    """`dvc exp run --temp`, `dvc exp apply`, then what `dvc repro` ran. The lr is small enough to change the
    confusion matrices (at the default lr every variant is perfect on the tiny data)."""
    run_tool(["dvc", "exp", "run", "--temp", "--name", "round-trip", "-S", "+variants.d2l.lr=0.0005"], repo, env)
    run_tool(["dvc", "exp", "apply", "round-trip"], repo, env)
    return run_tool(["dvc", "repro"], repo, env).stdout


def test_every_output_git_keeps_is_committable():
    """An uncached output (cache: false) that git ignores is in neither git nor DVC's cache: `dvc exp apply`
    cannot bring it back from an experiment, and the next `dvc repro` reruns its stage."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        outputs = [str(out.fs_path) for stage in repo.index.stages for out in stage.outs if not out.use_cache]
    ignored = run_tool(["git", "check-ignore", "--no-index", *outputs], REPO, check=False).stdout.split()
    assert outputs and ignored == []


def test_an_applied_temp_experiment_needs_no_rerun(experiments):
    assert "Running stage" not in experiments["round_trip"], experiments["round_trip"]


def train_runs(client) -> list:
    experiment = client.get_experiment_by_name("d2l-mlp")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'train'")


def test_readme_exp_run_lines_work_as_written(experiments):
    for line, result in experiments["readme"].items():
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"


def test_temp_and_queued_experiments_succeed(experiments):
    assert experiments["temp"].returncode == 0, experiments["temp"].stderr[-3000:]
    assert "Failed" not in experiments["queue_status"], experiments["queue_status"]
    assert experiments["queue_status"].count("Success") >= 3, experiments["queue_status"]


def test_every_experiment_logged_into_the_workspace_store_with_its_name(experiments):
    names = {run.data.tags.get("dvc_exp_name") for run in train_runs(experiments["client"])}
    assert {"temp-lr", "queued-0", "queued-1", "queued-2"} <= names
    assert not list((experiments["repo"] / ".dvc/tmp/exps").rglob("mlflow.db"))  # no store inside a copy


def test_experiment_runs_point_at_the_baseline_commit_and_say_the_tree_was_changed(experiments):
    baseline = run_tool(["git", "rev-parse", "HEAD"], experiments["repo"]).stdout.strip()
    for run in train_runs(experiments["client"]):
        if run.data.tags.get("dvc_exp_name", "").startswith("queued-"):
            assert run.data.tags["git_commit"] == baseline and run.data.tags["git_dirty"] == "true"


def test_nothing_is_left_running(experiments):
    client = experiments["client"]
    experiment = client.get_experiment_by_name("d2l-mlp")
    assert client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") == []


def test_experiments_register_challengers_and_leave_the_champion(experiments):
    assert experiments["champion_after"] == experiments["champion"]
    challenger = experiments["client"].get_model_version_by_alias("d2l-mlp", "challenger")
    assert int(challenger.version) > int(experiments["champion"])


def test_exp_show_only_changed_fits_200_columns_and_lists_no_run_ids(experiments):
    output = experiments["show"].stdout
    assert max(len(line) for line in output.splitlines()) <= 200, output
    assert "run_id" not in output and "seconds" not in output
    # the changed metrics are shown, per variant (reports/metrics.json); accuracy is 1.0 on the tiny data
    assert re.search(r"\b\w+\.train_loss\b", output), output


def test_the_experiment_kind_opens_the_training_view(experiments):
    experiment = experiments["client"].get_experiment_by_name("d2l-mlp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
