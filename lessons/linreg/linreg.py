"""Stage `linreg`: d2l 3.2, linear regression from scratch (explicit w and b, squared loss, minibatch SGD by hand).

On 1000 synthetic examples of y = Xw + b + noise (w = [2, -3.4], b = 4.2, noise std 0.01), three epochs
of batch 10 at lr 0.03 bring the loss to about 5e-5 (the noise floor, 0.01^2 / 2) and recover w and b
to within about 1e-3 of the truth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from pipeline import cli, tracking
from pipeline.cli import stage_entry
from pipeline.files import pyplot, write_json, write_png
from pipeline.params_file import (
    Count,
    NonNegativeNumber,
    Number,
    PositiveNumber,
    Seed,
    Text,
    load_section,
    params_class,
)

PARAMS = Path("lessons/linreg/params.yaml")


@params_class
class LinregParams:
    experiment: Text  # the MLflow experiment of the lesson runs
    true_w: Annotated[tuple[Number, ...], Field(min_length=1, description="a non-empty list of numbers")]
    true_b: Number
    noise_std: NonNegativeNumber
    examples: Count
    batch_size: Count
    lr: PositiveNumber
    epochs: Count
    seed: Seed


@dataclass
class LinregResult:
    w: torch.Tensor
    b: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    losses: list[float] = field(default_factory=list)  # mean squared loss on all examples after each epoch


def synthetic_data(
    true_w: torch.Tensor, true_b: float, noise_std: float, examples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """d2l's synthetic_data: features ~ N(0, 1), labels = features @ w + b + N(0, noise_std^2)."""
    features = torch.randn(examples, len(true_w), generator=generator)
    labels = features @ true_w + true_b + noise_std * torch.randn(examples, generator=generator)
    return features, labels


def linreg(features: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return features @ w + b


def squared_loss(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d2l's squared loss, halved so that its gradient is just the residual."""
    return (predicted - labels) ** 2 / 2


def sgd_epoch(
    w: torch.Tensor,
    b: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> None:
    """One pass in random order, updating w and b in place by the mean gradient of each minibatch."""
    for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
        squared_loss(linreg(features[batch], w, b), labels[batch]).sum().backward()
        with torch.no_grad():
            for parameter in (w, b):
                # d2l divides by batch_size; len(batch) is the same except for a short last batch.
                parameter -= lr * parameter.grad / len(batch)
                parameter.grad.zero_()


def run(params: LinregParams, report: Callable[[int, float], None] = lambda epoch, loss: None) -> LinregResult:
    """Generate the data, then fit w ~ N(0, 0.01^2) and b = 0 by minibatch SGD; report(epoch, loss) after each epoch."""
    generator = torch.Generator().manual_seed(params.seed)
    true_w = torch.tensor(params.true_w)
    features, labels = synthetic_data(true_w, params.true_b, params.noise_std, params.examples, generator)
    w = torch.normal(0.0, 0.01, size=true_w.shape, generator=generator).requires_grad_()
    b = torch.zeros((), requires_grad=True)
    result = LinregResult(w, b, features, labels)
    for epoch in range(1, params.epochs + 1):
        sgd_epoch(w, b, features, labels, params.batch_size, params.lr, generator)
        with torch.no_grad():
            result.losses.append(squared_loss(linreg(features, w, b), labels).mean().item())
        report(epoch, result.losses[-1])
    return result


def summary(params: LinregParams, result: LinregResult) -> dict:
    """The final figures DVC tracks: recovered w and b, their absolute errors, the final loss."""
    w, b = result.w.detach().tolist(), result.b.item()
    return {
        "w": w,
        "b": b,
        "true_w": list(params.true_w),
        "true_b": params.true_b,
        "w_error": [abs(recovered - true) for recovered, true in zip(w, params.true_w)],
        "b_error": abs(b - params.true_b),
        "final_loss": result.losses[-1],
    }


def draw_fit(path: Path, result: LinregResult) -> None:
    """Loss per epoch, and the data against the last feature with the other features' fitted part removed."""
    plt = pyplot()

    w, b = result.w.detach(), result.b.item()
    feature = result.features[:, -1]
    residual = result.labels - result.features[:, :-1] @ w[:-1]  # what the last feature and b must explain
    figure, (loss_axes, fit_axes) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(result.losses) + 1)
    loss_axes.semilogy(epochs, result.losses, marker="o")
    loss_axes.set(xticks=epochs, xlabel="epoch", ylabel="squared loss (all examples)", title="loss per epoch")
    fit_axes.scatter(feature, residual, s=4, alpha=0.5, label="data")
    line = torch.linspace(float(feature.min()), float(feature.max()), 2)
    fit_axes.plot(line, w[-1] * line + b, color="red", label=f"fit: {w[-1]:.4f} x + {b:.4f}")
    fit_axes.set(xlabel=f"feature {len(w) - 1}", ylabel="label minus the other features' part", title="fitted line")
    fit_axes.legend()
    figure.tight_layout()
    write_png(path, figure)


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__, PARAMS)
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of the recovered w and b")
    parser.add_argument("--plot", type=Path, required=True, help="PNG of the loss and the fitted line")
    args = parser.parse_args()
    linreg_params = load_section(args.params, "linreg", LinregParams)
    with tracking.stage_run("linreg", linreg_params.experiment):
        import mlflow

        mlflow.log_params(dataclasses.asdict(linreg_params))

        def report(epoch: int, loss: float) -> None:
            print(f"epoch {epoch}, loss {loss:.6f}", flush=True)
            mlflow.log_metric("loss", loss, step=epoch)

        result = run(linreg_params, report)
        metrics = summary(linreg_params, result)
        mlflow.log_metrics(
            {
                "b": metrics["b"],
                "b_error": metrics["b_error"],
                **{f"w_{index}": value for index, value in enumerate(metrics["w"])},
                **{f"w_{index}_error": value for index, value in enumerate(metrics["w_error"])},
            }
        )
        draw_fit(args.plot, result)
        mlflow.log_artifact(str(args.plot), "linreg")
        write_json(args.metrics, metrics)
    print(f"w {metrics['w']} (error {metrics['w_error']}), b {metrics['b']:.6f} (error {metrics['b_error']:.2e})")


if __name__ == "__main__":
    main()
