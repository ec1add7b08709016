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


def trained(params: config.InitScaleParams, data: dict) -> tuple[list, list[list[dict]]]:
    result = init_scale.train(params, train_params(), data)
    return result.models, result.histories


def without_seconds(histories: list[list[dict]]) -> list[list[dict]]:
    return [[{k: v for k, v in record.items() if k != "seconds"} for record in history] for history in histories]


def test_a_models_figures_do_not_depend_on_the_chunk_it_trains_in(data):
    """Every figure is the same whether all models train in one chunk or one by one: what lets the chunks run
    anywhere (here, or as Ray tasks) with the same answer. Training, the diagnostics and the epoch-1 trace are
    bit-identical; sharpness (power iteration from the same start vector for every model) to float rounding, as
    its reductions over a stack of another size may add in another order."""
    params = study(epochs=2, report_epochs=(2,), sharpness_epochs=(0, 2), trace_every=2)
    together = init_scale.train(dataclasses.replace(params, chunk_models=8), train_params(), data)
    alone = init_scale.train(dataclasses.replace(params, chunk_models=1), train_params(), data)
    assert together.models == alone.models and len(together.models) == 8
    assert set(together.nodes) == {"local"} and len(alone.nodes) == 8
    sharpness = lambda histories: [record.pop("sharpness") for history in histories for record in history]  # noqa: E731
    first, second = without_seconds(together.histories), without_seconds(alone.histories)
    expected = [value if value is None else pytest.approx(value, rel=1e-5) for value in sharpness(second)]
    assert sharpness(first) == expected and sum(value is not None for value in expected) == 8 * 2
    assert first == second


def test_the_points_are_the_grid_the_mixed_pairs_and_pytorchs_default():
    labels = [(point.label, point.w1_std, point.w2_std) for point in init_scale.points(study())]
    assert labels == [("std 0.01", 0.01, 0.01), ("std 1", 1.0, 1.0), ("W1 0.01, W2 1", 0.01, 1.0),
                      ("pytorch default", None, None)]  # fmt: skip
    defaults = config.load(REPO / "params.yaml").init_scale
    assert len(defaults.stds) >= 7 and {0.01, 1.0} <= set(defaults.stds)
    assert min(defaults.stds) == 0.001 and len(defaults.seeds) >= 3
    assert defaults.epochs >= 10 and 10 in defaults.report_epochs  # d2l's gate epoch
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
        assert figures["probe_gradient_logit_step"][index].item() == pytest.approx(step, rel=1e-3)
    assert figures["logit_std"][2] > 50 * figures["logit_std"][0]  # W1 100x wider: logits about 100x wider


def test_every_report_epoch_comes_from_one_run_that_a_shorter_run_is_the_prefix_of(data):
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    short = init_scale.train(study(epochs=2, report_epochs=(2,)), train_params(), data).histories
    models, long = trained(study(), data)
    assert len(models) == 8
    for first, second in zip(short, long):
        assert strip(second[:3]) == strip(first) and len(second) == 4  # epoch 0 (at init), then 1, 2, 3


def test_the_report_has_the_issues_form_with_seed_spreads(data):
    models, histories = trained(study(), data)
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
    models, histories = trained(study(), data)
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


def tiny_stack(seeds=(0, 1), std: float = 0.5, dtype=torch.float64) -> batched.Stack:
    """Small MLPs (6-5-3) with random weights and biases, stacked in `dtype`, for tests against exact definitions."""
    generator = torch.Generator().manual_seed(sum(seeds) + 9)
    draw = lambda *shape: std * torch.randn(len(seeds), *shape, generator=generator, dtype=dtype)  # noqa: E731
    return batched.Stack([draw(6, 5), draw(5, 3)], [draw(5), draw(3)])


def tiny_batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.randn(12, 6, generator=generator, dtype=dtype), torch.randint(0, 3, (12,), generator=generator)


def test_sharpness_is_the_top_eigenvalue_of_autograds_full_hessian():
    group, (images, labels) = tiny_stack(), tiny_batch()
    found = init_scale.sharpness(group, images, labels, iterations=300)
    shapes = [parameter[0].shape for parameter in group.parameters()]
    for index in range(group.models):
        flat = torch.cat([parameter[index].flatten() for parameter in group.parameters()])

        def loss(vector):
            pieces = torch.split(vector, [shape.numel() for shape in shapes])
            weights = [piece.view(shape).unsqueeze(0) for piece, shape in zip(pieces, shapes)]
            one = batched.Stack(weights[:2], weights[2:])
            return batched.example_losses(batched.forward(one, images.unsqueeze(0)), labels.unsqueeze(0)).mean()

        eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
        top = eigenvalues[eigenvalues.abs().argmax()].item()
        assert found[index].item() == pytest.approx(top, rel=1e-4)
        assert found[index].item() > 0


def test_an_sgd_step_changes_the_conserved_quantity_by_exactly_lr_squared_times_the_gradients_balance():
    """q_i = ||W1[:, i]||^2 + b1[i]^2 - ||W2[i, :]||^2: the first-order change cancels (ReLU's homogeneity), so
    a step at lr changes q_i by lr^2 (||g_W1[:, i]||^2 + g_b1[i]^2 - ||g_W2[i, :]||^2), and by O(lr) for
    weights alone."""
    group, (images, labels) = tiny_stack(), tiny_batch()
    start = [parameter.requires_grad_() for parameter in group.parameters()]
    loss = batched.example_losses(batched.forward(group, images.expand(2, -1, -1)), labels.expand(2, -1))
    gradients = torch.autograd.grad(loss.mean(1).sum(), start)
    start = [parameter.detach() for parameter in start]
    before = init_scale.conserved(batched.Stack(start[:2], start[2:]))
    for lr in (1e-2, 1e-3):
        moved = batched.Stack([w - lr * g for w, g in zip(start[:2], gradients[:2])],
                              [b - lr * g for b, g in zip(start[2:], gradients[2:])])  # fmt: skip
        balance = gradients[0].pow(2).sum(1) + gradients[2].pow(2) - gradients[1].pow(2).sum(2)
        change = init_scale.conserved(moved) - before
        torch.testing.assert_close(change, lr**2 * balance, rtol=1e-6, atol=1e-12)
        weights_only = (moved.weights[0].pow(2).sum(1) - start[0].pow(2).sum(1)).abs().max()
        assert weights_only > 100 * change.abs().max()  # each term moves at first order; only the sum does not


def test_travel_is_zero_at_init_and_measures_w1s_relative_move():
    group = tiny_stack()
    initial = (group.weights[0].clone(), init_scale.conserved(group))
    at_init = init_scale.travel(group, *initial)
    assert all(values.abs().max().item() == 0 for name, values in at_init.items() if name != "conserved_mean")
    moved = batched.Stack([group.weights[0] * 1.5, group.weights[1]], group.biases)
    assert init_scale.travel(moved, *initial)["w1_travel"].tolist() == pytest.approx([0.5, 0.5])


def test_the_epoch_1_trace_measures_each_recorded_minibatch_step_and_the_flips_since_the_last_record(data):
    images, labels = data["train"]
    nets = [mlp.build("module", (32,), "relu", std, torch.Generator().manual_seed(seed))
            for seed, std in enumerate((0.01, 1.0))]  # fmt: skip
    group = batched.stack(nets, torch.device("cpu"))
    probe = images[:64]
    trace = init_scale.Trace(group, probe, every=2)
    snapshots = [batched.forward(group, probe.expand(2, *probe.shape)).detach()]  # the logits after every step

    def after_step(index):
        trace(index)
        snapshots.append(batched.forward(group, probe.expand(2, *probe.shape)).detach())

    step = batched.optimizer("sgd", group, 0.1)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    batched.train_epoch(group, step, images, labels, 64, generators, after_step=after_step)  # 6 steps
    assert [record["step"] for record in trace.records] == [1, 3, 5]
    for record, step_index in zip(trace.records, (0, 2, 4)):
        before, after = snapshots[step_index], snapshots[step_index + 1]  # around that one step
        expected = (after - before).flatten(1).pow(2).mean(1).sqrt()
        assert record["minibatch_logit_step"] == pytest.approx(expected.tolist(), rel=1e-5)
        previous = snapshots[max(step_index - 1, 0)]  # the last record's logits (init for the first)
        flips = (after.argmax(-1) != previous.argmax(-1)).float().mean(1)
        assert record["flips"] == pytest.approx(flips.tolist())
    assert trace.per_model(1)[0]["minibatch_logit_step"] > 10 * trace.per_model(0)[0]["minibatch_logit_step"]


def test_the_study_reports_sharpness_and_the_trace_per_point(data):
    models, histories = trained(study(sharpness_epochs=(0, 1), trace_every=2), data)
    points = init_scale.summarize(study(sharpness_epochs=(0, 1)), models, histories, loss_gate=0.5)
    for point in points:
        assert set(point["sharpness"]) == {"0", "1"} and point["sharpness"]["0"]["mean"] is not None
        assert [entry["step"] for entry in point["epoch_1_trace"]] == [1, 3, 5]  # 384 images in batches of 64
        assert point["epochs"]["3"]["sharpness_mean"] is None and point["epochs"]["1"]["sharpness_mean"] is not None
        assert point["epochs"]["3"]["conserved_drift_max_mean"] >= point["epochs"]["3"]["conserved_drift_mean_mean"]
