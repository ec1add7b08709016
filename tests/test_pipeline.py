"""End to end: a real `dvc repro` on small IDX files in a copy of the repo, logging to a real `mlflow server`.

One module fixture plays the whole story once (first repro, a repro with nothing changed, a one-variant change,
a gate change) and records what each step showed; every test only reads that record, so each passes alone and
in any order.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest
import yaml

from tests.conftest import commit_all, copy_repo, edit_params, run_tool, tiny_params, tool_env

pytestmark = pytest.mark.integration

EXPERIMENT, MODEL = "d2l-story", "story-mlp"
DATA_STAGES = ["download", "prepare"]
VARIANTS = ("base", "scratch", "exploding")
VARIANT_STAGES = [f"{stage}@{variant}" for stage in ("train", "evaluate") for variant in VARIANTS]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def runs_by_name(client) -> dict:
    """The latest run of each name in the pipeline's experiment."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {}
    for run in sorted(client.search_runs([experiment.experiment_id]), key=lambda run: run.info.start_time):
        runs[run.info.run_name] = run
    return runs


def report(repo, env, *args: str):
    return run_tool([sys.executable, "-m", "pipeline.ci_report", *args], repo, env, check=False)


@pytest.fixture(scope="module")
def story(tmp_path_factory, tiny_dataset, mlflow_server):
    """What each step of a user's session showed, recorded once."""
    from mlflow import MlflowClient

    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    edit_params(repo, tiny_params(tiny_dataset))
    # Its own experiment and registered model: the session's MLflow server is shared with other modules.
    edit_params(repo, lambda params: params["mlflow"].update(experiment=EXPERIMENT, registered_model=MODEL))
    commit_all(repo, "tiny params")  # committed code and params: this run may move @champion
    env = tool_env(MLFLOW_TRACKING_URI=mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server)
    record = {"repo": repo, "uri": mlflow_server, "commit": run_tool(["git", "rev-parse", "HEAD"], repo).stdout.strip()}
    record["first"] = run_tool(["dvc", "repro"], repo, env).stdout
    record["files"] = {
        path.relative_to(repo).as_posix(): path.read_bytes()
        for folder in ("results", "reports", "models")
        for path in (repo / folder).rglob("*")
        if path.is_file()
    }
    record["lock"] = yaml.safe_load((repo / "dvc.lock").read_text())
    record["runs"] = runs_by_name(client)
    record["champion"] = client.get_model_version_by_alias(MODEL, "champion")
    commit_all(repo, "trained")
    before = len(client.search_runs([record["runs"]["compare"].info.experiment_id]))
    record["second"] = run_tool(["dvc", "repro"], repo, env).stdout
    record["runs_logged_by_second"] = len(client.search_runs([record["runs"]["compare"].info.experiment_id])) - before
    edit_params(repo, lambda params: params["variants"]["scratch"].update(lr=0.05))
    record["changed"] = run_tool(["dvc", "repro"], repo, env).stdout
    record["status_after_change"] = run_tool(["dvc", "status", "dvc.yaml"], repo, env).stdout
    record["report"] = report(repo, env, "--base", "HEAD")
    record["champion_after_change"] = client.get_model_version_by_alias(MODEL, "champion")
    record["challenger"] = client.get_model_version_by_alias(MODEL, "challenger")
    record["compare_run_after_change"] = runs_by_name(client)["compare"]
    commit_all(repo, "scratch lr 0.05")
    edit_params(repo, lambda params: params["evaluate"].update(max_train_loss=1e-9))
    record["gates_changed"] = run_tool(["dvc", "repro"], repo, env).stdout
    record["failing_report"] = report(repo, env, "--base", "HEAD")
    record["no_fail_report"] = report(repo, env, "--base", "HEAD", "--no-fail")
    return record


def read(story, path: str):
    return json.loads(story["files"][path])


def test_first_repro_runs_every_stage_and_writes_outputs(story):
    expected = DATA_STAGES + VARIANT_STAGES + ["compare", "init_scale", "linreg", "spiral"]
    assert sorted(stages_run(story["first"])) == sorted(expected)
    for path in [
        "models/base/seed-0.pt",
        "models/base/seed-1.pt",
        "reports/evaluation/scratch.json",
        "reports/evaluation/base-confusion.png",
        "reports/confusion/base.json",
        "reports/metrics.json",
        "reports/compare.md",
        "reports/curves.png",
        "reports/init_scale.json",
        "reports/init_scale.png",
    ]:
        assert path in story["files"], path
    stats = json.loads((story["repo"] / "metrics/prepare.json").read_text())
    assert (stats["train_count"], stats["validation_count"], stats["test_count"]) == (500, 100, 200)
    history = story["files"]["results/base/history.csv"].decode().splitlines()
    assert history[0].startswith("epoch,seeds,train_loss,train_loss_std,") and len(history) == 3


def test_every_stage_logged_one_run_with_its_lineage(story):
    runs = story["runs"]
    assert {"download", "prepare", "train@base", "train@scratch", "compare"} <= set(runs)
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["git_commit"] == story["commit"] and run.data.tags["git_dirty"] == "false", name
        assert run.data.tags["stage"] == name.split("@")[0].split(" ")[0], name
    assert runs["train@scratch"].data.tags["variant"] == "scratch"
    for path in story["files"]:  # the outputs point at no run: the runs point at the outputs (results_md5)
        assert b"mlflow_run_id" not in story["files"][path] and b"train_seconds" not in story["files"][path], path


def test_each_seed_is_a_nested_run_and_the_variant_run_holds_the_means(story):
    runs, train = story["runs"], read(story, "results/base/train.json")
    parent = runs["train@base"]
    train_md5 = hashlib.md5(story["files"]["results/base/train.json"]).hexdigest()
    locked = next(o["md5"] for o in story["lock"]["stages"]["train@base"]["outs"] if o["path"].endswith("train.json"))
    assert parent.data.tags["results_md5"] == train_md5 == locked and train["seeds"] == [0, 1]
    for seed in ("0", "1"):
        child = runs[f"train@base seed {seed}"]
        assert child.data.tags["results_md5"] == train_md5
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.tags["seed"] == seed
        assert "test_accuracy" in child.data.metrics and "validation_accuracy" in child.data.metrics
    assert parent.data.metrics["validation_accuracy_mean"] == pytest.approx(
        train["aggregate"]["validation_accuracy_mean"]
    )
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(
        read(story, "reports/evaluation/base.json")["test_accuracy_mean"]
    )
    assert parent.data.params["lr"] == "0.1" and parent.data.params["impl"] == "module"


def test_training_data_is_an_mlflow_dataset_whose_digest_is_the_dvc_hash(story):
    from mlflow import MlflowClient

    dvc_hash = next(
        out["md5"] for out in story["lock"]["stages"]["prepare"]["outs"] if out["path"] == "data/prepared/tiny"
    )
    run = MlflowClient(tracking_uri=story["uri"]).get_run(story["runs"]["train@base"].info.run_id)
    inputs = {entry.dataset.name: entry.dataset for entry in run.inputs.dataset_inputs}
    assert set(inputs) == {"tiny-train", "tiny-validation"}
    assert inputs["tiny-train"].digest == dvc_hash
    assert "data/prepared/tiny/train.pt" in inputs["tiny-train"].source


def test_diverged_variant_is_a_result_and_compare_still_runs(story):
    train = read(story, "results/exploding/train.json")
    assert train["diverged"] is True and all(seed["diverged_epoch"] == 1 for seed in train["per_seed"].values())
    assert "models/exploding/seed-0.pt" not in story["files"]
    assert json.loads(story["files"]["models/exploding/seed-0.json"])["diverged"] is True
    evaluation = read(story, "reports/evaluation/exploding.json")
    assert evaluation["passed"] is False and evaluation["test_accuracy_mean"] is None
    assert evaluation["finite_seeds"] == 0 and train["aggregate"]["validation_accuracy_mean"] is None
    assert "2 diverged" in story["files"]["reports/compare.md"].decode()
    assert read(story, "reports/compare.json")["champion"] in ("base", "scratch")
    run = story["runs"]["train@exploding seed 0"]
    assert run.data.tags["diverged"] == "true" and run.data.metrics["diverged"] == 1.0


def test_the_clean_run_registers_its_choice_as_champion_from_its_own_training_run(story):
    summary = read(story, "reports/compare.json")
    champion, runs = story["champion"], story["runs"]
    chosen = runs[f"train@{summary['champion']}"]
    assert champion.run_id == chosen.info.run_id
    assert runs["compare"].data.tags["champion_version"] == champion.version
    model_seed = read(story, f"results/{summary['champion']}/train.json")["model_seed"]
    assert chosen.data.tags["model_seed"] == str(model_seed)


def test_second_repro_runs_nothing_and_logs_nothing(story):
    assert stages_run(story["second"]) == [] and story["runs_logged_by_second"] == 0


def test_changing_one_variant_reruns_only_it_and_compare_and_leaves_the_champion(story):
    assert stages_run(story["changed"]) == ["train@scratch", "evaluate@scratch", "compare"]
    assert "up to date" in story["status_after_change"]
    assert story["champion_after_change"].version == story["champion"].version  # uncommitted params: challenger
    assert story["compare_run_after_change"].data.tags["challenger_version"] == story["challenger"].version


def test_report_shows_params_and_meaningful_metrics_diff_against_the_base(story):
    result = story["report"]
    assert result.returncode == 0, result.stderr
    assert "**PASS**" in result.stdout
    params_section = result.stdout.split("## Params changed")[1].split("## Metrics changed")[0]
    assert "variants.scratch.lr" in params_section and "0.05" in params_section
    metrics_section = result.stdout.split("## Metrics changed")[1].split("## Variants")[0]
    assert "reports/metrics.json" in metrics_section and "scratch." in metrics_section
    assert "base." not in metrics_section
    assert "run_id" not in metrics_section and "seconds" not in metrics_section
    assert "| scratch |" in result.stdout and "Champion: **" in result.stdout


def test_report_fails_when_no_variant_passes_unless_told_not_to(story):
    stages = stages_run(story["gates_changed"])
    assert "compare" in stages and not any(stage.startswith("train") for stage in stages)
    assert {f"evaluate@{variant}" for variant in VARIANTS} <= set(stages)
    failing = story["failing_report"]
    assert failing.returncode == 1 and "no variant passes the train gates" in failing.stdout
    assert "evaluate.max_train_loss" in failing.stdout
    assert story["no_fail_report"].returncode == 0
