"""Stage `evaluate`: the test split, read once per trained model: loss, accuracy, per-class accuracy, confusion
matrix, and d2l's quality gates, for each seed of a variant.

d2l's train_ch3 asserts train loss < 0.5 and train and test accuracy > 0.7 and dies with an
AssertionError when they fail (as unscaled init does); here each gate is reported as pass or fail per seed,
with the fraction of seeds that pass it. No choice is made here: compare chooses on validation figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from pipeline import cli, config, stats
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.datasets import class_names
from pipeline.files import pyplot, read_json, write_json, write_png
from pipeline.losses import LOSSES
from pipeline.tensors import load_split


@torch.inference_mode()
def run(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: int, loss: str = "cross_entropy") -> dict:
    """Test loss, accuracy, the confusion matrix (rows: actual, columns: predicted) and per-class accuracy."""
    net.eval()
    logits = net(images)
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    rows = confusion.tolist()
    return {
        "test_loss": LOSSES[loss](logits, labels).item(),
        "test_accuracy": (predicted == labels).sum().item() / len(labels),
        "per_class_accuracy": [row[index] / max(sum(row), 1) for index, row in enumerate(rows)],
        "confusion": rows,
    }


def gates(train_metrics: dict, test_accuracy: float | None, thresholds: config.EvaluateParams) -> dict:
    """d2l's train_ch3 assertions as pass/fail; a missing value (diverged run) fails its gate."""
    checks = {
        "train_loss": (train_metrics.get("train_loss"), "<", thresholds.max_train_loss),
        "train_accuracy": (train_metrics.get("train_accuracy"), ">", thresholds.min_train_accuracy),
        "test_accuracy": (test_accuracy, ">", thresholds.min_test_accuracy),
    }
    return {
        name: {
            "value": value,
            "threshold": f"{op} {limit}",
            "passed": value is not None and (value < limit if op == "<" else limit < value <= 1),
        }
        for name, (value, op, limit) in checks.items()
    }


def confusion_records(confusion: list[list[int]], names: tuple[str, ...]) -> list[dict]:
    """One {actual, predicted} row per test image: the shape `dvc plots`' confusion template reads."""
    return [
        {"actual": names[actual], "predicted": names[predicted]}
        for actual, row in enumerate(confusion)
        for predicted, count in enumerate(row)
        for _ in range(count)
    ]


def draw_confusion(path: Path, confusion: list[list[int]] | None, names: tuple[str, ...], title: str) -> None:
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(7, 6))
    if confusion is None:
        axes.text(0.5, 0.5, "diverged: no model to evaluate", ha="center", va="center")
        axes.set_axis_off()
    else:
        image = axes.imshow(confusion, cmap="Blues")
        figure.colorbar(image, ax=axes)
        axes.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="actual")
        axes.set_xticklabels(names, rotation=45, ha="right")
        axes.set_yticklabels(names)
        for actual, row in enumerate(confusion):
            for predicted, count in enumerate(row):
                axes.text(
                    predicted,
                    actual,
                    count,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if count > max(map(max, confusion)) / 2 else "black",
                )
    axes.set_title(title)
    figure.tight_layout()
    write_png(path, figure)


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with test.pt")
    parser.add_argument("--models", type=Path, required=True, help="directory of seed-<s>.pt written by train")
    parser.add_argument("--train-summary", type=Path, required=True, help="train's JSON (per-seed figures, run ids)")
    parser.add_argument("--report", type=Path, required=True, help="JSON: per-seed test figures and gates")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON: the few numbers DVC compares")
    parser.add_argument("--confusion", type=Path, required=True, help="JSON rows for dvc plots (the logged seed)")
    parser.add_argument("--confusion-png", type=Path, required=True)
    args = parser.parse_args()
    params = config.load(args.params)
    trained = read_json(args.train_summary)
    images, labels = load_split(args.data / "test.pt")
    names = class_names(params.data.dataset, mlp.OUTPUTS)
    loss = params.variant(args.variant).loss
    per_seed = {}
    for seed, figures in trained["per_seed"].items():
        result = (
            None
            if figures["diverged"]
            else run(mlp.load(args.models / f"seed-{seed}.pt"), images, labels, len(names), loss)
        )
        per_seed[seed] = seed_report(figures, result, params.evaluate)
    report = summarize(args.variant, trained, per_seed)
    log_and_write(args, params, trained, report, names)


def seed_report(train_figures: dict, result: dict | None, thresholds: config.EvaluateParams) -> dict:
    """One seed's test figures and its gates."""
    seed_gates = gates(train_figures, result and result["test_accuracy"], thresholds)
    return {
        "test_loss": result and result["test_loss"],
        "test_accuracy": result and result["test_accuracy"],
        "per_class_accuracy": result["per_class_accuracy"] if result else None,
        "confusion": result["confusion"] if result else None,
        "gates": seed_gates,
        "passed": all(gate["passed"] for gate in seed_gates.values()),
    }


def summarize(variant: str, trained: dict, per_seed: dict[str, dict]) -> dict:
    """eval.json: per seed, then means, spreads, the test accuracy's 95% interval and the gates' pass fractions."""
    accuracies = [seed["test_accuracy"] for seed in per_seed.values()]
    accuracy_mean, accuracy_std = stats.mean_and_std(accuracies)
    loss_mean, loss_std = stats.mean_and_std([seed["test_loss"] for seed in per_seed.values()])
    interval = (
        stats.t_interval([value for value in accuracies if value is not None]) if None not in accuracies else None
    )
    gate_names = next(iter(per_seed.values()))["gates"]
    model_seed = trained.get("mlflow_model_seed")
    return {
        "variant": variant,
        "seeds": trained["seeds"],
        "test_accuracy_mean": accuracy_mean,
        "test_accuracy_std": accuracy_std,
        "test_accuracy_ci95": list(interval) if interval else None,
        "test_loss_mean": loss_mean,
        "test_loss_std": loss_std,
        "gate_pass_fraction": {
            name: sum(seed["gates"][name]["passed"] for seed in per_seed.values()) / len(per_seed)
            for name in gate_names
        },
        "passed_fraction": sum(seed["passed"] for seed in per_seed.values()) / len(per_seed),
        "passed": all(seed["passed"] for seed in per_seed.values()),
        "model_seed": model_seed,
        "model_seed_test_accuracy": per_seed[str(model_seed)]["test_accuracy"] if model_seed is not None else None,
        "per_seed": {
            seed: {key: value for key, value in figures.items() if key != "confusion"}
            for seed, figures in per_seed.items()
        },
        "_confusion": per_seed[str(model_seed)]["confusion"] if model_seed is not None else None,
    }


def dvc_metrics(trained: dict, report: dict) -> dict:
    """The few numbers `dvc metrics diff` and `dvc exp show` list per variant (means over the seeds)."""
    aggregate = trained["aggregate"]
    return {
        "val_acc": _round(aggregate["validation_accuracy_mean"]),
        "test_acc": _round(report["test_accuracy_mean"]),
        "test_acc_std": _round(report["test_accuracy_std"]),
        "train_loss": _round(aggregate["train_loss_mean"]),
        "gates": report["passed_fraction"],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def log_and_write(args, params: config.Params, trained: dict, report: dict, names: tuple[str, ...]) -> None:
    """Test figures to each seed's MLflow run and the means to the variant's run; then the DVC outputs."""
    from pipeline import tracking

    confusion = report.pop("_confusion")
    with tracking.stage_run("evaluate", params.mlflow.experiment, run_id=trained["mlflow_run_id"]):
        import mlflow

        client = mlflow.MlflowClient()
        for seed, figures in report["per_seed"].items():
            client.log_batch(trained["per_seed"][seed]["mlflow_run_id"], metrics=seed_metrics(figures, names))
            client.set_tag(trained["per_seed"][seed]["mlflow_run_id"], "gates", "pass" if figures["passed"] else "fail")
        mlflow.log_metrics(
            {
                key: value
                for key, value in {
                    "test_accuracy_mean": report["test_accuracy_mean"],
                    "test_accuracy_std": report["test_accuracy_std"],
                    "test_loss_mean": report["test_loss_mean"],
                    "gates_passed_fraction": report["passed_fraction"],
                    **{f"gate_{name}_pass_fraction": value for name, value in report["gate_pass_fraction"].items()},
                }.items()
                if value is not None
            }
        )
        mlflow.set_tag("gates", "pass" if report["passed"] else "fail")
        title = f"{args.variant}: confusion matrix (test), seed {report['model_seed']}"
        draw_confusion(args.confusion_png, confusion, names, title)
        if confusion:
            mlflow.log_dict({"classes": list(names), "confusion": confusion}, "evaluate/confusion.json")
        mlflow.log_artifact(str(args.confusion_png), "evaluate")
        write_json(args.confusion, confusion_records(confusion, names) if confusion else [])
        write_json(args.report, report)
        write_json(args.metrics, dvc_metrics(trained, report))
    print(
        f"{args.variant}: test accuracy {_format(report['test_accuracy_mean'])} "
        f"± {_format(report['test_accuracy_std'])} over seeds {report['seeds']}; gates pass for "
        f"{report['passed_fraction']:.0%} of seeds"
    )


def seed_metrics(figures: dict, names: tuple[str, ...]) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {f"gate_{name}": float(gate["passed"]) for name, gate in figures["gates"].items()}
    values["gates_passed"] = float(figures["passed"])
    if figures["test_accuracy"] is not None:
        values.update(test_loss=figures["test_loss"], test_accuracy=figures["test_accuracy"])
        values.update(
            {
                f"class_accuracy_{name.replace(' ', '_').replace('-', '_')}": value
                for name, value in zip(names, figures["per_class_accuracy"])
            }
        )
    return [Metric(key, value, now, 0) for key, value in values.items()]


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
