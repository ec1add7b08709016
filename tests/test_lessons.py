"""The lesson stages reach their claims: linreg recovers w and b, and only the MLPs separate the spiral."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import yaml

from lessons.linreg import linreg
from lessons.spiral import spiral
from pipeline.params_file import ParamsError, load_section
from tests.conftest import REPO, tool_env

LINREG = load_section(REPO / "lessons/linreg/params.yaml", "linreg", linreg.LinregParams)
SPIRAL = load_section(REPO / "lessons/spiral/params.yaml", "spiral", spiral.SpiralParams)


@pytest.fixture(scope="module")
def spiral_result() -> spiral.SpiralResult:
    return spiral.run(SPIRAL)


def test_linreg_recovers_w_and_b_as_least_squares_does():
    result = linreg.run(LINREG)
    figures = linreg.summary(LINREG, result)
    assert max(figures["w_error"]) < 0.01 and figures["b_error"] < 0.01
    assert figures["final_loss"] < 2 * LINREG.noise_std**2  # at the noise floor, noise_std^2 / 2
    # The reference: the exact least-squares fit of the same data, which SGD should approach.
    design = torch.cat([result.features, torch.ones(len(result.labels), 1)], dim=1)
    exact = torch.linalg.lstsq(design, result.labels[:, None]).solution.flatten()
    assert torch.allclose(torch.cat([result.w.detach(), result.b.detach()[None]]), exact, atol=5e-3)


def test_linreg_reports_one_loss_per_epoch():
    reported = []
    result = linreg.run(LINREG, lambda epoch, loss: reported.append((epoch, loss)))
    assert reported == list(enumerate(result.losses, start=1))
    assert len(reported) == LINREG.epochs and reported[-1][1] < reported[0][1]


def test_linreg_is_deterministic_for_a_seed():
    first, second = linreg.run(LINREG), linreg.run(LINREG)
    assert torch.equal(first.w, second.w) and torch.equal(first.b, second.b) and first.losses == second.losses
    other = linreg.run(dataclasses.replace(LINREG, seed=LINREG.seed + 1))
    assert not torch.equal(first.features, other.features)


def test_only_the_mlps_separate_the_spiral(spiral_result):
    models = spiral_result.models
    assert list(models) == ["linear", *SPIRAL.activations]
    assert models["linear"].train_accuracy < 0.6
    for name in ("relu", "tanh", "leaky_relu"):
        assert models[name].train_accuracy > 0.9, name
        assert models[name].test_accuracy > 0.9, name


def test_spiral_split_and_summary(spiral_result):
    total = SPIRAL.classes * SPIRAL.points_per_class
    figures = spiral.summary(spiral_result)
    assert figures["test_examples"] == round(total * SPIRAL.test_fraction)
    assert figures["train_examples"] + figures["test_examples"] == total
    assert set(figures["models"]) == set(spiral_result.models)
    low, high = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    grid = spiral.predict_grid(spiral_result.models["relu"].net, low, high, resolution=50)
    assert grid.shape == (50, 50) and set(grid.unique().tolist()) == set(range(SPIRAL.classes))


def test_hand_written_adam_matches_torch_optim_adam():
    points, labels = spiral.make_spiral(3, 20, 0.2, torch.Generator().manual_seed(0))
    ours = spiral.build_net("tanh", 8, 3, torch.Generator().manual_seed(1))
    reference = spiral.build_net("tanh", 8, 3, torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    for _ in range(10):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(points), labels).backward()
        optimizer.step()
    spiral.fit(ours, points, labels, lr=0.05, steps=10)
    for (name, value), expected in zip(ours.named_parameters(), reference.parameters()):
        assert torch.allclose(value, expected, atol=1e-5), name


def test_spiral_is_deterministic_for_a_seed():
    short = dataclasses.replace(SPIRAL, steps=20)
    first, second = spiral.run(short), spiral.run(short)
    assert torch.equal(first.train_points, second.train_points) and torch.equal(first.test_labels, second.test_labels)
    for name, model in first.models.items():
        assert model.losses == second.models[name].losses, name
        for key, value in model.net.state_dict().items():
            assert torch.equal(value, second.models[name].net.state_dict()[key]), (name, key)


def test_spiral_restores_the_thread_count():
    threads = torch.get_num_threads()
    spiral.run(dataclasses.replace(SPIRAL, steps=1))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["linreg"].update(lr=0), "linreg.lr: got 0, expected a number > 0"),
        (lambda p: p["linreg"].update(noise_std=-0.1), "linreg.noise_std: got -0.1, expected a number >= 0"),
        (lambda p: p["linreg"].update(true_w=[]), "linreg.true_w: got [], expected a non-empty list of numbers"),
        (lambda p: p["linreg"].update(true_w=[2, "x"]), "linreg.true_w[1]: got 'x', expected a number"),
        (lambda p: p["linreg"].update(batch_size=0), "linreg.batch_size: got 0, expected an integer >= 1"),
        (lambda p: p["linreg"].pop("seed"), "linreg.seed: missing key"),
        (lambda p: p["spiral"].update(classes=1), "spiral.classes: got 1, expected an integer >= 2"),
        (lambda p: p["spiral"].update(test_fraction=1), "spiral.test_fraction: got 1, expected a number > 0 and < 1"),
        (
            lambda p: p["spiral"].update(activations=["relu", "gelu"]),
            "spiral.activations[1]: got 'gelu', expected one of",
        ),
        (
            lambda p: p["spiral"].update(activations=["relu", "relu"]),
            "spiral.activations: got ['relu', 'relu'], expected a non-empty list without repeats",
        ),
        (lambda p: p["spiral"].update(hiden=64), "spiral.hiden: unknown key"),
        (lambda p: p["linreg"].update(true_w=[2, float("nan")]), "linreg.true_w[1]: got nan, expected a finite number"),
        (lambda p: p["linreg"].update(seed=2**63), f"linreg.seed: got {2**63}, expected an integer < 2**63"),
        (lambda p: p["spiral"].update(steps=-(2**70)), f"spiral.steps: got {-(2**70)}, expected an integer >= 1"),
    ],
)
def test_bad_lesson_params_name_the_key(tmp_path, change, message):
    lesson = next(iter(set(message.split(".")[:1])))
    params = yaml.safe_load((REPO / f"lessons/{lesson}/params.yaml").read_text())
    change(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    model = {"linreg": linreg.LinregParams, "spiral": spiral.SpiralParams}[lesson]
    with pytest.raises(ParamsError) as error:
        load_section(tmp_path / "params.yaml", lesson, model)
    assert message in str(error.value)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both stages' CLIs, run at once and sharing one MLflow store as under `dvc repro`; each writes to its own dir."""
    root = tmp_path_factory.mktemp("lesson_stages")
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    processes = {}
    for stage in ("linreg", "spiral"):
        (root / stage).mkdir()
        with open(root / f"{stage}.log", "w") as log:
            processes[stage] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    f"lessons.{stage}.{stage}",
                    "--metrics",
                    str(root / stage / "metrics.json"),
                    "--plot",
                    str(root / stage / "plot.png"),
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    for stage, process in processes.items():
        assert process.wait(timeout=300) == 0, f"{stage} failed:\n{(root / f'{stage}.log').read_text()[-4000:]}"
    return {"uri": env["MLFLOW_TRACKING_URI"], **{stage: root / stage for stage in processes}}


@pytest.mark.parametrize(
    "stage, metric_keys",
    [
        ("linreg", {"loss", "b", "b_error", "w_0", "w_0_error", "w_1", "w_1_error"}),
        (
            "spiral",
            {"linear_train_accuracy", "relu_train_accuracy", "relu_test_accuracy", "relu_final_loss", "relu_loss"},
        ),
    ],
)
@pytest.mark.integration
def test_stage_cli_writes_its_outputs_and_a_finished_mlflow_run(stage_runs, stage, metric_keys):
    from mlflow import MlflowClient

    directory = stage_runs[stage]
    assert sorted(path.name for path in directory.iterdir()) == ["metrics.json", "plot.png"]
    assert (directory / "plot.png").read_bytes().startswith(b"\x89PNG")
    client = MlflowClient(tracking_uri=stage_runs["uri"])
    (run,) = client.search_runs(
        [experiment.experiment_id for experiment in client.search_experiments()], f"tags.stage = '{stage}'"
    )
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == stage
    assert metric_keys <= set(run.data.metrics)
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id, stage)] == [f"{stage}/plot.png"]
    if stage == "linreg":
        log = (directory.parent / "linreg.log").read_text()
        epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
        assert len(epochs) == LINREG.epochs
        steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(1, LINREG.epochs + 1))
