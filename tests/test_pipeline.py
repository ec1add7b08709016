"""End to end: a real `dvc repro` on small IDX files in a copy of the repo, logging to a real `mlflow server`."""
from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import copy_repo, edit_params, run_tool, tiny_params, tool_env

DATA_STAGES = ["download", "prepare"]
VARIANT_STAGES = [f"{stage}@{variant}" for stage in ("train", "evaluate") for variant in ("base", "scratch", "exploding")]


def commit_all(repo, message: str) -> None:
    run_tool(["git", "add", "-A"], repo)
    run_tool(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], repo)


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_dataset, mlflow_server):
    """The repo copy after one full `dvc repro`, with its env and first output."""
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    edit_params(repo, tiny_params(tiny_dataset))
    env = tool_env(MLFLOW_TRACKING_URI=mlflow_server)
    first = run_tool(["dvc", "repro"], repo, env)
    commit_all(repo, "trained")
    return {"repo": repo, "env": env, "uri": mlflow_server, "first": first.stdout}


@pytest.fixture(scope="module")
def client(pipeline):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=pipeline["uri"])


def runs_by_name(client) -> dict:
    experiment = client.get_experiment_by_name("d2l-mlp")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def test_first_repro_runs_every_stage_and_writes_outputs(pipeline):
    # lessons/mnist/dvc.yaml is not the default target: no MNIST stage runs.
    assert sorted(stages_run(pipeline["first"])) == sorted(DATA_STAGES + VARIANT_STAGES + ["compare", "linreg", "spiral"])
    repo = pipeline["repo"]
    for path in ["data/raw/tiny/train-images-idx3-ubyte", "data/prepared/tiny/train.pt", "metrics/prepare.json",
                 "models/base/model.pt", "results/scratch/eval.json", "results/base/confusion.png",
                 "reports/compare.md", "reports/curves.png"]:
        assert (repo / path).is_file(), path
    stats = json.loads((repo / "metrics/prepare.json").read_text())
    assert stats["train_count"] == 600 and stats["test_count"] == 200 and stats["normalize"] is True
    history = (repo / "results/base/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds" and len(history) == 3


def test_every_stage_logged_one_tagged_run(pipeline, client):
    runs = runs_by_name(client)
    assert {"download", "prepare", "train@base", "train@scratch", "compare"} <= set(runs)
    commit = run_tool(["git", "rev-parse", "HEAD~1"], pipeline["repo"]).stdout.strip()  # HEAD is "trained"
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["git_commit"] == commit
    assert runs["download"].data.params["train_images.sha256"] == json.loads(
        (pipeline["repo"] / "data/raw/tiny.json").read_text())["files"]["train_images"]["sha256"]
    assert runs["train@scratch"].data.tags["variant"] == "scratch"
    assert runs["train@base"].data.tags["device"] == "cpu"  # device: auto on a machine without a GPU


def test_diverged_variant_is_a_result_and_compare_still_runs(pipeline, client):
    repo = pipeline["repo"]
    train = json.loads((repo / "results/exploding/train.json").read_text())
    assert train["diverged"] is True and train["diverged_epoch"] == 1 and train["diverged_step"] >= 1
    assert not (repo / "models/exploding/model.pt").exists()
    assert json.loads((repo / "models/exploding/model.json").read_text())["diverged"] is True
    evaluation = json.loads((repo / "results/exploding/eval.json").read_text())
    assert evaluation["passed"] is False and evaluation["test_accuracy"] is None
    assert "FAIL: diverged at epoch 1" in (repo / "reports/compare.md").read_text()
    summary = json.loads((repo / "reports/compare.json").read_text())
    assert summary["champion"] in ("base", "scratch")
    run = runs_by_name(client)["train@exploding"]
    assert run.data.tags["diverged"] == "true" and run.data.metrics["diverged"] == 1.0


def test_variant_run_holds_params_step_metrics_and_evaluation(pipeline, client):
    run = runs_by_name(client)["train@base"]
    train = json.loads((pipeline["repo"] / "results/base/train.json").read_text())
    assert train["mlflow_run_id"] == run.info.run_id
    assert run.data.params["lr"] == "0.1" and run.data.params["impl"] == "module"
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps == [1, 2]
    evaluation = json.loads((pipeline["repo"] / "results/base/eval.json").read_text())
    assert run.data.metrics["eval_test_accuracy"] == pytest.approx(evaluation["test_accuracy"])
    assert "gate_train_loss" in run.data.metrics and run.data.tags["gates"] in ("pass", "fail")


def test_logged_and_registered_models_load_and_predict(pipeline, client):
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(pipeline["uri"])
    x = torch.rand(3, 784)
    run = runs_by_name(client)["train@base"]
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert logged(x).shape == (3, 10)
    summary = json.loads((pipeline["repo"] / "reports/compare.json").read_text())
    champion = client.get_model_version_by_alias("d2l-mlp", "champion")
    assert champion.run_id == summary["variants"][summary["champion"]]["mlflow_run_id"]
    registered = mlflow.pytorch.load_model("models:/d2l-mlp@champion")
    assert registered(x).argmax(1).shape == (3,)


def test_second_repro_runs_nothing_and_logs_nothing(pipeline, client):
    before = len(runs_by_name(client))
    output = run_tool(["dvc", "repro"], pipeline["repo"], pipeline["env"]).stdout
    assert stages_run(output) == []
    assert len(runs_by_name(client)) == before


def test_changing_one_variant_reruns_only_it_and_compare(pipeline, client):
    edit_params(pipeline["repo"], lambda params: params["variants"]["scratch"].update(lr=0.05))
    output = run_tool(["dvc", "repro"], pipeline["repo"], pipeline["env"]).stdout
    assert stages_run(output) == ["train@scratch", "evaluate@scratch", "compare"]
    status = run_tool(["dvc", "status", "dvc.yaml"], pipeline["repo"], pipeline["env"]).stdout  # not lessons/mnist
    assert "up to date" in status


def report(pipeline, *args: str):
    return run_tool([sys.executable, "-m", "pipeline.ci_report", *args], pipeline["repo"], pipeline["env"], check=False)


def test_report_shows_params_and_metrics_diff_against_the_base(pipeline):
    result = report(pipeline, "--base", "HEAD")  # after the variant change above, uncommitted
    assert result.returncode == 0, result.stderr
    assert "**PASS**" in result.stdout
    params_section = result.stdout.split("## Params changed")[1].split("## Metrics changed")[0]
    assert "variants.scratch.lr" in params_section and "0.05" in params_section
    metrics_section = result.stdout.split("## Metrics changed")[1].split("## Variants")[0]
    assert "results/scratch/train.json" in metrics_section and "results/base/train.json" not in metrics_section
    assert "| scratch |" in result.stdout and "Champion: **" in result.stdout


def test_report_fails_when_no_variant_passes_unless_told_not_to(pipeline):
    commit_all(pipeline["repo"], "scratch lr 0.05")
    edit_params(pipeline["repo"], lambda params: params["evaluate"].update(max_train_loss=1e-9))
    output = run_tool(["dvc", "repro"], pipeline["repo"], pipeline["env"]).stdout
    assert "compare" in stages_run(output) and not any(stage.startswith("train") for stage in stages_run(output))
    failing = report(pipeline, "--base", "HEAD")
    assert failing.returncode == 1 and "no variant passes its gates" in failing.stdout
    assert "evaluate.max_train_loss" in failing.stdout
    assert report(pipeline, "--base", "HEAD", "--no-fail").returncode == 0
