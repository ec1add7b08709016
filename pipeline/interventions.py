"""Training recipes for the init-scale interventions and the phase diagram: one chunk of models trained together.

A chunk is models that share a recipe (optimizer, learning rate, logit scale, weight decay) and an input scaling,
each with its own init point and seed; it trains through the one batched trainer and returns each model's figures
per epoch. It is a plain function of (chunk, shared data), so pipeline/executor.py runs it here or as a Ray task.

Two facts the recipes rest on (tests/test_interventions.py checks both):
- Temperature, by ReLU's homogeneity: scaling W1, b1, W2 by c and b2 by c^2 scales the logits by c^2, and SGD at
  lr on the scaled network is SGD on the original with the loss CE(c^2 f) / c^2 at lr for W1, b1 and W2 and at
  lr / c^2 for b2. A recipe's `logit_scale` s is that c^2 (the classifier's logits are s f; the gradient is that of
  CE(s f) / s) and `b2_lr_factor` is 1 / s, so a recipe and its scaled twin follow one trajectory.
- The conserved quantity: per hidden unit, ||W1[:, i]||^2 + b1[i]^2 - ||W2[i, :]||^2 does not move under gradient
  flow, so a unit's in- and out-weights cannot shrink apart; weight decay breaks it, Adam's steps do not scale
  with the weights.

Both input scalings come from the one prepared dataset: `standardized` (train mean and std) and `pixels` (d2l's
own inputs, [0, 1]); whichever prepare wrote is used as is, the other is derived with prepare's statistics.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import batched
from pipeline import model as mlp
from pipeline.errors import PipelineError
from pipeline.spread import mean_and_std
from pipeline.tensors import load_split

INPUTS = ("standardized", "pixels")


@dataclass(frozen=True)
class Point:
    """An init: W1 and W2 ~ N(0, std^2), zero biases; None for nn.Linear's default init of that layer."""

    label: str
    w1_std: float | None
    w2_std: float | None


def init_points(stds: tuple[float, ...], mixed: tuple, pytorch_default: bool) -> list[Point]:
    """The study's grid (W1 and W2 alike), then the mixed pairs, then PyTorch's default, in params.yaml's order."""
    grid = [Point(f"std {std:g}", std, std) for std in stds]
    pairs = [Point(f"W1 {w1:g}, W2 {w2:g}", w1, w2) for w1, w2 in mixed]
    return grid + pairs + ([Point("pytorch default", None, None)] if pytorch_default else [])


@dataclass(frozen=True)
class Recipe:
    """How a chunk's models train: torch.optim optimizer, lr, the logit scale (temperature) and b2's lr factor."""

    optimizer: str = "sgd"
    lr: float = 0.1
    logit_scale: float = 1.0
    b2_lr_factor: float = 1.0
    weight_decay: float = 0.0  # torch.optim's, on every parameter


@dataclass(frozen=True)
class Chunk:
    """Models trained together: one recipe and input scaling; per model an init (W1 std, W2 std; None = PyTorch's
    default) and a seed (init draw and shuffling)."""

    recipe: Recipe
    inputs: str
    inits: tuple[tuple[float | None, float | None], ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    hidden: int
    precision: str = "fp32"


def input_scaling(data: dict, stats: dict, inputs: str) -> dict:
    """The prepared splits ({split: (images, labels)}) in the named input scaling; `stats` is prepare's record."""
    if inputs not in INPUTS:
        raise PipelineError(f"inputs: got {inputs!r}, expected one of {', '.join(INPUTS)}")
    if (inputs == "standardized") == bool(stats["normalize"]):
        return data
    if stats["normalize"]:  # back to [0, 1] pixels with the statistics prepare standardized by
        return {split: (images * stats["std"] + stats["mean"], labels) for split, (images, labels) in data.items()}
    pixels = data["train"][0].double()  # float64: a float32 sum over 43M pixels loses digits
    mean, std = pixels.mean().item(), pixels.std().item()
    return {split: ((images - mean) / std, labels) for split, (images, labels) in data.items()}


def conserved(models: batched.Stack) -> torch.Tensor:
    """Per model and hidden unit [M, H]: ||W1[:, i]||^2 + b1[i]^2 - ||W2[i, :]||^2 (weights stored [in, out]).
    ReLU is positively homogeneous, so gradient flow keeps it constant and an SGD step at lr changes it by exactly
    lr^2 (||g_W1[:, i]||^2 + g_b1[i]^2 - ||g_W2[i, :]||^2): the unit's in- and out-weights grow or shrink together."""
    weights_in, bias, weights_out = models.weights[0], models.biases[0], models.weights[1]
    return weights_in.pow(2).sum(1) + bias.pow(2) - weights_out.pow(2).sum(2)


@torch.no_grad()
def travel(models: batched.Stack, initial_w1: torch.Tensor, initial_conserved: torch.Tensor) -> dict:
    """How far training moved each model from its init: the conserved quantity's mean over units, its mean and
    largest absolute drift per unit, and ||W1 - W1(0)|| / ||W1(0)||; name -> [M]."""
    now = conserved(models)
    drift = (now - initial_conserved).abs()
    return {
        "conserved_mean": now.mean(1),
        "conserved_drift_mean": drift.mean(1),
        "conserved_drift_max": drift.amax(1),
        "w1_travel": (models.weights[0] - initial_w1).flatten(1).norm(dim=1) / initial_w1.flatten(1).norm(dim=1),
    }


def optimizer(recipe: Recipe, models: batched.Stack) -> torch.optim.Optimizer:
    """The recipe's torch.optim optimizer over the stack, b2 (the last layer's bias) at lr * b2_lr_factor."""
    options = {"weight_decay": recipe.weight_decay} if recipe.weight_decay else {}
    step = batched.optimizer(recipe.optimizer, models, recipe.lr, **options)
    if recipe.b2_lr_factor != 1.0:
        output_bias = models.biases[-1]
        rest = [parameter for parameter in models.parameters() if parameter is not output_bias]
        groups = [{"params": rest}, {"params": [output_bias], "lr": recipe.lr * recipe.b2_lr_factor}]
        step = batched.OPTIMIZERS[recipe.optimizer](groups, lr=recipe.lr, **options)
    return step


def build(chunk: Chunk, device: torch.device) -> batched.Stack:
    """The chunk's models at their inits, drawn as train and init_scale draw them for the same seed."""
    nets = [
        mlp.build("module", (chunk.hidden,), "relu", init, torch.Generator().manual_seed(seed))
        for init, seed in zip(chunk.inits, chunk.seeds)
    ]
    return batched.stack(nets, device)


def train_chunk(chunk: Chunk, shared: dict) -> list[list[dict]]:
    """Train the chunk's models for chunk.epochs on shared's data (prepared splits and prepare's stats) in the
    chunk's input scaling; per model, one record per epoch: train loss (the epoch's mean minibatch loss, as d2l
    reports it), validation accuracy, and how far the weights travelled (null from a non-finite loss on)."""
    data = input_scaling(shared["data"], shared["stats"], chunk.inputs)
    (images, labels), validation = data["train"], data["validation"]
    models = build(chunk, images.device)
    initial = (models.weights[0].detach().clone(), conserved(models).detach())
    step = optimizer(chunk.recipe, models)
    shuffles = [torch.Generator(device=images.device).manual_seed(seed) for seed in chunk.seeds]
    histories: list[list[dict]] = [[] for _ in chunk.seeds]
    for epoch in range(1, chunk.epochs + 1):
        step_losses, _ = batched.train_epoch(
            models, step, images, labels, chunk.batch_size, shuffles, "cross_entropy", chunk.precision,
            logit_scale=chunk.recipe.logit_scale,
        )  # fmt: skip
        train_loss = (step_losses.sum(1) / len(labels)).tolist()
        accuracy = batched.evaluate(models, *validation, logit_scale=chunk.recipe.logit_scale).accuracy.tolist()
        moved = {name: values.tolist() for name, values in travel(models, *initial).items()}
        for index, history in enumerate(histories):
            finite = math.isfinite(train_loss[index]) and not (history and history[-1]["train_loss"] is None)
            record = {"train_loss": train_loss[index], "validation_accuracy": accuracy[index]}
            record.update({name: values[index] for name, values in moved.items()})
            history.append({"epoch": epoch, **{k: (v if finite else None) for k, v in record.items()}})
    return histories


def load_shared(data_dir: Path, stats_path: Path) -> dict:
    """The prepared train and validation splits and prepare's statistics: what every chunk reads."""
    stats = json.loads(stats_path.read_text())
    data = {split: load_split(data_dir / f"{split}.pt") for split in ("train", "validation")}
    if not len(data["validation"][1]):
        raise PipelineError("prepare.validation: got 0, expected held-out images: the figures are validation accuracy")
    return {"data": data, "stats": stats}


def seed_summary(histories: list[list[dict]], loss_gate: float) -> dict:
    """One cell's seeds at their last epoch: mean and std of each figure, finite seeds, and the fraction of seeds
    whose train loss passes the gate (a non-finite loss fails it)."""
    last = [history[-1] for history in histories]
    figures: dict = {"finite_seeds": sum(record["train_loss"] is not None for record in last)}
    for name in ("train_loss", "validation_accuracy", "w1_travel", "conserved_drift_max"):
        figures[f"{name}_mean"], figures[f"{name}_std"] = mean_and_std([record[name] for record in last])
    passing = [record["train_loss"] is not None and record["train_loss"] < loss_gate for record in last]
    figures["gate_pass_fraction"] = sum(passing) / len(last)
    return figures


def log_model_runs(stage: str, experiment: str, params: dict, runs: list[dict], summary: dict, files: list[Path]):
    """The stage's MLflow run (its params, its JSON and files) and one nested run per model: `runs` items hold
    name, params, history (one record per epoch, logged with step = epoch) and node (the Ray node that trained it,
    a tag: node ids change every run, so they stay out of the committed JSON)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from pipeline import tracking

    with tracking.stage_run(stage, experiment) as parent:
        mlflow.log_params(params)
        client, now = mlflow.MlflowClient(), int(time.time() * 1000)
        tags = {**tracking.lineage_tags(stage), "mlflow.parentRunId": parent.info.run_id}
        for run in runs:
            child = client.create_run(parent.info.experiment_id, run_name=run["name"], tags=tags)
            metrics = [
                Metric(key, value, now, record["epoch"])
                for record in run["history"]
                for key, value in record.items()
                if key != "epoch" and value is not None
            ]
            client.log_batch(
                child.info.run_id,
                metrics=metrics,
                params=[Param(key, str(value)) for key, value in run["params"].items()],
                tags=[RunTag("ray_node", run["node"])],
            )
            client.set_terminated(child.info.run_id, "FINISHED")
        for path in files:
            mlflow.log_artifact(str(path))
        mlflow.log_dict(summary, f"{stage}.json")
