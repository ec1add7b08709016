"""The interventions' recipes against the exact facts they rest on: the temperature identity step by step, the
two input scalings against prepare's own, b2's learning rate, and a chunk's records."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import batched, interventions
from pipeline.errors import PipelineError
from tests.conftest import make_split

C = 100.0  # W1, b1, W2 scaled by c and b2 by c^2: the logits by c^2 = 1e4, N(0, 0.01) to N(0, 1)


def random_stack(std: float, dtype=torch.float64, models: int = 2) -> batched.Stack:
    """Small MLPs (784-16-10) with random weights and biases (nonzero b2, so its learning rate matters)."""
    generator = torch.Generator().manual_seed(3)
    draw = lambda *shape: torch.randn(models, *shape, generator=generator, dtype=dtype)  # noqa: E731
    return batched.Stack([std * draw(784, 16), std * draw(16, 10)], [std * draw(16), std * draw(10)])


def scaled(models: batched.Stack, c: float) -> batched.Stack:
    """The homogeneity map: W1, b1, W2 times c, b2 times c^2 (the logits times c^2)."""
    weights = [weight.detach() * c for weight in models.weights]
    return batched.Stack(weights, [models.biases[0].detach() * c, models.biases[1].detach() * c * c])


@pytest.fixture(scope="module")
def pixels():
    images, labels = make_split(200, seed=11)
    return images.reshape(len(images), -1).double() / 255, labels.long()


def train_in_step(pairs, images, labels, batch_size=40):
    """Train each (stack, recipe) one epoch with the same shuffles; after every step, every stack's weights."""
    snapshots, losses = [[] for _ in pairs], []
    for index, (models, recipe) in enumerate(pairs):
        step = interventions.optimizer(recipe, models)
        generators = [torch.Generator().manual_seed(seed) for seed in range(models.models)]
        record = lambda _, i=index, m=models: snapshots[i].append([p.detach().clone() for p in m.parameters()])  # noqa: E731
        step_losses, _ = batched.train_epoch(
            models, step, images, labels, batch_size, generators, logit_scale=recipe.logit_scale, after_step=record
        )
        losses.append(step_losses)
    return snapshots, losses


@pytest.mark.parametrize("direction", ["logits times 1e4 on N(0, 0.01)", "logits over 1e4 on N(0, 1)"])
def test_a_temperature_recipe_follows_its_scaled_twin_step_by_step(pixels, direction):
    """SGD at lr on the scaled net = SGD on the original with CE(c^2 f) / c^2, b2 at lr / c^2; and back."""
    images, labels = pixels
    lr = 0.1
    hot = direction.startswith("logits times")
    small = random_stack(0.01)
    original, twin = (small, scaled(small, C)) if hot else (scaled(small, C), small)
    scale = C**2 if hot else C**-2
    recipe = interventions.Recipe(lr=lr, logit_scale=scale, b2_lr_factor=1 / scale)
    (snapshots, twin_snapshots), (losses, twin_losses) = train_in_step(
        [(original, recipe), (twin, interventions.Recipe(lr=lr))], images, labels
    )
    assert len(snapshots) == 5
    factor = C if hot else 1 / C
    for step, twin_step in zip(snapshots, twin_snapshots):
        expected = [*(w * factor for w in step[:3]), step[3] * factor**2]  # W1, W2, b1 times c; b2 times c^2
        for parameter, reference in zip(twin_step, expected):  # to fp32 rounding: example_losses works in fp32
            torch.testing.assert_close(parameter, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())
    torch.testing.assert_close(losses, twin_losses, rtol=1e-6, atol=0)  # the same classifier's loss


def test_b2_at_the_plain_learning_rate_leaves_the_twins_trajectory(pixels):
    """The identity needs b2's own rate: without it the pair drifts apart (so the test above can fail)."""
    images, labels = pixels
    small = random_stack(0.01)
    wrong = interventions.Recipe(lr=0.1, logit_scale=C**2)  # b2 at lr, not lr / c^2
    (snapshots, twin_snapshots), _ = train_in_step(
        [(small, wrong), (scaled(small, C), interventions.Recipe(lr=0.1))], images, labels
    )
    assert not torch.allclose(twin_snapshots[-1][3], snapshots[-1][3] * C**2, rtol=1e-3)


def test_the_optimizer_puts_b2_alone_at_its_own_rate():
    models = random_stack(0.1, torch.float32)
    step = interventions.optimizer(interventions.Recipe(lr=0.1, b2_lr_factor=1e-4, weight_decay=0.01), models)
    rates = {id(parameter): group["lr"] for group in step.param_groups for parameter in group["params"]}
    assert rates[id(models.biases[1])] == pytest.approx(1e-5) and rates[id(models.weights[0])] == 0.1
    assert len(rates) == 4 and all(group["weight_decay"] == 0.01 for group in step.param_groups)


def test_both_input_scalings_come_from_either_prepared_form(pixels):
    images, labels = pixels
    images = images.float()
    mean, std = images.double().mean().item(), images.double().std().item()
    as_pixels = {"train": (images, labels), "validation": (images[:10], labels[:10])}
    standardized = {split: ((x - mean) / std, y) for split, (x, y) in as_pixels.items()}
    stats_standardized = {"normalize": True, "mean": mean, "std": std}
    back = interventions.input_scaling(standardized, stats_standardized, "pixels")
    torch.testing.assert_close(back["train"][0], images, rtol=0, atol=1e-6)
    assert interventions.input_scaling(standardized, stats_standardized, "standardized") is standardized
    derived = interventions.input_scaling(as_pixels, {"normalize": False, "mean": 0.0, "std": 1.0}, "standardized")
    torch.testing.assert_close(derived["validation"][0], standardized["validation"][0], rtol=0, atol=1e-5)
    assert derived["train"][0].double().mean().abs() < 1e-6 and derived["train"][0].double().std() == pytest.approx(1)
    with pytest.raises(PipelineError, match=r"^inputs: got 'raw', expected one of standardized, pixels$"):
        interventions.input_scaling(as_pixels, stats_standardized, "raw")


def shared(pixels) -> dict:
    images, labels = pixels
    data = {"train": (images[:160].float(), labels[:160]), "validation": (images[160:].float(), labels[160:])}
    return {"data": data, "stats": {"normalize": False, "mean": 0.0, "std": 1.0}}


def chunk(**overrides) -> interventions.Chunk:
    base = interventions.Chunk(interventions.Recipe(), "pixels", ((0.01, 0.01), (1.0, 1.0)), (0, 1), 2, 32, 16)
    return dataclasses.replace(base, **overrides)


def test_a_chunk_records_every_model_every_epoch_and_the_fp32_twins_agree(pixels):
    """In fp32 the temperature twin follows the plain run within float rounding, through the whole chunk path."""
    plain = interventions.train_chunk(chunk(inits=((1.0, 1.0),), seeds=(0,)), shared(pixels))
    recipe = interventions.Recipe(logit_scale=C**2, b2_lr_factor=C**-2)
    hot = interventions.train_chunk(chunk(recipe=recipe, inits=((0.01, 0.01),), seeds=(0,)), shared(pixels))
    assert [record["epoch"] for record in plain[0]] == [1, 2]
    assert set(plain[0][0]) == {"epoch", "train_loss", "validation_accuracy", "conserved_mean",
                                "conserved_drift_mean", "conserved_drift_max", "w1_travel"}  # fmt: skip
    for record, twin in zip(plain[0], hot[0]):
        assert twin["train_loss"] == pytest.approx(record["train_loss"], rel=1e-4)
        assert twin["w1_travel"] == pytest.approx(record["w1_travel"], rel=1e-3)


def test_a_model_that_diverges_keeps_null_figures():
    data = {
        "train": (torch.randn(64, 784), torch.arange(64) % 10),
        "validation": (torch.randn(8, 784), torch.arange(8)),
    }
    stats = {"normalize": True, "mean": 0.0, "std": 1.0}
    histories = interventions.train_chunk(chunk(recipe=interventions.Recipe(lr=1e38)), {"data": data, "stats": stats})
    for history in histories:  # overflowed within the first epoch: every figure null, every epoch
        assert [set(record.values()) for record in history] == [{1, None}, {2, None}]


def test_the_stage_names_each_intervention_its_gate_effect_and_the_twins_follow_each_other(pixels):
    """Through the stage's own run (local executor): every arm at each point, twins within fp32 rounding."""
    from pipeline import config
    from pipeline.stages import interventions as stage
    from tests.conftest import REPO

    params = config.load(REPO / "params.yaml")
    section = dataclasses.replace(params.interventions, seeds=(0, 1), epochs=2, inputs=("pixels",), executor="local",
                                  weight_decay=(0.01,))  # fmt: skip
    train = dataclasses.replace(params.train, batch_size=32, hidden=(16,))
    summary, runs = stage.run(section, train, shared(pixels), loss_gate=0.5)
    assert summary["executor"] == "local" and list(summary["inputs"]) == ["pixels"]
    [unit, mixed] = summary["inputs"]["pixels"]
    assert (unit["point"], mixed["point"]) == ("W1 1, W2 1", "W1 0.01, W2 1")
    names = [entry["name"] for entry in unit["interventions"]]
    assert names == ["baseline", "W1 0.01, W2 0.01, logits x 10000", "reference: plain SGD at W1 0.01, W2 0.01",
                     "logits / 10000", "weight decay 0.01", "adam"]  # fmt: skip
    for point in (unit, mixed):
        for entry in point["interventions"]:
            assert " -> " in entry["gate_effect"] and entry["last_epoch"]["finite_seeds"] == 2
            if "twin" in entry:  # the homogeneity identity, through the whole stage path
                assert entry["twin"]["max_train_loss_relative_gap"] < 1e-4 and entry["twin"]["finite_pairs"] == 4
    hot = unit["interventions"][1]
    assert hot["logit_scale"] == 1e4 and hot["b2_lr"] == pytest.approx(0.1 / 1e4) and hot["init"] == [0.01, 0.01]
    assert len(runs) == 2 * 6 * 2 and {run["node"] for run in runs} == {"local"}
    assert "| adam |" in stage.markdown(summary)
