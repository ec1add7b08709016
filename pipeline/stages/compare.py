"""Stage `compare`: one table row per variant, their curves overlaid, and the champion in the registry.

Built only from the JSON and CSV files that train and evaluate wrote (one record per fact). The best
variant that passes its gates is registered in MLflow's Model Registry under the alias `champion`.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from pipeline import cli, config
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import pyplot, read_json, write_json, write_png, write_text

CHAMPION_ALIAS = "champion"


def collect(params: config.Params, results: Path) -> dict[str, dict]:
    """variant -> its train and eval figures, history and the params it changes from the defaults."""
    defaults = dataclasses.asdict(params.train)
    rows = {}
    for name, variant in params.variants.items():
        changed = {key: value for key, value in dataclasses.asdict(variant).items() if defaults[key] != value}
        rows[name] = {"train": read_json(results / name / "train.json"), "eval": read_json(results / name / "eval.json"),
                      "history": read_history(results / name / "history.csv"), "changed": changed}
    return rows


def read_history(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as file:
            return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def champion(rows: dict[str, dict]) -> str | None:
    """The variant with the best test accuracy among those that passed every gate."""
    passing = [name for name, row in rows.items() if row["eval"]["passed"]]
    return max(passing, key=lambda name: rows[name]["eval"]["test_accuracy"], default=None)


def summary(rows: dict[str, dict], best: str | None) -> dict:
    """The figures `dvc metrics show` lists: one entry per variant, plus the champion."""
    variants = {}
    for name, row in rows.items():
        train, evaluation = row["train"], row["eval"]
        variants[name] = {"test_accuracy": evaluation["test_accuracy"], "test_loss": evaluation["test_loss"],
                          "train_loss": train["train_loss"], "train_accuracy": train["train_accuracy"],
                          "epochs_completed": train["epochs_completed"], "train_seconds": train["train_seconds"],
                          "diverged": train["diverged"], "gates_passed": evaluation["passed"],
                          "mlflow_run_id": train["mlflow_run_id"]}
    return {"champion": best, "variants": variants}


def markdown(rows: dict[str, dict], best: str | None, curves: str) -> str:
    lines = ["# Variant comparison", "",
             "| variant | differs from `train` | test acc | test loss | train loss | train acc | gates | epochs | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        train, evaluation = row["train"], row["eval"]
        changed = ", ".join(f"{key}={value}" for key, value in row["changed"].items()) or "(defaults)"
        if train["diverged"]:
            gates = f"FAIL: diverged at epoch {train['diverged_epoch']}, step {train['diverged_step']}"
        else:
            failed = [key for key, gate in evaluation["gates"].items() if not gate["passed"]]
            gates = "pass" if not failed else "FAIL: " + ", ".join(failed)
        label = f"**{name}** (champion)" if name == best else name
        lines.append(f"| {label} | {changed} | {_number(evaluation['test_accuracy'])} | {_number(evaluation['test_loss'])} "
                     f"| {_number(train['train_loss'])} | {_number(train['train_accuracy'])} | {gates} "
                     f"| {train['epochs_completed']} | {train['train_seconds']:.1f} |")
    lines += ["", f"Champion: {best or 'none (no variant passed its gates)'}.", "",
              "Gates are d2l's `train_ch3` assertions: train loss < threshold, train and test accuracy > threshold.",
              "", f"![curves]({curves})", ""]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def draw_curves(path: Path, rows: dict[str, dict]) -> None:
    """Train loss and test accuracy of every variant per epoch: what d2l's animator draws."""
    plt = pyplot()

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in rows.items():
        epochs = [record["epoch"] for record in row["history"]]
        loss_axes.plot(epochs, [record["train_loss"] for record in row["history"]], marker=".", label=name)
        accuracy_axes.plot(epochs, [record["test_accuracy"] for record in row["history"]], marker=".", label=name)
    loss_axes.set(xlabel="epoch", ylabel="train loss (log scale)", yscale="log", title="train loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    write_png(path, figure)


def register_champion(name: str, train_metrics: dict, registered_model: str) -> str:
    """Register the champion's model and point the alias at it; reuse the version if it is already there."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(registered_model, CHAMPION_ALIAS)
        if current.run_id == train_metrics["mlflow_run_id"]:
            return current.version
    except mlflow.exceptions.MlflowException:
        pass  # no such model or alias yet
    version = mlflow.register_model(train_metrics["mlflow_model_uri"], registered_model, tags={"variant": name}).version
    client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    return version


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--results", type=Path, required=True, help="directory of <variant>/{train,eval}.json")
    parser.add_argument("--report", type=Path, required=True, help="Markdown table")
    parser.add_argument("--summary", type=Path, required=True, help="JSON metrics for dvc metrics show")
    parser.add_argument("--curves", type=Path, required=True, help="PNG of all variants' curves")
    args = parser.parse_args()
    params = config.load(args.params)
    rows = collect(params, args.results)
    best = champion(rows)

    from pipeline import tracking

    with tracking.stage_run("compare", params.mlflow.experiment) as mlflow_run:
        import mlflow

        draw_curves(args.curves, rows)
        report = markdown(rows, best, args.curves.name)
        result = summary(rows, best)
        mlflow.log_text(report, "compare.md")
        mlflow.log_artifact(str(args.curves))
        mlflow.log_dict(result, "compare.json")
        if best is not None:
            version = register_champion(best, rows[best]["train"], params.mlflow.registered_model)
            mlflow.set_tags({"champion": best, "champion_version": version})
            result["champion_version"] = int(version)
        result["mlflow_run_id"] = mlflow_run.info.run_id
        write_text(args.report, report)
        write_json(args.summary, result)
    print(report)


if __name__ == "__main__":
    main()
