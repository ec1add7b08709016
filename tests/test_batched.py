"""The one trainer against autograd on each model alone (the reference), bf16 against fp32, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import batched
from pipeline import model as mlp
from pipeline.errors import PipelineError
from tests.conftest import make_split

SEEDS = (0, 1, 2)
CPU = torch.device("cpu")
# The trainer's path is the same on every device; on a machine with a GPU the reference tests run there too.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def data():
    def flat(split):
        images, labels = split
        return images.reshape(len(images), -1).float() / 255, labels.long()

    return flat(make_split(520, seed=3)), flat(make_split(130, seed=4))  # 520 = 5 * 100 + 20: a short last batch


def build(seed: int, impl: str = "module", hidden: tuple[int, ...] = (32, 16), init_std: float = 0.1, **options):
    return mlp.build(impl, hidden, options.get("activation", "relu"), init_std, torch.Generator().manual_seed(seed))


def parameters(model) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def reference_steps(model, images, labels, orders, batch_size, optimizer="sgd", lr=0.1, loss=F.cross_entropy):
    """Plain autograd on one nn.Sequential model: the same batches, torch.optim, model(x) and loss.backward()."""
    step = batched.OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    losses = []
    for batch in orders.split(batch_size):
        value = loss(model(images[batch]), labels[batch])
        step.zero_grad()
        value.backward()
        step.step()
        losses.append(value.item() * len(batch))
    return torch.tensor(losses)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("models", [1, 5])
def test_the_fp32_step_matches_autograd_on_each_model_alone_after_20_steps(data, models, device, optimizer="sgd"):
    """The one path every device runs, on a CPU on every machine: 20 steps (four epochs of five batches)."""
    device = torch.device(device)
    (images, labels), _ = data
    images, labels = images[:500].to(device), labels[:500].to(device)
    seeds = list(range(models))
    stacked = batched.stack([build(seed) for seed in seeds], device)
    step = batched.optimizer(optimizer, stacked, 0.1 if optimizer == "sgd" else 0.01)
    shuffles = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    references = [build(seed).to(device) for seed in seeds]
    orders_shuffles = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    for _ in range(4):
        losses, _ = batched.train_epoch(stacked, step, images, labels, 100, shuffles)
        for index, reference in enumerate(references):
            order = torch.randperm(len(labels), generator=orders_shuffles[index], device=device)
            lr = 0.1 if optimizer == "sgd" else 0.01
            expected = reference_steps(reference, images, labels, order, 100, optimizer, lr)
            torch.testing.assert_close(losses[index].cpu(), expected, rtol=1e-5, atol=1e-4)
    trained = [build(seed + 100).to(device) for seed in seeds]
    batched.unstack(stacked, trained)
    for model, reference in zip(trained, references):
        for mine, theirs in zip(parameters(model), parameters(reference)):
            assert (mine - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "rmsprop"])
def test_every_optimizer_steps_each_model_as_it_would_alone(data, optimizer):
    """Adaptive steps amplify rounding (a near-zero gradient's step is +-lr), so alone means: the same trainer
    with that model only, one epoch, compared within a tolerance; and the loss falls."""
    (images, labels), _ = data

    def epoch(seeds):
        stacked = batched.stack([build(seed) for seed in seeds], CPU)
        step = batched.optimizer(optimizer, stacked, 0.001)
        shuffles = [torch.Generator().manual_seed(seed) for seed in seeds]
        return batched.train_epoch(stacked, step, images, labels, 100, shuffles)[0]

    together = epoch(SEEDS)
    for index, seed in enumerate(SEEDS):
        torch.testing.assert_close(together[index], epoch([seed])[0], rtol=1e-3, atol=1e-2)
    assert (together[:, -2] < together[:, 0]).all()


@pytest.mark.parametrize("impl", ["module", "scratch"])
def test_stack_and_unstack_round_trip_in_both_forms(impl):
    models = [build(seed, impl) for seed in SEEDS]
    stacked = batched.stack(models, CPU)
    assert [tuple(weight.shape) for weight in stacked.weights] == [(3, 784, 32), (3, 32, 16), (3, 16, 10)]
    assert [tuple(bias.shape) for bias in stacked.biases] == [(3, 32), (3, 16), (3, 10)]
    first_weight = models[1].W1 if impl == "scratch" else models[1][1].weight.T  # nn.Linear stores [out, in]
    assert torch.equal(stacked.weights[0][1], first_weight)
    targets = [build(seed + 10, impl) for seed in SEEDS]
    batched.unstack(stacked, targets)
    for model, target in zip(models, targets):
        for original, written in zip(model.parameters(), target.parameters()):
            assert torch.equal(original, written)


def test_models_of_other_shapes_or_activations_together_are_refused():
    with pytest.raises(PipelineError, match="expected one shape"):
        batched.stack([build(0), build(1, hidden=(8,))], CPU)
    with pytest.raises(PipelineError, match="expected one shape"):
        batched.stack([build(0), build(1, activation="tanh")], CPU)
    with pytest.raises(PipelineError, match="not an MLP of pipeline.model"):
        batched.stack([torch.nn.Sequential(torch.nn.Linear(4, 2))], CPU)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "leaky_relu"])
def test_other_activations_train_as_their_module_does(data, activation):
    (images, labels), _ = data
    stacked = batched.stack([build(0, activation=activation)], CPU)
    step = batched.optimizer("sgd", stacked, 0.1)
    losses, _ = batched.train_epoch(stacked, step, images, labels, 100, [torch.Generator().manual_seed(0)])
    reference = build(0, activation=activation)
    expected = reference_steps(
        reference, images, labels, torch.randperm(520, generator=torch.Generator().manual_seed(0)), 100
    )
    torch.testing.assert_close(losses[0], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_epochs_stay_close_to_fp32_and_really_run_in_bf16(data, device):
    device = torch.device(device)
    (images, labels), validation = ((x.to(device), y.to(device)) for x, y in data)
    results = {}
    for precision in ("fp32", "bf16"):
        stacked = batched.stack([build(seed) for seed in SEEDS], device)
        step = batched.optimizer("sgd", stacked, 0.1)
        shuffles = [torch.Generator(device=device).manual_seed(seed) for seed in SEEDS]
        losses, correct = batched.train_epoch(stacked, step, images, labels, 100, shuffles, precision=precision)
        results[precision] = (losses, correct, batched.evaluate(stacked, *validation), stacked)
    fp32_losses, fp32_correct, fp32_eval, fp32_stack = results["fp32"]
    bf16_losses, bf16_correct, bf16_eval, bf16_stack = results["bf16"]
    assert bf16_losses.dtype == torch.float32 and bf16_stack.weights[0].dtype == torch.float32
    assert not torch.equal(bf16_losses, fp32_losses)  # bf16 really ran
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=0.02, atol=0.5)
    assert (bf16_correct - fp32_correct).abs().max() <= 10  # of 520
    assert (bf16_eval.accuracy - fp32_eval.accuracy).abs().max() <= 0.03
    torch.testing.assert_close(bf16_stack.weights[0], fp32_stack.weights[0], rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_diverging_model_leaves_the_others_alone(data, precision):
    (images, labels), _ = data
    runs = []
    for scale in (1.0, 1e30):  # seed 1 starts with huge weights the second time: its loss overflows at once
        models = [build(seed) for seed in SEEDS]
        with torch.no_grad():
            models[1][1].weight.mul_(scale)
        stacked = batched.stack(models, CPU)
        step = batched.optimizer("sgd", stacked, 0.1)
        shuffles = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        losses, correct = batched.train_epoch(stacked, step, images, labels, 100, shuffles, precision=precision)
        runs.append((losses, correct, stacked))
    (losses, correct, stacked), (diverged_losses, diverged_correct, diverged) = runs
    assert torch.isfinite(losses).all() and not torch.isfinite(diverged_losses[1]).all()
    assert torch.equal(diverged_losses[[0, 2]], losses[[0, 2]])
    assert torch.equal(diverged_correct[[0, 2]], correct[[0, 2]])
    for trained, reference in zip(diverged.parameters(), stacked.parameters()):
        assert torch.equal(trained[[0, 2]], reference[[0, 2]])


@pytest.mark.parametrize("impl", ["module", "scratch"])
def test_evaluate_matches_the_models_own_forward_pass(data, impl):
    _, (images, labels) = data
    models = [build(seed, impl) for seed in SEEDS]
    figures = batched.evaluate(batched.stack(models, CPU), images, labels, batch_size=50)
    for index, model in enumerate(models):
        logits = model(images)
        torch.testing.assert_close(figures.loss[index], F.cross_entropy(logits, labels))
        assert figures.accuracy[index].item() == (logits.argmax(1) == labels).sum().item() / len(labels)  # exact
        assert torch.equal(figures.predictions[index], logits.argmax(1))


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_probability_losses_match_their_definition(data, loss):
    _, (images, labels) = data
    logits = build(0)(images).unsqueeze(0)
    targets = F.one_hot(labels, 10).float()
    distance = {"mse": F.mse_loss, "l1": F.l1_loss}[loss]
    expected = distance(logits[0].softmax(1), targets, reduction="none").sum(1)
    torch.testing.assert_close(batched.example_losses(logits, labels.unsqueeze(0), loss)[0], expected)


def test_a_bad_precision_or_a_missing_generator_is_one_line(data):
    (images, labels), _ = data
    stacked = batched.stack([build(seed) for seed in SEEDS], CPU)
    step = batched.optimizer("sgd", stacked, 0.1)
    shuffles = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    with pytest.raises(PipelineError, match=r"^train.precision: got 'auto', expected one of fp32, bf16$"):
        batched.train_epoch(stacked, step, images, labels, 100, shuffles, precision="auto")
    with pytest.raises(PipelineError, match=r"got 2 generators, expected 3"):
        batched.train_epoch(stacked, step, images, labels, 100, shuffles[:2])


def test_after_step_runs_once_per_step_and_logit_scale_trains_on_the_scaled_loss_divided_by_the_scale(data):
    """logit_scale s: the losses reported are CE(s f), the gradient is that of CE(s f) / s (autograd, one model);
    after_step gets each step's index once the optimizer has stepped."""
    (images, labels), (validation_images, validation_labels) = data
    images, labels = images[:200], labels[:200]
    stacked = batched.stack([build(0)], CPU)
    step = batched.optimizer("sgd", stacked, 0.1)
    reference = build(0)
    reference_step = torch.optim.SGD(reference.parameters(), lr=0.1)
    orders = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    seen = []
    losses, _ = batched.train_epoch(stacked, step, images, labels, 50, [torch.Generator().manual_seed(0)],
                                    logit_scale=30.0, after_step=lambda index: seen.append(index))  # fmt: skip
    for index, batch in enumerate(orders.split(50)):
        value = F.cross_entropy(30.0 * reference(images[batch]), labels[batch])
        assert losses[0, index].item() == pytest.approx(value.item() * 50, rel=1e-5)
        reference_step.zero_grad()
        (value / 30.0).backward()
        reference_step.step()
    assert seen == [0, 1, 2, 3]
    for trained, expected in zip(stacked.parameters(), batched.stack([reference], CPU).parameters()):
        torch.testing.assert_close(trained.detach(), expected, rtol=1e-5, atol=1e-6)
    scaled = batched.evaluate(stacked, validation_images, validation_labels, logit_scale=30.0)
    plain = batched.evaluate(stacked, validation_images, validation_labels)
    assert scaled.accuracy.item() == plain.accuracy.item() and scaled.loss.item() != plain.loss.item()
    reference_loss = F.cross_entropy(30.0 * reference(validation_images), validation_labels).item()
    assert scaled.loss.item() == pytest.approx(reference_loss, rel=1e-5)
