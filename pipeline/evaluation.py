"""The test split, read once per trained model to report: loss, accuracy, per-class accuracy, confusion matrix,
and d2l's quality gates, for each seed of a variant (the evaluate stage's work).

d2l's train_ch3 asserts train loss < 0.5 and train and test accuracy > 0.7 and dies with an AssertionError
when they fail (as unscaled init does); here each gate is reported as pass or fail per seed, with the fraction
of seeds that pass it. The test gate is reported only: the choice (compare.select) reads the train gates and
validation figures. The test accuracy's interval resamples both the seeds and the test images.

The same models also go over the validation split once, to record which validation images each seed got right
(`validation_correct`, packed bits): compare's verdicts resample those images as well as the seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import batched, config, stats
from pipeline import model as mlp
from pipeline.files import pyplot, write_png

TRAIN_GATES = ("train_loss", "train_accuracy")  # what the choice may read; test_accuracy is reported only


def run(models: batched.Stack, images: torch.Tensor, labels: torch.Tensor, classes: int, loss: str) -> list[dict]:
    """Per model: test loss, accuracy, the confusion matrix (rows: actual, columns: predicted), per-class
    accuracy, and which images were right (for the bootstrap; not written out)."""
    figures = batched.evaluate(models, images, labels, loss)
    reports = []
    for index in range(models.models):
        predicted = figures.predictions[index]
        confusion = torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, -1)
        rows = confusion.tolist()
        reports.append(
            {
                "test_loss": figures.loss[index].item(),
                "test_accuracy": figures.accuracy[index].item(),
                "per_class_accuracy": [row[actual] / max(sum(row), 1) for actual, row in enumerate(rows)],
                "confusion": rows,
                "correct": predicted == labels,
            }
        )
    return reports


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


def seed_report(train_figures: dict, result: dict | None, thresholds: config.EvaluateParams) -> dict:
    """One seed's test figures and its gates; a diverged seed fails every gate."""
    seed_gates = gates(train_figures, result and result["test_accuracy"], thresholds)
    return {
        "test_loss": result and result["test_loss"],
        "test_accuracy": result and result["test_accuracy"],
        "per_class_accuracy": result["per_class_accuracy"] if result else None,
        "gates": seed_gates,
        "train_gates_passed": all(seed_gates[name]["passed"] for name in TRAIN_GATES),
        "passed": all(gate["passed"] for gate in seed_gates.values()),
    }


Split = tuple[torch.Tensor, torch.Tensor]


def evaluate_variant(variant: str, trained: dict, models: Path, test: Split, validation: Split, settings: dict) -> dict:
    """Every finite seed's model on the test and validation splits (all as one stack), then the variant's summary."""
    images, labels = test
    finite = [seed for seed, figures in trained["per_seed"].items() if not figures["diverged"]]
    results: dict[str, dict | None] = dict.fromkeys(trained["per_seed"])
    validation_correct: dict[str, str] = {}
    if finite:
        stacked = batched.stack([mlp.load(models / f"seed-{seed}.pt") for seed in finite], torch.device("cpu"))
        results.update(zip(finite, run(stacked, images, labels, mlp.OUTPUTS, settings["loss"])))
        validation_correct = dict(zip(finite, packed_correct(stacked, *validation, settings["loss"])))
    thresholds = settings["thresholds"]
    per_seed = {seed: seed_report(trained["per_seed"][seed], result, thresholds) for seed, result in results.items()}
    correct = [result["correct"].tolist() for result in results.values() if result is not None]
    report = summarize(variant, trained, per_seed, stats.bootstrap_accuracy_interval(correct, settings["bootstrap"]))
    model_seed = trained.get("model_seed")
    report["confusion"] = results[str(model_seed)]["confusion"] if model_seed is not None else None
    report["validation_images"] = len(validation[1])
    report["validation_correct"] = validation_correct
    return report


def packed_correct(models: batched.Stack, images: torch.Tensor, labels: torch.Tensor, loss: str) -> list[str]:
    """Per model, which images of the split it got right, as `stats.pack_bits` hex (an empty split: "")."""
    if len(labels) == 0:
        return [""] * models.models
    predictions = batched.evaluate(models, images, labels, loss).predictions
    return [stats.pack_bits(row == labels) for row in predictions]


def summarize(variant: str, trained: dict, per_seed: dict[str, dict], interval: list[float] | None) -> dict:
    """A variant's test figures over its finite seeds (n says how many), the gates' pass fractions, per seed."""
    accuracies = [seed["test_accuracy"] for seed in per_seed.values() if seed["test_accuracy"] is not None]
    accuracy_mean, accuracy_std = stats.mean_and_std(accuracies)
    loss_mean, loss_std = stats.mean_and_std([seed["test_loss"] for seed in per_seed.values()])
    model_seed = trained.get("model_seed")
    return {
        "variant": variant,
        "seeds": trained["seeds"],
        "finite_seeds": len(accuracies),
        "test_accuracy_mean": accuracy_mean,
        "test_accuracy_std": accuracy_std,
        "test_accuracy_ci95": interval,
        "test_accuracy_ci95_method": "bootstrap over seeds and test images",
        "test_loss_mean": loss_mean,
        "test_loss_std": loss_std,
        "gate_pass_fraction": {
            name: sum(seed["gates"][name]["passed"] for seed in per_seed.values()) / len(per_seed)
            for name in next(iter(per_seed.values()))["gates"]
        },
        "passed_fraction": sum(seed["passed"] for seed in per_seed.values()) / len(per_seed),
        "passed": all(seed["passed"] for seed in per_seed.values()),
        "train_gates_passed": all(seed["train_gates_passed"] for seed in per_seed.values()),
        "model_seed": model_seed,
        "model_seed_test_accuracy": per_seed[str(model_seed)]["test_accuracy"] if model_seed is not None else None,
        "per_seed": per_seed,
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
        peak = max(map(max, confusion))
        for actual, row in enumerate(confusion):
            for predicted, count in enumerate(row):
                color = "white" if count > peak / 2 else "black"
                axes.text(predicted, actual, count, ha="center", va="center", fontsize=7, color=color)
    axes.set_title(title)
    figure.tight_layout()
    write_png(path, figure)
