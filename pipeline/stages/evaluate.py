"""Stage `evaluate`: test loss and accuracy, per-class accuracy, confusion matrix, and d2l's quality gates.

d2l's train_ch3 asserts train loss < 0.5 and train and test accuracy > 0.7 and dies with an
AssertionError when they fail (as unscaled init does); here each gate is reported as pass or fail.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from pipeline import cli, config, model as mlp
from pipeline.datasets import class_names
from pipeline.cli import stage_entry
from pipeline.files import pyplot, read_json, write_json, write_png
from pipeline.tensors import load_split
from pipeline.losses import LOSSES


@torch.inference_mode()
def run(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: int, loss: str = "cross_entropy") -> dict:
    """Test loss, accuracy, the confusion matrix (rows: actual, columns: predicted) and per-class accuracy."""
    net.eval()
    logits = net(images)
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    rows = confusion.tolist()
    return {"test_loss": LOSSES[loss](logits, labels).item(),
            "test_accuracy": (predicted == labels).sum().item() / len(labels),
            "per_class_accuracy": [row[index] / max(sum(row), 1) for index, row in enumerate(rows)],
            "confusion": rows}


def gates(train_metrics: dict, test_accuracy: float | None, thresholds: config.EvaluateParams) -> dict:
    """d2l's train_ch3 assertions as pass/fail; a missing value (diverged run) fails its gate."""
    checks = {"train_loss": (train_metrics.get("train_loss"), "<", thresholds.max_train_loss),
              "train_accuracy": (train_metrics.get("train_accuracy"), ">", thresholds.min_train_accuracy),
              "test_accuracy": (test_accuracy, ">", thresholds.min_test_accuracy)}
    return {name: {"value": value, "threshold": f"{op} {limit}",
                   "passed": value is not None and (value < limit if op == "<" else limit < value <= 1)}
            for name, (value, op, limit) in checks.items()}


def confusion_records(confusion: list[list[int]], names: tuple[str, ...]) -> list[dict]:
    """One {actual, predicted} row per test image: the shape `dvc plots`' confusion template reads."""
    return [{"actual": names[actual], "predicted": names[predicted]}
            for actual, row in enumerate(confusion) for predicted, count in enumerate(row) for _ in range(count)]


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
                axes.text(predicted, actual, count, ha="center", va="center", fontsize=7,
                          color="white" if count > max(map(max, confusion)) / 2 else "black")
    axes.set_title(title)
    figure.tight_layout()
    write_png(path, figure)


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with test.pt")
    parser.add_argument("--model", type=Path, required=True, help="model.pt written by train")
    parser.add_argument("--train-metrics", type=Path, required=True, help="train's JSON (holds the MLflow run id)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of test metrics and gates")
    parser.add_argument("--confusion", type=Path, required=True, help="JSON rows for dvc plots")
    parser.add_argument("--confusion-png", type=Path, required=True)
    args = parser.parse_args()
    params = config.load(args.params)
    train_metrics = read_json(args.train_metrics)
    images, labels = load_split(args.data / "test.pt")
    names = class_names(params.data.dataset, int(labels.max()) + 1)
    loss = params.variant(args.variant).loss
    result = None if train_metrics["diverged"] else run(mlp.load(args.model), images, labels, len(names), loss)
    report = {"variant": args.variant, "diverged": train_metrics["diverged"],
              "test_loss": result and result["test_loss"], "test_accuracy": result and result["test_accuracy"],
              "per_class_accuracy": dict(zip(names, result["per_class_accuracy"])) if result else {},
              "gates": gates(train_metrics, result and result["test_accuracy"], params.evaluate),
              "mlflow_run_id": train_metrics["mlflow_run_id"]}
    report["passed"] = all(gate["passed"] for gate in report["gates"].values())
    log_and_write(args, params, report, result, names)


def log_and_write(args: argparse.Namespace, params: config.Params, report: dict, result: dict | None,
                  names: tuple[str, ...]) -> None:
    """Add the test figures to the variant's train run in MLflow, then write the DVC outputs."""
    from pipeline import tracking

    with tracking.stage_run("evaluate", params.mlflow.experiment, run_id=report["mlflow_run_id"]):
        import mlflow

        confusion = result["confusion"] if result else None
        draw_confusion(args.confusion_png, confusion, names, f"{args.variant}: confusion matrix (test)")
        metrics = {f"gate_{name}": float(gate["passed"]) for name, gate in report["gates"].items()}
        metrics["gates_passed"] = float(report["passed"])
        if result:
            metrics.update({"eval_test_loss": result["test_loss"], "eval_test_accuracy": result["test_accuracy"]})
            metrics.update({f"class_accuracy_{name.replace(' ', '_').replace('-', '_')}": value
                            for name, value in report["per_class_accuracy"].items()})
            mlflow.log_dict({"classes": list(names), "confusion": confusion}, "evaluate/confusion.json")
        mlflow.log_metrics(metrics)
        mlflow.set_tag("gates", "pass" if report["passed"] else "fail")
        mlflow.log_artifact(str(args.confusion_png), "evaluate")
        write_json(args.confusion, confusion_records(confusion, names) if confusion else [])
        write_json(args.metrics, report)
    verdict = "PASS" if report["passed"] else "FAIL"
    failed = [f"{name} {gate['value']} (needs {gate['threshold']})" for name, gate in report["gates"].items()
              if not gate["passed"]]
    print(f"{args.variant}: test accuracy {report['test_accuracy']}, gates {verdict}"
          + (f": {'; '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
