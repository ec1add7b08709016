"""Batched training against the one-model written-out step, model by model; bf16 against fp32; precision rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import batched, fused
from pipeline import model as mlp
from pipeline.errors import PipelineError
from tests.conftest import make_split

SEEDS = (0, 1, 2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    def flat(split):
        images, labels = split
        return images.reshape(len(images), -1).float() / 255, labels.long()

    return flat(make_split(520, seed=3)), flat(make_split(130, seed=4))  # 520 = 5 * 100 + 20: a short last batch


def build(seed: int, impl: str = "module", hidden: tuple[int, ...] = (32, 16), init_std: float = 0.1):
    return mlp.build(impl, hidden, "relu", init_std, torch.Generator().manual_seed(seed))


def parameters(model) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def one_model_epochs(seeds, data, lr=0.1, batch_size=100, **options):
    """Each seed trained alone by fused.sgd_epoch: its losses, correct count and parameters."""
    (images, labels), _ = data
    results = []
    for seed in seeds:
        model = build(seed, **options)
        shuffle = torch.Generator().manual_seed(seed)
        losses, correct = fused.sgd_epoch(model, lr, images, labels, batch_size, shuffle)
        results.append((losses, correct, parameters(model)))
    return results


def batched_epoch(seeds, data, precision="fp32", lr=0.1, batch_size=100, impl="module", **options):
    """The same seeds trained together; the models after unstack, the losses and correct counts."""
    (images, labels), _ = data
    models = [build(seed, impl, **options) for seed in seeds]
    stacked = batched.stack(models, CPU)
    shuffles = [torch.Generator().manual_seed(seed) for seed in seeds]
    losses, correct = batched.sgd_epoch(stacked, lr, images, labels, batch_size, shuffles, precision)
    batched.unstack(stacked, models)
    return models, losses, correct, stacked


def test_one_fp32_epoch_matches_the_one_model_step_per_seed(data):
    models, losses, correct, _ = batched_epoch(SEEDS, data)
    assert losses.shape == (len(SEEDS), 6) and losses.dtype == torch.float32 and correct.shape == (len(SEEDS),)
    for index, (alone_losses, alone_correct, alone_parameters) in enumerate(one_model_epochs(SEEDS, data)):
        torch.testing.assert_close(losses[index], alone_losses, rtol=1e-5, atol=1e-4)
        assert correct[index] == alone_correct
        for trained, alone in zip(parameters(models[index]), alone_parameters):
            torch.testing.assert_close(trained, alone, rtol=1e-4, atol=1e-6)
    assert not torch.equal(losses[0], losses[1])  # the seeds really differ


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


def test_models_of_other_shapes_or_activations_are_refused():
    with pytest.raises(PipelineError, match="expected one shape"):
        batched.stack([build(0), build(1, hidden=(8,))], CPU)
    with pytest.raises(PipelineError, match="not a ReLU MLP"):
        batched.stack([mlp.build("module", (8,), "tanh", 0.1)], CPU)
    with pytest.raises(PipelineError, match="not a ReLU MLP"):
        batched.stack([mlp.build("scratch", (8,), "sigmoid", 0.1)], CPU)


def test_bf16_epochs_stay_close_to_fp32(data):
    _, validation = data
    results = {}
    for precision in ("fp32", "bf16"):
        models, losses, correct, stacked = batched_epoch(SEEDS, data, precision, impl="scratch")
        results[precision] = (losses, correct, batched.evaluate(stacked, *validation), parameters(models[0]))
    (fp32_losses, fp32_correct, (_, fp32_accuracy), fp32_weights) = results["fp32"]
    (bf16_losses, bf16_correct, (_, bf16_accuracy), bf16_weights) = results["bf16"]
    assert bf16_losses.dtype == torch.float32 and bf16_weights[0].dtype == torch.float32
    assert not torch.equal(bf16_losses, fp32_losses)  # bf16 really ran
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=0.02, atol=0.5)
    assert (bf16_correct - fp32_correct).abs().max() <= 10  # of 520
    assert (bf16_accuracy - fp32_accuracy).abs().max() <= 0.03
    torch.testing.assert_close(bf16_weights[0], fp32_weights[0], rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_diverging_model_leaves_the_others_alone(data, precision):
    (images, labels), _ = data
    runs = []
    for scale in (1.0, 1e30):  # seed 1 starts with huge weights the second time: its loss overflows at once
        models = [build(seed) for seed in SEEDS]
        with torch.no_grad():
            models[1][1].weight.mul_(scale)
        stacked = batched.stack(models, CPU)
        shuffles = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        losses, correct = batched.sgd_epoch(stacked, 0.1, images, labels, 100, shuffles, precision)
        runs.append((losses, correct, stacked))
    (losses, correct, stacked), (diverged_losses, diverged_correct, diverged) = runs
    assert torch.isfinite(losses).all() and not torch.isfinite(diverged_losses[1]).all()
    assert torch.equal(diverged_losses[[0, 2]], losses[[0, 2]]) and torch.equal(
        diverged_correct[[0, 2]], correct[[0, 2]]
    )
    for trained, reference in zip(diverged.weights + diverged.biases, stacked.weights + stacked.biases):
        assert torch.equal(trained[[0, 2]], reference[[0, 2]])


def test_evaluate_matches_the_models_own_forward_pass(data):
    _, (images, labels) = data
    models = [build(seed) for seed in SEEDS]
    loss, accuracy = batched.evaluate(batched.stack(models, CPU), images, labels, batch_size=50)
    for index, model in enumerate(models):
        logits = model(images)
        torch.testing.assert_close(loss[index], torch.nn.functional.cross_entropy(logits, labels))
        assert accuracy[index].item() == (logits.argmax(1) == labels).sum().item() / len(labels)  # exact


AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
AMX = "flags\t\t: fpu sse2 amx_tile amx_bf16\n"
PLAIN = "flags\t\t: fpu sse2 avx2 avx512f\nbugs\t\t: avx512_bf16_fake\n"  # the flag only on another line


@pytest.mark.parametrize(
    "name, cpuinfo, expected",
    [
        ("auto", AVX512_BF16, "bf16"),
        ("auto", AMX, "bf16"),
        ("auto", PLAIN, "fp32"),
        ("auto", "", "fp32"),  # no /proc/cpuinfo (macOS): fp32
        ("fp32", AVX512_BF16, "fp32"),
        ("bf16", PLAIN, "bf16"),  # allowed anywhere, just slow
    ],
)
def test_precision_rules_on_a_cpu(name, cpuinfo, expected):
    assert batched.resolve_precision(name, CPU, cpuinfo) == expected


def test_auto_precision_is_fp32_on_mps_and_a_bad_name_is_one_line():
    assert batched.resolve_precision("auto", torch.device("mps"), AVX512_BF16) == "fp32"
    with pytest.raises(PipelineError, match=r"^train.precision: got 'fp16', expected one of auto, fp32, bf16$"):
        batched.resolve_precision("fp16", CPU)


def test_precision_benchmark_finds_bf16_equivalent_to_fp32_on_tiny_data(data):
    """benchmarks.precision on small data: three seeds in fp32 and in bf16, paired by seed."""
    from benchmarks import precision
    from pipeline import config
    from tests.conftest import REPO

    params = dataclasses.replace(config.load(REPO / "params.yaml").variant("d2l"), hidden=(32,), epochs=10, lr=0.3)
    result = precision.run(dataclasses.replace(params, batch_size=100), [0, 1, 2], *data, "cpu")
    assert result["seeds"] == ["0", "1", "2"] and result["finite"] == {"fp32": True, "bf16": True}
    fp32, bf16 = result["validation_accuracy"]["fp32"], result["validation_accuracy"]["bf16"]
    assert min(fp32.values()) > 0.5  # the models learnt something
    assert result["difference_mean"] == pytest.approx(sum(bf16[s] - fp32[s] for s in fp32) / 3)
    assert result["verdict"] == "equivalent", result


def test_an_unresolved_precision_or_a_missing_generator_is_one_line(data):
    (images, labels), _ = data
    stacked = batched.stack([build(seed) for seed in SEEDS], CPU)
    shuffles = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    with pytest.raises(PipelineError, match=r"got precision 'auto' and 3 generators, expected fp32 or bf16"):
        batched.sgd_epoch(stacked, 0.1, images, labels, 100, shuffles, "auto")
    with pytest.raises(PipelineError, match=r"one generator per model \(3\)"):
        batched.sgd_epoch(stacked, 0.1, images, labels, 100, shuffles[:2], "fp32")
