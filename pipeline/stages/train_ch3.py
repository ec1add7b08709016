"""Stage `train_ch3`: d2l's own training code at chosen init points, on d2l's own inputs, with its verdict.

What the phase diagram says about an init point on d2l's [0, 1] pixels, checked against the book's code itself:
the concise MLP of section 5.2 (nn.Sequential with nn.Flatten; `init_weights` draws each weight from N(0, std^2)
and leaves the biases at nn.Linear's default, as the book does), a DataLoader of batches of 256 over all 60,000
train images in a shuffled order, SGD, and train_ch3's loop with its three assertions after the last epoch:
train loss < 0.5, 0.7 < train accuracy <= 1 and 0.7 < test accuracy <= 1. The images are the raw IDX files
divided by 255, which is what torchvision's ToTensor gives the book (the same numbers, without the per-image
PIL round trip), and d2l's test accuracy comes from its evaluate_accuracy on the test split, as the book's
assertion needs: it is reported, never used to choose anything. Each seed fixes the init draw and the shuffle.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.utils import data

from pipeline import cli, config, cpu, tracking
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import write_json, write_text
from pipeline.interventions import log_model_runs
from pipeline.spread import mean_and_std
from pipeline.stages.prepare import read_raw_split

GATE = 0.5  # train_ch3: assert train_loss < 0.5
MIN_ACCURACY = 0.7  # train_ch3: assert 0.7 < train_acc <= 1 and 0.7 < test_acc <= 1


def d2l_net(w1_std: float, w2_std: float) -> nn.Sequential:
    """Section 5.2's net with its init_weights, at (W1 std, W2 std); the biases keep nn.Linear's default."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    nn.init.normal_(net[1].weight, std=w1_std)
    nn.init.normal_(net[3].weight, std=w2_std)
    return net


def accuracy(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    """d2l's accuracy: the number of correct predictions."""
    return float((y_hat.argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())


def evaluate_accuracy(net: nn.Module, data_iter) -> float:
    """d2l's evaluate_accuracy."""
    net.eval()
    correct, count = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            correct += accuracy(net(X), y)
            count += y.numel()
    return correct / count


def train_epoch_ch3(net: nn.Module, train_iter, loss, updater) -> tuple[float, float]:
    """d2l's train_epoch_ch3 (torch.optim updater): the epoch's mean loss and accuracy over its minibatches."""
    net.train()
    total_loss, total_correct, count = 0.0, 0.0, 0
    for X, y in train_iter:
        y_hat = net(X)
        l = loss(y_hat, y)  # noqa: E741 - d2l's names
        updater.zero_grad()
        l.mean().backward()
        updater.step()
        total_loss, total_correct, count = (
            total_loss + float(l.detach().sum()),
            total_correct + accuracy(y_hat, y),
            count + y.numel(),
        )
    return total_loss / count, total_correct / count


def train_ch3(net, train_iter, test_iter, loss, num_epochs: int, updater) -> tuple[list[dict], dict]:
    """d2l's train_ch3, with its assertions as a verdict instead of an AssertionError: per epoch the train loss,
    train accuracy and test accuracy, then which of the three assertions hold after the last epoch."""
    history = []
    for epoch in range(1, num_epochs + 1):
        train_loss, train_acc = train_epoch_ch3(net, train_iter, loss, updater)
        test_acc = evaluate_accuracy(net, test_iter)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "test_accuracy": test_acc}
        )
    return history, verdict(history[-1])


def verdict(last: dict) -> dict:
    """train_ch3's three assertions on the last epoch; `passes` only when all hold (a non-finite loss fails)."""
    loss, train_acc, test_acc = last["train_loss"], last["train_accuracy"], last["test_accuracy"]
    checks = {
        "train_loss_below_gate": loss == loss and loss < GATE,
        "train_accuracy_above_0_7": MIN_ACCURACY < train_acc <= 1,
        "test_accuracy_above_0_7": MIN_ACCURACY < test_acc <= 1,
    }
    return {**checks, "passes": all(checks.values())}


def run(section: config.TrainCh3Params, raw: Path, counts) -> tuple[dict, list[dict]]:
    """Every point and seed through d2l's code; the summary per point and every seed's run for MLflow."""
    splits = {}
    for split in ("train", "test"):
        images, labels = read_raw_split(raw, split, counts)
        splits[split] = data.TensorDataset(images.reshape(-1, 1, 28, 28), labels)  # ToTensor's [1, 28, 28] pixels
    test_iter = data.DataLoader(splits["test"], section.batch_size, shuffle=False)
    points, runs = [], []
    for w1_std, w2_std in section.points:
        label = f"W1 {w1_std:g}, W2 {w2_std:g}"
        seeds = []
        for seed in section.seeds:
            torch.manual_seed(seed)
            net = d2l_net(w1_std, w2_std)
            order = torch.Generator().manual_seed(seed)
            train_iter = data.DataLoader(splits["train"], section.batch_size, shuffle=True, generator=order)
            updater = torch.optim.SGD(net.parameters(), lr=section.lr)
            started = time.perf_counter()
            history, outcome = train_ch3(
                net, train_iter, test_iter, nn.CrossEntropyLoss(reduction="none"), section.epochs, updater
            )
            print(
                f"{label} seed {seed}: train loss {history[-1]['train_loss']:.4f}, train_ch3 "
                f"{'passes' if outcome['passes'] else 'fails'} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            seeds.append({"seed": seed, **history[-1], **outcome})
            params = {"w1_std": w1_std, "w2_std": w2_std, "seed": seed, "lr": section.lr, "epochs": section.epochs}
            runs.append(
                {"name": f"train_ch3 {label} seed {seed}", "params": params, "history": history, "node": "local"}
            )
        points.append({"point": label, "w1_std": w1_std, "w2_std": w2_std, **summarize(seeds), "per_seed": seeds})
    summary = {
        "points": points,
        "seeds": list(section.seeds),
        "epochs": section.epochs,
        "lr": section.lr,
        "batch_size": section.batch_size,
        "train_images": len(splits["train"]),
        "inputs": "pixels",
        "precision": "fp32",
        "mlflow_experiment": section.experiment,
    }
    return summary, runs


def summarize(seeds: list[dict]) -> dict:
    """The point's verdict over seeds: the fraction passing all of train_ch3's assertions and the loss gate alone,
    and the last epoch's figures as mean and std over the seeds."""
    figures = {
        "pass_fraction": sum(seed["passes"] for seed in seeds) / len(seeds),
        "gate_pass_fraction": sum(seed["train_loss_below_gate"] for seed in seeds) / len(seeds),
    }
    for name in ("train_loss", "train_accuracy", "test_accuracy"):
        values = [seed[name] if seed[name] == seed[name] else None for seed in seeds]
        figures[f"{name}_mean"], figures[f"{name}_std"] = mean_and_std(values)
    return figures


def markdown(summary: dict) -> str:
    """One row per point: train_ch3's verdict over seeds and the last epoch's figures."""
    lines = [
        "# d2l's train_ch3 at chosen init points, on its own inputs",
        "",
        f"d2l's concise MLP, train_ch3 and its data ({summary['train_images']} train images as [0, 1] pixels), "
        f"SGD at lr {summary['lr']:g}, batch {summary['batch_size']}, {summary['epochs']} epochs, seeds "
        f"{summary['seeds']}, fp32. Verdict: the fraction of seeds for which all of train_ch3's assertions hold "
        "(train loss < 0.5, train and test accuracy above 0.7), and for the loss assertion alone.",
        "",
        "| point | train_ch3 passes | train loss < 0.5 | train loss | train accuracy | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for point in summary["points"]:
        figures = [_pm(point, name) for name in ("train_loss", "train_accuracy", "test_accuracy")]
        lines.append(
            f"| {point['point']} | {point['pass_fraction']:.0%} | {point['gate_pass_fraction']:.0%} | "
            + " | ".join(figures)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _pm(point: dict, name: str) -> str:
    mean, std = point[f"{name}_mean"], point[f"{name}_std"]
    return "diverged" if mean is None else f"{mean:.4f} ± {std:.4f}"


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="directory of the four IDX files")
    parser.add_argument("--report", type=Path, required=True, help="JSON: per point, train_ch3's verdict")
    parser.add_argument("--table", type=Path, required=True, help="Markdown: the verdict per point")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    section = params.train_ch3
    if section is None:
        raise PipelineError(f"train_ch3: {args.params} has no train_ch3 section; expected its points and seeds")
    with cpu.shared_threads():
        summary, runs = run(section, args.raw, params.data.spec().counts)
    table = markdown(summary)
    stage_params = {"points": [list(point) for point in section.points], "seeds": list(section.seeds)}
    log_model_runs("train_ch3", section.experiment, stage_params, runs, summary, [])
    write_text(args.table, table)
    write_json(args.report, summary)


if __name__ == "__main__":
    main()
