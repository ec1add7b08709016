"""Stage `train`: one variant of the MLP, every seed; data moved to the device once, batched by index.

The nn.Sequential form trains all its seeds together as one computation (pipeline/batched.py), in the
precision train.precision names; the scratch form is d2l's own code, each seed through its own forward pass,
autograd and torch.optim. Each seed keeps its own init and its own shuffling. One line per epoch is printed;
once the figures exist, the variant's MLflow run and one nested run per seed are logged and ended in one short
step (the epochs with step=epoch, the seconds, the seed's model for serving). A non-finite loss stops that
seed: it is recorded as diverged, with null figures and no model, and the pipeline goes on. The outputs hold
only what the inputs determine (figures, not seconds or run ids), so an unchanged rerun rewrites the same bytes.
With d2l's settings (10 epochs, lr 0.1, batch 256, N(0, 0.01) init) validation accuracy reaches about 0.87.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import batched, checkpoints, cli, config, cpu, tracking
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.devices import resolve_device
from pipeline.files import atomic_dir, write_json, write_text
from pipeline.spread import mean_and_std
from pipeline.tensors import load_split

CHECKPOINT = "checkpoint.pt"  # one resumable state for all the seeds of a variant
FIGURES = ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy")
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    seed: int
    model: nn.Module
    history: list[dict] = field(default_factory=list)  # per epoch: FIGURES and "epoch"
    diverged: dict | None = None  # {"epoch": e, "step": s, "loss": value} when the loss went non-finite
    initial_loss: float | None = None  # before any step, on the validation split (train's when it is empty)
    seconds: float = 0.0  # this seed's share of the training time (MLflow only)


class Group:
    """The seeds of one variant as they train: one stack (nn.Sequential form) or d2l's own models (scratch)."""

    def __init__(self, params: config.TrainParams, models: list[nn.Module], device: torch.device) -> None:
        self.params, self.models, self.device = params, models, device
        self.scratch = params.impl == "scratch"
        if self.scratch:
            self.optimizers = [make_optimizer(params, model.parameters()) for model in models]
        else:
            self.stack = batched.stack(models, device)
            self.optimizers = [batched.optimizer(params.optimizer, self.stack, params.lr)]

    def epoch(self, images: torch.Tensor, labels: torch.Tensor, shuffles: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of every seed: per-step summed losses [M, steps] and correct counts [M]."""
        p = self.params
        if not self.scratch:
            return batched.train_epoch(
                self.stack, self.optimizers[0], images, labels, p.batch_size, shuffles, p.loss, p.precision
            )
        figures = [
            scratch_epoch(model, step, images, labels, p.batch_size, shuffle, p.loss, p.precision)
            for model, step, shuffle in zip(self.models, self.optimizers, shuffles)
        ]
        return torch.stack([losses for losses, _ in figures]), torch.stack([correct for _, correct in figures])

    def weights(self) -> batched.Stack:
        """Every seed's current weights as one stack (the scratch models' parameters are copied)."""
        return batched.stack(self.models, self.device) if self.scratch else self.stack

    def load(self, saved: batched.Stack, optimizer_states: list[dict]) -> None:
        """Put a checkpoint's weights and optimizer state back."""
        current = self.weights()
        with torch.no_grad():
            for tensor, value in zip(current.parameters(), saved.parameters()):
                tensor.copy_(value)
        if self.scratch:
            batched.unstack(current, self.models)
        for step, state in zip(self.optimizers, optimizer_states):
            step.load_state_dict(state)

    def finish(self) -> None:
        """Write the trained weights into the seeds' own models."""
        if not self.scratch:
            batched.unstack(self.stack, self.models)


def make_optimizer(params: config.TrainParams, parameters) -> torch.optim.Optimizer:
    return batched.OPTIMIZERS[params.optimizer](parameters, lr=params.lr)


def scratch_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    loss: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d2l's loop for one model: its own forward pass, autograd, optimizer.step; per-step summed losses, correct."""
    order = torch.randperm(len(labels), device=images.device, generator=generator)
    losses, correct = [], torch.zeros((), dtype=torch.long, device=images.device)
    for batch in order.split(batch_size):
        y = labels.index_select(0, batch)
        with batched.precision_of(precision, images.device):
            logits = model(images.index_select(0, batch))
        example = batched.example_losses(logits.unsqueeze(0), y.unsqueeze(0), loss)[0]
        optimizer.zero_grad(set_to_none=True)
        example.mean().backward()
        optimizer.step()
        losses.append(example.detach().sum())
        correct += (logits.detach().argmax(1) == y).sum()
    return torch.stack(losses), correct


def run(
    params: config.TrainParams,
    train_data: Split,
    validation_data: Split,
    checkpoint: Path | None = None,
    report: Callable[[int, dict], None] = lambda seed, record: None,
) -> list[TrainResult]:
    """Every seed for params.epochs, resuming from `checkpoint` when it is still valid; a seed whose loss goes
    non-finite stops there (the others go on)."""
    device = resolve_device(params.device)
    results = [TrainResult(seed, initial_model(params, seed, device)) for seed in params.seeds]
    train_images, train_labels = (tensor.to(device) for tensor in train_data)
    validation = tuple(tensor.to(device) for tensor in validation_data)
    group = Group(params, [result.model for result in results], device)
    # The loss at the start: on the validation split, images held out of the same train set and a tenth of its
    # size (so a tenth of the pass); on the train split when there is none (d2l's exact setting, validation: 0).
    start_split = validation if len(validation[1]) else (train_images, train_labels)
    for result, loss in zip(results, evaluate(group.weights(), *start_split, params.loss)[0]):
        result.initial_loss = loss
    shuffles = [torch.Generator(device=device).manual_seed(seed) for seed in params.seeds]
    fingerprint = checkpoints.fingerprint(params, device, train_data, validation_data)
    start = checkpoints.resume(checkpoint, fingerprint, group, shuffles, results)
    for epoch in range(start + 1, params.epochs + 1):
        started = time.perf_counter()
        step_losses, correct = group.epoch(train_images, train_labels, shuffles)
        losses, corrects = step_losses.tolist(), correct.tolist()  # the one sync of the epoch
        validation_figures = evaluate(group.weights(), *validation, params.loss)
        share = (time.perf_counter() - started) / len(results)
        for result, seed_losses, seed_correct, seed_validation in zip(results, losses, corrects, validation_figures[1]):
            record_epoch(result, epoch, seed_losses, seed_correct, len(train_labels), seed_validation, share, report)
        if checkpoint is not None:
            checkpoints.save(checkpoint, fingerprint, epoch, group, shuffles, results)
        if all(result.diverged for result in results):
            break
    group.finish()
    return results


def evaluate(models: batched.Stack, images: torch.Tensor, labels: torch.Tensor, loss: str) -> tuple[list, list]:
    """Per seed, the mean loss and (loss, accuracy) on a split; None for an empty split (validation: 0)."""
    if len(labels) == 0:
        return [None] * models.models, [None] * models.models
    figures = batched.evaluate(models, images, labels, loss)
    losses = figures.loss.tolist()
    return losses, list(zip(losses, figures.accuracy.tolist()))


def initial_model(params: config.TrainParams, seed: int, device: torch.device) -> nn.Module:
    """The seed's model before any step. Its weights come from a CPU generator in d2l's layout: the same seed
    gives the same start on any device and in either form (model.build)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return mlp.build(params.impl, params.hidden, params.activation, params.init_std, generator).to(device)


def record_epoch(
    result: TrainResult,
    epoch: int,
    losses: list[float],
    correct: int,
    count: int,
    validation: tuple[float, float] | None,
    seconds: float,
    report: Callable[[int, dict], None],
) -> None:
    """One seed's epoch: its record, or its divergence (it then stays diverged)."""
    if result.diverged:
        return
    bad_step = next((step for step, value in enumerate(losses) if not math.isfinite(value)), None)
    if bad_step is not None:
        result.diverged = {"epoch": epoch, "step": bad_step + 1, "loss": str(losses[bad_step])}
        return
    record = {
        "epoch": epoch,
        "train_loss": sum(losses) / count,
        "train_accuracy": correct / count,
        "validation_loss": validation and validation[0],
        "validation_accuracy": validation and validation[1],
    }
    result.history.append(record)
    result.seconds += seconds
    report(result.seed, record)


def seed_summary(result: TrainResult) -> dict:
    """One seed's final figures; null for a diverged seed (its last finite epoch is not its result)."""
    last = result.history[-1] if result.history and not result.diverged else {}
    return {
        "initial_loss": result.initial_loss,
        "diverged": result.diverged is not None,
        "diverged_epoch": (result.diverged or {}).get("epoch"),
        "diverged_step": (result.diverged or {}).get("step"),
        "epochs_completed": len(result.history),
        **{key: last.get(key) for key in FIGURES},
    }


def best_seed(results: list[TrainResult]) -> TrainResult | None:
    """The seed whose model goes to MLflow: best validation accuracy (lowest train loss without validation)."""
    finished = [result for result in results if result.diverged is None and result.history]
    if not finished:
        return None
    if finished[0].history[-1]["validation_accuracy"] is None:
        return min(finished, key=lambda result: result.history[-1]["train_loss"])
    return max(finished, key=lambda result: result.history[-1]["validation_accuracy"])


def history_csv(results: list[TrainResult]) -> str:
    """Per epoch, each figure's mean over the seeds that reached it, and its std (what dvc plots draws)."""
    columns = ["epoch", "seeds"] + [f"{name}{suffix}" for name in FIGURES for suffix in ("", "_std")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for epoch in range(1, max((len(result.history) for result in results), default=0) + 1):
        records = [result.history[epoch - 1] for result in results if len(result.history) >= epoch]
        row = [epoch, len(records)]
        for name in FIGURES:
            row += ["" if value is None else repr(value) for value in mean_and_std([r[name] for r in records])]
        writer.writerow(row)
    return buffer.getvalue()


def summarize(variant: str, params: config.TrainParams, results: list[TrainResult]) -> dict:
    """train.json: each seed's figures, the means and spreads over the finite seeds, the seed served."""
    seeds = {str(result.seed): seed_summary(result) for result in results}
    aggregate = {}
    for name in FIGURES:
        aggregate[f"{name}_mean"], aggregate[f"{name}_std"] = mean_and_std([seed[name] for seed in seeds.values()])
    aggregate["finite_seeds"] = sum(not seed["diverged"] for seed in seeds.values())  # what every mean is over
    aggregate["diverged_seeds"] = sum(seed["diverged"] for seed in seeds.values())
    best = best_seed(results)
    return {
        "variant": variant,
        "seeds": [result.seed for result in results],
        "precision": params.precision,
        "diverged": aggregate["diverged_seeds"] > 0,
        "per_seed": seeds,
        "aggregate": aggregate,
        "model_seed": best.seed if best else None,
    }


def print_epoch(seed: int, record: dict) -> None:
    validation = (
        ""
        if record["validation_accuracy"] is None
        else f"  validation loss {record['validation_loss']:.4f}  validation acc {record['validation_accuracy']:.4f}"
    )
    print(
        f"seed {seed}  epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
        f"train acc {record['train_accuracy']:.4f}{validation}",
        flush=True,
    )


def print_divergence(result: TrainResult) -> None:
    if result.diverged:
        print(
            f"seed {result.seed} diverged: non-finite loss ({result.diverged['loss']}) at epoch "
            f"{result.diverged['epoch']}, step {result.diverged['step']}; no model saved"
        )


def save_models(directory: Path, params: config.TrainParams, results: list[TrainResult]) -> None:
    """Every seed's model (state dict and architecture; a diverged seed's JSON says so instead), replaced whole."""
    with atomic_dir(directory) as temp:
        for result in results:
            path = temp / f"seed-{result.seed}.pt"
            described = {**architecture(params), "seed": result.seed, "diverged": result.diverged is not None}
            if result.diverged:
                write_json(path.with_suffix(".json"), described)
            else:
                mlp.save(result.model, path, described)


def architecture(params: config.TrainParams) -> dict:
    return {
        "impl": params.impl,
        "hidden": list(params.hidden),
        "activation": params.activation,
        "inputs": mlp.INPUTS,
        "outputs": mlp.OUTPUTS,
    }


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.pt and validation.pt")
    parser.add_argument(
        "--stats", type=Path, required=True, help="prepare's JSON (normalization, for the MLflow model)"
    )
    parser.add_argument("--models", type=Path, required=True, help="directory for seed-<s>.pt and seed-<s>.json")
    parser.add_argument("--summary", type=Path, required=True, help="JSON: per-seed figures, means and spreads")
    parser.add_argument("--history", type=Path, required=True, help="CSV, one row per epoch (mean and std over seeds)")
    parser.add_argument(
        "--checkpoints", type=Path, help="directory of resumable state, removed once the stage succeeds"
    )
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    train_params = params.variant(args.variant)
    train_data, validation_data = (load_split(args.data / f"{split}.pt") for split in ("train", "validation"))
    resolve_device(train_params.device)  # fail on a missing device before any work
    checkpoint = args.checkpoints / CHECKPOINT if args.checkpoints else None
    report = lambda seed, record: print_epoch(seed, record)  # noqa: E731
    with cpu.shared_threads():
        results = run(train_params, train_data, validation_data, checkpoint, report)
    for result in results:
        print_divergence(result)
    print(f"trained {len(results)} seeds in {sum(result.seconds for result in results):.2f} s")  # MLflow keeps it too
    summary = summarize(args.variant, train_params, results)
    save_models(args.models, train_params, results)  # first: a full disk fails here, with our message
    write_text(args.history, history_csv(results))
    from pipeline import mlflow_runs

    mlflow_runs.log_training(args, params, train_params, results, summary)
    write_json(args.summary, summary)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
