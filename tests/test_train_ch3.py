"""d2l's own train_ch3 as a stage: the book's init, loop and assertions, as a verdict per point and seed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from torch import nn

from pipeline import config
from pipeline.stages import train_ch3
from tests.conftest import REPO, VENV_BIN, idx_bytes, make_split, run_tool, tool_env

LAST = {"train_loss": 0.4, "train_accuracy": 0.85, "test_accuracy": 0.84}


@pytest.mark.parametrize(
    "change, failed",
    [
        ({}, None),
        ({"train_loss": 0.5}, "train_loss_below_gate"),  # train_ch3: assert train_loss < 0.5
        ({"train_loss": math.nan}, "train_loss_below_gate"),  # a diverged loss never passes
        ({"train_accuracy": 0.7}, "train_accuracy_above_0_7"),
        ({"test_accuracy": 0.69}, "test_accuracy_above_0_7"),
    ],
)
def test_the_verdict_is_train_ch3s_three_assertions(change, failed):
    outcome = train_ch3.verdict({**LAST, **change})
    assert outcome["passes"] == (failed is None)
    assert [name for name, holds in outcome.items() if name != "passes" and not holds] == ([failed] if failed else [])


def test_the_net_draws_its_weights_at_the_point_and_keeps_nn_linears_bias():
    torch.manual_seed(0)
    net = train_ch3.d2l_net(0.01, 1.0)
    assert isinstance(net[0], nn.Flatten) and net[1].weight.shape == (256, 784) and net[3].weight.shape == (10, 256)
    assert net[1].weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert net[3].weight.std().item() == pytest.approx(1.0, rel=0.05)
    bound = 1 / math.sqrt(784)  # nn.Linear's default bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zero
    assert 0 < net[1].bias.abs().max().item() <= bound and net[1].bias.std().item() > bound / 3


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    directory = tmp_path_factory.mktemp("raw")
    for split, (images, labels) in (("train", make_split(512, seed=1)), ("t10k", make_split(128, seed=2))):
        (directory / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (directory / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return directory


def section(**overrides) -> config.TrainCh3Params:
    defaults = config.load(REPO / "params.yaml").train_ch3
    return dataclasses.replace(defaults, **{"seeds": (0, 1), "epochs": 2, "batch_size": 64, **overrides})


def test_the_stage_reports_each_points_verdict_over_its_seeds_from_one_run_per_seed(raw):
    """d2l's init trains on learnable images and passes; N(0, 1) with a huge learning rate diverges and fails."""
    summary, runs = train_ch3.run(
        section(points=((0.01, 0.01), (1.0, 1.0)), lr=0.1, epochs=6, batch_size=16), raw, None
    )
    easy, unit = summary["points"]
    assert (easy["point"], unit["point"]) == ("W1 0.01, W2 0.01", "W1 1, W2 1")
    assert summary["train_images"] == 512 and summary["inputs"] == "pixels"
    assert easy["pass_fraction"] == 1.0 and easy["train_loss_mean"] < 0.5
    assert [seed["seed"] for seed in easy["per_seed"]] == [0, 1]
    assert len(runs) == 4 and [len(run["history"]) for run in runs] == [6] * 4
    assert runs[0]["history"][-1]["train_loss"] == easy["per_seed"][0]["train_loss"]
    assert unit["per_seed"][1]["train_loss"] == runs[3]["history"][-1]["train_loss"]
    again, _ = train_ch3.run(section(points=((0.01, 0.01),), lr=0.1, epochs=6, batch_size=16), raw, None)
    assert again["points"][0] == easy  # seeded: the same figures on a rerun
    diverged, _ = train_ch3.run(section(points=((1.0, 1.0),), lr=1e6, seeds=(0,)), raw, None)
    assert diverged["points"][0]["pass_fraction"] == 0.0
    assert "| W1 0.01, W2 0.01 | 100% | 100% |" in train_ch3.markdown(summary)


@pytest.mark.parametrize(
    "stage, arguments",
    [
        ("train_ch3", ["--raw", "raw", "--report", "r.json", "--table", "r.md"]),
        (
            "phase_diagram",
            ["--data", "d", "--stats", "s.json", "--report", "r.json", "--plot", "r.png", "--table", "r.md"],
        ),
        ("interventions", ["--data", "d", "--stats", "s.json", "--report", "r.json", "--table", "r.md"]),
    ],
)
def test_a_study_without_its_params_section_is_one_line_and_writes_nothing(stage, arguments, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.pop(stage)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [str(VENV_BIN / "python"), "-m", f"pipeline.stages.{stage}", "--params", "params.yaml", *arguments]
    result = run_tool(command, tmp_path, tool_env(PYTHONPATH=str(REPO)), timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {stage}: ") and result.stderr.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
