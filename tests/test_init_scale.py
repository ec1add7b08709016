"""The init-scale study: its diagnostics against autograd, its report's form, and one run serving every report epoch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline import batched, config
from pipeline import model as mlp
from pipeline.stages import init_scale
from tests.conftest import REPO, make_split


@pytest.fixture(scope="module")
def data():
    def flat(split):
        images, labels = split
        return images.reshape(len(images), -1).float() / 255, labels.long()

    return {"train": flat(make_split(384, seed=5)), "validation": flat(make_split(96, seed=6))}


def study(**overrides) -> config.InitScaleParams:
    defaults = config.load(REPO / "params.yaml").init_scale
    small = {"stds": (0.01, 1.0), "mixed": ((0.01, 1.0),), "seeds": (0, 1), "epochs": 3, "report_epochs": (1, 3)}
    return dataclasses.replace(defaults, **{**small, "probe": 64, **overrides})


def train_params() -> config.TrainParams:
    return dataclasses.replace(config.load(REPO / "params.yaml").train, batch_size=64, device="cpu", precision="fp32")


def test_the_points_are_the_grid_the_mixed_pairs_and_pytorchs_default():
    labels = [(point.label, point.w1_std, point.w2_std) for point in init_scale.points(study())]
    assert labels == [("std 0.01", 0.01, 0.01), ("std 1", 1.0, 1.0), ("W1 0.01, W2 1", 0.01, 1.0),
                      ("pytorch default", None, None)]  # fmt: skip
    defaults = config.load(REPO / "params.yaml").init_scale
    assert len(defaults.stds) >= 7 and {0.01, 1.0} <= set(defaults.stds)
    assert min(defaults.stds) == 0.001 and defaults.epochs >= 30 and len(defaults.seeds) >= 3
    assert defaults.precision == "fp32"  # the precision of record


def test_diagnostics_match_autograd_and_their_definitions(data):
    """The batched figures against autograd on each model alone; the fractions by their definitions."""
    images, labels = data["train"][0][:64], data["train"][1][:64]
    nets = [mlp.build("module", (32,), "relu", (std, 1.0), torch.Generator().manual_seed(seed))
            for seed, std in enumerate((0.01, 0.3, 1.0))]  # fmt: skip
    figures = init_scale.diagnose(batched.stack(nets, torch.device("cpu")), images, labels, lr=0.1)
    for index, net in enumerate(nets):
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        hidden = net[2](net[1](images))
        assert figures["loss"][index].item() == pytest.approx(loss.item(), rel=1e-5)
        assert figures["grad_norm_w1"][index].item() == pytest.approx(net[1].weight.grad.norm().item(), rel=1e-4)
        assert figures["grad_norm_w2"][index].item() == pytest.approx(net[3].weight.grad.norm().item(), rel=1e-4)
        assert figures["weight_norm_w2"][index].item() == pytest.approx(net[3].weight.norm().item(), rel=1e-5)
        assert figures["logit_std"][index].item() == pytest.approx(logits.std().item(), rel=1e-4)
        top = logits.softmax(1).max(1).values
        assert figures["saturated_fraction"][index].item() == pytest.approx((top > 0.99).float().mean().item())
        dead = (hidden.max(0).values <= 0).float().mean().item()
        assert figures["dead_relu_fraction"][index].item() == pytest.approx(dead)
        with torch.no_grad():  # one plain SGD step on the batch's mean loss, then how far the logits moved
            for parameter in net.parameters():
                parameter -= 0.1 * parameter.grad
            step = (net(images) - logits).pow(2).mean().sqrt().item()
        assert figures["logit_step"][index].item() == pytest.approx(step, rel=1e-3)
    assert figures["logit_std"][2] > 50 * figures["logit_std"][0]  # W1 100x wider: logits about 100x wider


def test_every_report_epoch_comes_from_one_run_that_a_shorter_run_is_the_prefix_of(data):
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    _, short = init_scale.train(study(epochs=2, report_epochs=(2,)), train_params(), data)
    models, long = init_scale.train(study(), train_params(), data)
    assert len(models) == 8
    for first, second in zip(short, long):
        assert strip(second[:3]) == strip(first) and len(second) == 4  # epoch 0 (at init), then 1, 2, 3


def test_the_report_has_the_issues_form_with_seed_spreads(data):
    models, histories = init_scale.train(study(), train_params(), data)
    points = init_scale.summarize(study(), models, histories, loss_gate=0.5)
    assert [point["label"] for point in points][-1] == "pytorch default" and points[-1]["w1_std"] is None
    for point in points:
        assert set(point) >= {"label", "w1_std", "w2_std", "seeds", "epochs", "at_init"} and point["seeds"] == [0, 1]
        assert set(point["epochs"]) == {"1", "3"}
        assert set(point["at_init"]) >= {"loss", "logit_std", "saturated_fraction", "dead_relu_fraction"}
        for figures in point["epochs"].values():
            assert {"train_loss_mean", "train_loss_std", "validation_accuracy_mean", "validation_accuracy_std"} <= set(
                figures
            )
            assert 0 <= figures["loss_gate_pass_fraction"] <= 1 and figures["finite_seeds"] == 2
    unit, scaled = points[1], points[0]
    assert unit["at_init"]["loss"] > 10 * scaled["at_init"]["loss"] and unit["at_init"]["saturated_fraction"] > 0.5
    assert scaled["at_init"]["saturated_fraction"] == 0.0


def test_the_table_has_a_row_per_point_with_each_report_epoch(data):
    models, histories = init_scale.train(study(), train_params(), data)
    summary = {
        "points": init_scale.summarize(study(), models, histories, loss_gate=0.5),
        "probe_images": 64,
        "lr": 0.1,
        "loss_gate": "train loss < 0.5",
        "precision": "fp32",
    }
    table = init_scale.markdown(summary)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4 and "train loss @1" in rows[0] and "val acc @3" in rows[0]
    assert rows[-1].startswith("| pytorch default |") and rows[2].split(" | ")[3] != "0.0%"  # std 1 saturates
