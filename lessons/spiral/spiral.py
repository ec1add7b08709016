"""Stage `spiral`: cs231n's spiral, where a linear (softmax) classifier fails and a one-hidden-layer MLP succeeds.

On 3 arms of 100 points (angle noise 0.2), 500 full-batch Adam steps give the softmax classifier
about 0.55 train accuracy (chance is 0.33; straight boundaries cannot follow arms that wind through
every sector), while MLPs with 64 hidden units reach about 0.99 with any of relu, sigmoid, tanh or leaky_relu.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import nn

from pipeline import cli, tracking
from pipeline.cli import stage_entry
from pipeline.files import pyplot, write_json, write_png
from pipeline.model import MODULE_ACTIVATIONS
from pipeline.params_file import (
    Activation,
    Count,
    Integer,
    NonNegativeNumber,
    Number,
    PositiveNumber,
    Seed,
    Text,
    distinct,
    load_section,
    params_class,
)

PARAMS = Path("lessons/spiral/params.yaml")


@params_class
class SpiralParams:
    experiment: Text  # the MLflow experiment of the lesson runs
    classes: Annotated[Integer, Field(ge=2, description="an integer >= 2")]
    points_per_class: Annotated[Integer, Field(ge=2, description="an integer >= 2")]
    noise: NonNegativeNumber
    test_fraction: Annotated[Number, Field(gt=0, lt=1, description="a number > 0 and < 1")]
    activations: Annotated[
        tuple[Activation, ...],
        Field(min_length=1),
        AfterValidator(distinct),
        Field(description="a non-empty list without repeats"),
    ]
    hidden: Count
    lr: PositiveNumber
    steps: Count
    seed: Seed


LINEAR = "linear"
CURVE_POINTS = 20  # loss points per model sent to MLflow


@dataclass
class ModelResult:
    net: nn.Module
    losses: list[float]  # the full-batch training loss of each step, taken before its update
    train_accuracy: float
    test_accuracy: float


@dataclass
class SpiralResult:
    train_points: torch.Tensor
    train_labels: torch.Tensor
    test_points: torch.Tensor
    test_labels: torch.Tensor
    models: dict[str, ModelResult]


def make_spiral(
    classes: int, points_per_class: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """cs231n's spiral: arm k has radius 0..1 and angle 4k..4k+4 radians plus N(0, noise^2)."""
    labels = torch.arange(classes).repeat_interleave(points_per_class)
    radius = torch.linspace(0, 1, points_per_class).repeat(classes)
    angle = torch.linspace(0, 4, points_per_class).repeat(classes) + 4 * labels
    angle = angle + noise * torch.randn(len(labels), generator=generator)
    return torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1), labels


def build_net(name: str, hidden: int, classes: int, generator: torch.Generator) -> nn.Sequential:
    """`linear` is softmax regression (2 -> classes); an activation name gives 2 -> hidden -> classes."""
    if name == LINEAR:
        net = nn.Sequential(nn.Linear(2, classes))
    else:
        net = nn.Sequential(nn.Linear(2, hidden), MODULE_ACTIVATIONS[name](), nn.Linear(hidden, classes))
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):  # PyTorch's default range, drawn from our generator
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return net


@torch.no_grad()
def adam_step(
    parameters: list[torch.Tensor],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """d2l 12.10's Adam, in place; moments holds each parameter's running mean of grad and of grad^2."""
    for parameter, (mean, square) in zip(parameters, moments):
        mean.mul_(betas[0]).add_(parameter.grad, alpha=1 - betas[0])
        square.mul_(betas[1]).addcmul_(parameter.grad, parameter.grad, value=1 - betas[1])
        corrected_mean, corrected_square = mean / (1 - betas[0] ** step), square / (1 - betas[1] ** step)
        parameter -= lr * corrected_mean / (corrected_square.sqrt() + eps)
        parameter.grad = None


def fit(net: nn.Module, points: torch.Tensor, labels: torch.Tensor, lr: float, steps: int) -> list[float]:
    """Full-batch Adam on cross-entropy; returns the loss at each step."""
    # Written out rather than torch.optim.Adam, whose first use imports torch._dynamo: 2.5 s of a 10 s stage.
    parameters = list(net.parameters())
    moments = [(torch.zeros_like(parameter), torch.zeros_like(parameter)) for parameter in parameters]
    losses = []
    for step in range(1, steps + 1):
        loss = F.cross_entropy(net(points), labels)
        loss.backward()
        adam_step(parameters, moments, step, lr)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(net: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> float:
    return (net(points).argmax(1) == labels).float().mean().item()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on tensors this small a second one saves nothing, and while other
    processes hold the cores, OpenMP's spin-waiting made 500 steps take minutes instead of a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def run(params: SpiralParams) -> SpiralResult:
    """Make the spiral, hold out params.test_fraction of it, and train the linear model and each MLP."""
    generator = torch.Generator().manual_seed(params.seed)
    points, labels = make_spiral(params.classes, params.points_per_class, params.noise, generator)
    order = torch.randperm(len(labels), generator=generator)
    held_out = min(max(round(len(labels) * params.test_fraction), 1), len(labels) - 1)
    test, train = order[:held_out], order[held_out:]
    result = SpiralResult(points[train], labels[train], points[test], labels[test], {})
    for name in (LINEAR, *params.activations):
        net = build_net(name, params.hidden, params.classes, generator)
        losses = fit(net, result.train_points, result.train_labels, params.lr, params.steps)
        result.models[name] = ModelResult(
            net,
            losses,
            accuracy(net, result.train_points, result.train_labels),
            accuracy(net, result.test_points, result.test_labels),
        )
    return result


def summary(result: SpiralResult) -> dict:
    """The final figures DVC tracks: each model's final loss and train and test accuracy."""
    models = {
        name: {
            "final_loss": model.losses[-1],
            "train_accuracy": model.train_accuracy,
            "test_accuracy": model.test_accuracy,
        }
        for name, model in result.models.items()
    }
    return {
        "models": models,
        "train_examples": len(result.train_labels),
        "test_examples": len(result.test_labels),
    }


@one_thread()
@torch.no_grad()
def predict_grid(net: nn.Module, low: torch.Tensor, high: torch.Tensor, resolution: int = 200) -> torch.Tensor:
    """The predicted class on a resolution x resolution grid from low to high (rows: y, columns: x)."""
    xs, ys = (torch.linspace(float(low[axis]), float(high[axis]), resolution) for axis in (0, 1))
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return net(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)).argmax(1).reshape(resolution, resolution)


def draw_regions(path: Path, result: SpiralResult) -> None:
    """One panel per model: its decision regions, the training points (dots) and held-out points (crosses)."""
    plt = pyplot()

    all_points = torch.cat([result.train_points, result.test_points])
    low, high = all_points.min(0).values - 0.1, all_points.max(0).values + 0.1
    extent = (float(low[0]), float(high[0]), float(low[1]), float(high[1]))
    classes = int(torch.cat([result.train_labels, result.test_labels]).max()) + 1
    columns = min(3, len(result.models))
    rows = math.ceil(len(result.models) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    colors = dict(cmap="viridis", vmin=0, vmax=classes - 1)
    for axes, (name, model) in zip(axes_grid.flat, result.models.items()):
        axes.imshow(predict_grid(model.net, low, high), origin="lower", extent=extent, alpha=0.35, **colors)
        axes.scatter(*result.train_points.T, c=result.train_labels, s=10, edgecolors="black", linewidths=0.3, **colors)
        axes.scatter(*result.test_points.T, c=result.test_labels, s=25, marker="x", **colors)
        axes.set(
            title=f"{name}: train {model.train_accuracy:.2f}, test {model.test_accuracy:.2f}", xticks=[], yticks=[]
        )
    for axes in list(axes_grid.flat)[len(result.models) :]:
        axes.set_axis_off()
    figure.tight_layout()
    write_png(path, figure)


def log_curves(result: SpiralResult, run_id: str) -> None:
    """Each model's loss at CURVE_POINTS evenly spaced steps, in one MLflow call (log_metric is one row per call)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{name}_loss", model.losses[step - 1], now, step)
        for name, model in result.models.items()
        for step in range(1, len(model.losses) + 1, max(1, len(model.losses) // CURVE_POINTS))
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__, PARAMS)
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of each model's accuracy")
    parser.add_argument("--plot", type=Path, required=True, help="PNG grid of decision regions")
    args = parser.parse_args()
    spiral_params = load_section(args.params, "spiral", SpiralParams)
    with tracking.stage_run("spiral", spiral_params.experiment) as mlflow_run:
        import mlflow

        mlflow.log_params(dataclasses.asdict(spiral_params))
        result = run(spiral_params)
        metrics = summary(result)
        for name, figures in metrics["models"].items():
            print(
                f"{name:>10}: final loss {figures['final_loss']:.4f}  train acc {figures['train_accuracy']:.4f}  "
                f"test acc {figures['test_accuracy']:.4f}",
                flush=True,
            )
            mlflow.log_metrics({f"{name}_{key}": value for key, value in figures.items()})
        log_curves(result, mlflow_run.info.run_id)
        draw_regions(args.plot, result)
        mlflow.log_artifact(str(args.plot), "spiral")
        write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
