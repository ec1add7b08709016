"""The phase diagram: its grid and answer, a tiny grid through the real stage (`dvc repro studies/dvc.yaml:...`) in
a copy of the repo, which the default `dvc repro` never starts, and the same grid on a two-node Ray cluster."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from pipeline import config
from pipeline.stages import phase_diagram
from tests.conftest import REPO, commit_all, copy_repo, edit_params, run_tool, tiny_params, tool_env
from tests.test_dvc_yaml import PLUMBING, imported_modules, module_file

STUDIES = yaml.safe_load((REPO / "studies/dvc.yaml").read_text())
PARAMS = config.load(REPO / "params.yaml")


def test_the_grid_is_every_input_and_lr_times_the_studys_points_and_seeds():
    section = dataclasses.replace(PARAMS.phase_diagram, lrs=(0.1, 1.0), seeds=(0, 1))
    work = phase_diagram.chunks(section, PARAMS.init_scale, PARAMS.train)
    assert [(chunk.inputs, chunk.recipe.lr) for chunk in work] == [
        ("standardized", 0.1), ("standardized", 1.0), ("pixels", 0.1), ("pixels", 1.0)]  # fmt: skip
    points = phase_diagram.grid(PARAMS.init_scale)
    assert len(points) == 9 and points[-1].label == "pytorch default"  # 7 stds, the mixed point, PyTorch's
    assert work[0].inits[:2] == ((0.001, 0.001),) * 2 and work[0].seeds[:4] == (0, 1, 0, 1)
    assert len(work[0].inits) == 9 * 2 and work[0].epochs == 10


def test_the_defaults_are_the_issues_grid():
    section = PARAMS.phase_diagram
    assert section.lrs == (0.01, 0.03, 0.1, 0.3, 1.0) and len(section.seeds) >= 3 and section.epochs == 10
    assert set(section.inputs) == {"standardized", "pixels"} and section.precision == "fp32"


def test_the_answer_lists_the_lrs_where_std_1_passes():
    cells = [{"point": "std 1", "lr": lr, "gate_pass_fraction": fraction, "train_loss_mean": loss}
             for lr, fraction, loss in ((0.1, 0.0, 0.9), (0.3, 0.5, 0.6), (1.0, 1.0, 0.4))]  # fmt: skip
    cells.append({"point": "std 0.01", "lr": 0.1, "gate_pass_fraction": 1.0, "train_loss_mean": 0.3})
    assert phase_diagram.answer(cells) == {
        "std_1_all_seeds_pass_lrs": [1.0],
        "std_1_any_seed_passes_lrs": [0.3, 1.0],
        "std_1_lowest_train_loss": 0.4,
    }


@pytest.mark.parametrize("name", list(STUDIES["stages"]))
def test_the_studies_stages_depend_on_the_code_that_decides_their_outputs(name):
    stage = STUDIES["stages"][name]
    module = stage["cmd"].split("python -m ")[1].split()[0]
    expected = {module_file(found).as_posix() for found in imported_modules(module) - PLUMBING}
    assert {dep for dep in stage["deps"] if dep.endswith(".py")} == expected
    assert stage["wdir"] == ".." and all((REPO / dep).exists() for dep in expected)


def tiny_grid(params: dict, executor: str = "local", address: str = "auto") -> None:
    params["init_scale"].update(mixed=[[0.01, 1.0]], pytorch_default=True)
    params["phase_diagram"].update(lrs=[0.1, 1.0], seeds=[0, 1], epochs=2, executor=executor, ray_address=address)


def run_stage(repo, env) -> dict:
    # --force --single-item: this stage alone, even when an earlier test of the module already ran it unchanged
    output = run_tool(["dvc", "repro", "--force", "--single-item", "studies/dvc.yaml:phase_diagram"], repo, env).stdout
    assert "Running stage 'studies/dvc.yaml:phase_diagram'" in output
    return json.loads((repo / "reports/phase_diagram.json").read_text())


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, tiny_dataset):
    """A copy of the repo on the tiny dataset, prepared, with a tiny grid, and its own MLflow store."""
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    edit_params(repo, tiny_params(tiny_dataset))
    edit_params(repo, tiny_grid)
    commit_all(repo, "tiny grid")
    env = tool_env(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    run_tool(["dvc", "repro", "prepare"], repo, env)
    return repo, env


@pytest.mark.integration
def test_a_tiny_grid_runs_through_the_stage_logs_every_model_and_the_default_repro_never_starts_it(tiny_repo):
    from mlflow import MlflowClient

    repo, env = tiny_repo
    # What the default `dvc repro` would run (a dry run cannot hash outputs it has not made: errors ignored)
    dry = run_tool(["dvc", "repro", "--dry", "--ignore-errors"], repo, env, check=False).stdout
    assert "Running stage 'init_scale'" in dry and "Running stage 'spiral'" in dry
    assert "phase_diagram" not in dry and "interventions" not in dry
    summary = run_stage(repo, env)
    assert summary["executor"] == "local" and set(summary["inputs"]) == {"standardized", "pixels"}
    assert summary["points"] == ["std 0.01", "std 1", "W1 0.01, W2 1", "pytorch default"]
    for found in summary["inputs"].values():
        assert len(found["cells"]) == 4 * 2 and {"std_1_all_seeds_pass_lrs", "std_1_any_seed_passes_lrs"} <= set(
            found["answer"]
        )
        for cell in found["cells"]:
            assert 0 <= cell["gate_pass_fraction"] <= 1 and "node" not in cell
    assert "ray_node" not in json.dumps(summary)  # node ids change every run: MLflow only
    assert (repo / "reports/phase_diagram.png").stat().st_size > 0
    assert "## pixels inputs" in (repo / "reports/phase_diagram.md").read_text()
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(PARAMS.phase_diagram.experiment)
    runs = client.search_runs([experiment.experiment_id])
    models = [run for run in runs if run.data.tags.get("ray_node")]
    assert len(models) == 2 * 2 * 4 * 2 and {run.data.tags["ray_node"] for run in models} == {"local"}
    assert all(run.info.status == "FINISHED" for run in runs)
    assert {int(step.step) for step in client.get_metric_history(models[0].info.run_id, "train_loss")} == {1, 2}
    pixels = {(c["point"], c["lr"]): c for c in summary["inputs"]["pixels"]["cells"]}
    standardized = {(c["point"], c["lr"]): c for c in summary["inputs"]["standardized"]["cells"]}
    assert pixels[("std 1", 0.1)]["train_loss_mean"] != standardized[("std 1", 0.1)]["train_loss_mean"]


@pytest.mark.integration
@pytest.mark.ray
def test_the_tiny_grid_on_a_two_node_ray_cluster_equals_the_local_run(tiny_repo):
    from tests.ray_cluster import start_cluster

    repo, env = tiny_repo
    local = run_stage(repo, env)
    cluster = start_cluster()
    try:
        edit_params(repo, lambda params: tiny_grid(params, "ray", cluster.address))
        remote = run_stage(repo, env)
    finally:
        cluster.stop()
        edit_params(repo, tiny_grid)
    assert remote["executor"] == "ray" and local["executor"] == "local"
    for inputs in local["inputs"]:
        for mine, theirs in zip(local["inputs"][inputs]["cells"], remote["inputs"][inputs]["cells"]):
            for key, value in mine.items():
                if isinstance(value, float):
                    assert theirs[key] == pytest.approx(value, abs=1e-6), (inputs, mine["point"], key)
                else:
                    assert theirs[key] == value


@pytest.mark.integration
def test_d2ls_own_train_ch3_runs_by_its_stage_with_a_verdict_per_point_and_a_run_per_seed(tiny_repo):
    from mlflow import MlflowClient

    repo, env = tiny_repo
    edit_params(repo, lambda params: params["train_ch3"].update(seeds=[0, 1], epochs=1))
    output = run_tool(["dvc", "repro", "--force", "--single-item", "studies/dvc.yaml:train_ch3"], repo, env).stdout
    assert "Running stage 'studies/dvc.yaml:train_ch3'" in output and "W1 1, W2 1 seed 1: train loss" in output
    summary = json.loads((repo / "reports/train_ch3.json").read_text())
    assert [point["point"] for point in summary["points"]] == ["W1 1, W2 1", "W1 0.01, W2 1"]
    assert summary["train_images"] == 600 and summary["inputs"] == "pixels"  # all train images, as d2l trains
    assert all(0 <= point["pass_fraction"] <= point["gate_pass_fraction"] <= 1 for point in summary["points"])
    assert "| W1 0.01, W2 1 |" in (repo / "reports/train_ch3.md").read_text()
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(PARAMS.train_ch3.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + 2 * 2 and all(run.info.status == "FINISHED" for run in runs)
