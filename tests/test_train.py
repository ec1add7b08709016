"""The training loop: same result as a plain reference loop, deterministic, divergence and resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import config
from pipeline import model as mlp
from pipeline.errors import PipelineError
from pipeline.stages import train
from tests.conftest import REPO, make_split


@pytest.fixture(scope="module")
def data():
    def flat(split):
        images, labels = split
        return images.reshape(len(images), -1).float() / 255, labels.long()

    return flat(make_split(512, seed=3)), flat(make_split(128, seed=4))


def params(**overrides) -> config.TrainParams:
    defaults = config.load(REPO / "params.yaml").train
    return dataclasses.replace(defaults, **{"epochs": 3, "batch_size": 64, "device": "cpu", **overrides})


def one(train_params: config.TrainParams, seed: int, *data, **options) -> train.TrainResult:
    """One seed trained by the stage's loop."""
    return train.run(dataclasses.replace(train_params, seeds=(seed,)), *data, **options)[0]


def reference_epoch(net, images, labels, order, batch_size, lr):
    """The plainest SGD loop: slice, forward, mean loss, backward, p -= lr * grad; summed losses and correct count."""
    losses, correct = [], 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        logits = net(images[batch])
        loss = F.cross_entropy(logits, labels[batch])
        net.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter in net.parameters():
                parameter -= lr * parameter.grad
        losses.append(loss.item() * len(batch))
        correct += (logits.argmax(1) == labels[batch]).sum().item()
    return losses, correct


@pytest.mark.parametrize("impl", ["module", "scratch"])
def test_one_epoch_matches_a_plain_reference_loop(data, impl):
    """Either form, one seed: the stage's loop against the plainest SGD loop on the same order."""
    (images, labels), _ = data
    plain = mlp.build(impl, (256,), "relu", 0.01, torch.Generator().manual_seed(0))
    result = train.run(params(impl=impl, epochs=1, seeds=(0,)), *data)[0]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    losses, correct = reference_epoch(plain, images, labels, order, 64, 0.1)
    assert result.history[0]["train_loss"] == pytest.approx(sum(losses) / len(labels), rel=1e-5)
    assert result.history[0]["train_accuracy"] == correct / len(labels)
    for mine, theirs in zip(result.model.parameters(), plain.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_scratch_trains_through_its_own_forward_and_relu(data, monkeypatch):
    """d2l's scratch code is the point of that variant: its forward pass and hand-written ReLU run every step."""
    calls = {"forward": 0, "relu": 0}
    forward, relu = mlp.ScratchMLP.forward, mlp.relu

    def counted_forward(self, x):
        calls["forward"] += 1
        return forward(self, x)

    def counted_relu(x):
        calls["relu"] += 1
        return relu(x)

    monkeypatch.setattr(mlp.ScratchMLP, "forward", counted_forward)
    monkeypatch.setitem(mlp.SCRATCH_ACTIVATIONS, "relu", counted_relu)
    result = train.run(params(impl="scratch", epochs=1, seeds=(0,)), *data)[0]
    steps = math.ceil(512 / 64)
    assert isinstance(result.model, mlp.ScratchMLP)
    assert calls["forward"] >= steps and calls["relu"] >= steps


def test_same_seed_gives_identical_history_on_cpu(data):
    first, second = (one(params(), 0, *data).history for _ in range(2))
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    assert strip(first) == strip(second)
    assert first[-1]["validation_accuracy"] > 0.5  # the tiny data is learnable: the loop really trains


def test_other_seed_gives_another_history(data):
    assert one(params(), 1, *data).history[0]["train_loss"] != one(params(), 2, *data).history[0]["train_loss"]


@pytest.mark.parametrize("overrides", [{"lr": 1e5}, {"lr": 1e4, "init_std": 1.0}])
def test_divergence_is_recorded_not_raised(data, overrides):
    result = one(params(**overrides), 0, *data)
    assert result.diverged is not None
    assert result.diverged["epoch"] >= 1 and result.diverged["step"] >= 1
    assert len(result.history) == result.diverged["epoch"] - 1
    figures = train.seed_summary(result)
    assert figures["diverged"] is True and figures["diverged_epoch"] == result.diverged["epoch"]


def test_a_seed_that_diverges_in_a_batch_leaves_the_others_as_they_would_be_alone(data):
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    both = train.run(params(lr=1e4, init_std=1.0, seeds=(0, 2), precision="fp32"), *data)
    alone = train.run(params(lr=1e4, init_std=1.0, seeds=(2,), precision="fp32"), *data)
    assert both[0].diverged is not None and both[1].diverged is None
    assert strip(both[1].history) == strip(alone[0].history)
    assert train.seed_summary(both[0])["train_loss"] is None


def test_a_diverged_seed_has_null_figures_even_after_finite_epochs(data):
    """Its last finite epoch is not its result: it must not enter the means or pass a gate."""
    result = train.TrainResult(
        0,
        None,
        history=[
            {
                "epoch": 1,
                "train_loss": 0.3,
                "train_accuracy": 0.9,
                "validation_loss": 0.3,
                "validation_accuracy": 0.9,
                "seconds": 1.0,
            }
        ],
        diverged={"epoch": 2, "step": 5, "loss": "nan"},
    )
    figures = train.seed_summary(result)
    assert [figures[key] for key in ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy")] == [
        None
    ] * 4
    assert figures["epochs_completed"] == 1
    finite = train.TrainResult(1, None, history=[{**result.history[0], "validation_accuracy": 0.8}])
    summary = train.summarize("v", params(), [result, finite])
    assert summary["aggregate"]["finite_seeds"] == 1 and summary["aggregate"]["validation_accuracy_mean"] == 0.8


def test_both_forms_start_from_the_same_weights_seed_by_seed(data):
    """One draw in d2l's [fan_in, fan_out] layout, transposed for nn.Linear: the initial losses agree to rounding."""
    for seed in (0, 1, 2):
        module = train.initial_model(params(impl="module"), seed, torch.device("cpu"))
        scratch = train.initial_model(params(impl="scratch"), seed, torch.device("cpu"))
        assert torch.equal(module[1].weight.T, scratch.W1) and torch.equal(module[3].weight.T, scratch.W2)
    batched = train.run(params(impl="module", seeds=(0, 1, 2), epochs=1), *data)
    for result in batched:
        scratch = one(params(impl="scratch", epochs=1), result.seed, *data)
        assert result.initial_loss == pytest.approx(scratch.initial_loss, rel=1e-6)
    assert len({result.initial_loss for result in batched}) == 3  # and the seeds differ


def test_the_initial_loss_is_on_the_validation_split_or_on_train_without_one(data):
    """Each seed's loss before any step: on the validation split when there is one, on the train split without."""
    train_split, validation = data
    empty = (validation[0][:0], validation[1][:0])
    net = train.initial_model(params(), 0, torch.device("cpu"))
    with torch.no_grad():
        on = {
            name: F.cross_entropy(net(x), y).item()
            for name, (x, y) in (("train", train_split), ("validation", validation))
        }
    assert on["train"] != pytest.approx(on["validation"], rel=1e-5)  # the splits can be told apart
    assert one(params(epochs=1), 0, train_split, validation).initial_loss == pytest.approx(on["validation"], rel=1e-5)
    assert one(params(epochs=1), 0, train_split, empty).initial_loss == pytest.approx(on["train"], rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_shorter_run_is_the_prefix_of_a_longer_one(data, precision):
    """With a constant learning rate, epoch 10 of a 30-epoch run is a 10-epoch run: the study reads both from one."""
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    short = train.run(params(epochs=2, seeds=(0, 1), precision=precision), *data)
    long = train.run(params(epochs=4, seeds=(0, 1), precision=precision), *data)
    for first, second in zip(short, long):
        assert strip(second.history[:2]) == strip(first.history) and len(second.history) == 4


def test_seeds_trained_together_match_seeds_trained_alone(data):
    """The batched fp32 step against the one-model written-out step, seed by seed, within float tolerance."""
    together = train.run(params(epochs=2, seeds=(0, 1, 2), precision="fp32"), *data)
    for result in together:
        alone = one(params(epochs=2), result.seed, *data)
        for mine, theirs in zip(result.history, alone.history):
            for key in ("train_loss", "validation_loss", "validation_accuracy"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adagrad", "rmsprop"])
def test_every_optimizer_trains(data, optimizer):
    lr = 0.1 if optimizer in ("sgd", "adagrad") else 0.001
    history = one(params(optimizer=optimizer, lr=lr, epochs=2), 0, *data).history
    assert history[-1]["train_loss"] < history[0]["train_loss"] or history[-1]["validation_accuracy"] > 0.5


def test_interrupted_run_resumes_bit_identical(data, tmp_path):
    uninterrupted = one(params(epochs=4), 0, *data).history
    checkpoint = tmp_path / "ckpt.pt"

    def stop_after_two(seed, record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt  # after epoch 2's checkpoint, before epoch 3's

    with pytest.raises(KeyboardInterrupt):
        one(params(epochs=4), 0, *data, checkpoint=checkpoint, report=stop_after_two)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    resumed = one(params(epochs=4), 0, *data, checkpoint=checkpoint).history
    strip = lambda history: [{k: v for k, v in record.items() if k != "seconds"} for record in history]
    assert strip(resumed) == strip(uninterrupted)


@pytest.mark.parametrize(
    "change, part",
    [({"lr": 0.05}, "params"), ({"precision": "bf16"}, "precision"), ({"seeds": (0, 1)}, "params")],
)
def test_a_checkpoint_made_otherwise_is_discarded_saying_why(data, tmp_path, capsys, change, part):
    checkpoint = tmp_path / "ckpt.pt"
    train.run(params(epochs=1, seeds=(0,)), *data, checkpoint=checkpoint)
    results = train.run(params(epochs=1, **{"seeds": (0,), **change}), *data, checkpoint=checkpoint)
    assert all(len(result.history) == 1 and result.history[0]["epoch"] == 1 for result in results)
    assert f"ignoring checkpoint {checkpoint}: made with other {part}\n" in capsys.readouterr().out


def test_a_checkpoint_of_other_code_or_torch_is_discarded(data, tmp_path, capsys, monkeypatch):
    """A checkpoint left by a run that failed must not be resumed by the code that fixed it, nor by another torch."""
    from pipeline import checkpoints

    checkpoint = tmp_path / "ckpt.pt"
    train.run(params(epochs=1, seeds=(0,)), *data, checkpoint=checkpoint)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    train.run(params(epochs=2, seeds=(0,)), *data, checkpoint=checkpoint)
    assert "made with other params, torch" in capsys.readouterr().out
    monkeypatch.undo()
    code = tmp_path / "code"
    code.mkdir()
    for name in checkpoints.TRAINING_CODE:
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_bytes((REPO / "pipeline" / name).read_bytes())
    train.run(params(epochs=1, seeds=(0,)), *data, checkpoint=checkpoint)
    (code / "batched.py").write_text((code / "batched.py").read_text() + "\n# a fix\n")
    monkeypatch.setattr(checkpoints, "__file__", str(code / "checkpoints.py"))
    train.run(params(epochs=2, seeds=(0,)), *data, checkpoint=checkpoint)
    assert "made with other params, code" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(PipelineError, match="train.device: got 'cuda', but this machine has no cuda device"):
        train.resolve_device("cuda")
    assert train.resolve_device("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_probability_losses_train(data, loss):
    history = one(params(loss=loss, lr=0.5), 0, *data).history
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["validation_accuracy"] > 0.5


def test_huge_init_is_not_a_divergence(data):
    result = one(params(init_std=1e3, epochs=2), 0, *data)
    assert result.diverged is None and len(result.history) == 2
    assert result.history[0]["train_loss"] > 1e3 and all(math.isfinite(r["train_loss"]) for r in result.history)


def test_trainings_at_once_share_the_cpu(tmp_path, monkeypatch):
    """Two trainings at once get half the cores each (unless OMP_NUM_THREADS says otherwise)."""

    from pipeline import cpu

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "SLOTS_DIR", tmp_path)
    cores = cpu.available_cpus()
    with cpu.shared_threads() as first:
        with cpu.shared_threads() as second:
            assert second == max(1, cores // 2) and torch.get_num_threads() == second
        assert first == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with cpu.shared_threads() as chosen:
        assert chosen == torch.get_num_threads()


def test_a_batched_checkpoint_is_resumed_only_by_the_same_seeds(data, tmp_path):
    checkpoint = tmp_path / "batched.pt"
    train.run(params(epochs=1, seeds=(0, 1)), *data, checkpoint=checkpoint)
    results = train.run(params(epochs=1, seeds=(0, 1, 2)), *data, checkpoint=checkpoint)
    assert [len(result.history) for result in results] == [1, 1, 1]  # trained afresh, not resumed
    again = train.run(params(epochs=1, seeds=(0, 1, 2)), *data, checkpoint=checkpoint)
    assert [result.history for result in again] == [result.history for result in results]  # resumed: same
