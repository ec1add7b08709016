"""Stage `compare`: the variants side by side (mean ± std over seeds), their curves, and the model to promote.

Built only from the JSON and CSV files that train and evaluate wrote (one record per fact). The choice uses
validation figures only: the champion is the variant with the best mean validation accuracy among those
whose every seed passes its gates, and its model is that variant's best-validation seed. The report says
whether its lead over the runner-up exceeds the seed noise (a 95% interval on the paired per-seed
difference). Only a run of committed code outside DVC experiments moves the alias `champion`; any other
registers its pick under `challenger`.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from pipeline import cli, config, stats
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import pyplot, read_json, write_json, write_png, write_text


def collect(params: config.Params, results: Path) -> dict[str, dict]:
    """variant -> its train and eval figures, mean history, and the params it changes from the defaults."""
    defaults = dataclasses.asdict(params.train)
    rows = {}
    for name, variant in params.variants.items():
        changed = {key: value for key, value in dataclasses.asdict(variant).items() if defaults[key] != value}
        rows[name] = {
            "train": read_json(results / name / "train.json"),
            "eval": read_json(results / name / "eval.json"),
            "history": read_history(results / name / "history.csv"),
            "changed": changed,
        }
    return rows


def read_history(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as file:
            return [
                {key: float(value) if value else None for key, value in row.items()} for row in csv.DictReader(file)
            ]
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def validation_accuracies(row: dict) -> dict[str, float]:
    """seed -> final validation accuracy, for the seeds that have one."""
    return {
        seed: figures["validation_accuracy"]
        for seed, figures in row["train"]["per_seed"].items()
        if figures["validation_accuracy"] is not None
    }


def select(rows: dict[str, dict]) -> dict:
    """The champion by mean validation accuracy among variants whose every seed passes, and how sure that is."""
    eligible = [name for name, row in rows.items() if row["eval"]["passed"] and validation_accuracies(row)]
    ranked = sorted(eligible, key=lambda name: -rows[name]["train"]["aggregate"]["validation_accuracy_mean"])
    if not ranked:
        no_validation = not any(validation_accuracies(row) for row in rows.values())
        reason = (
            "prepare.validation is 0: there is no validation data to choose on"
            if no_validation
            else "no variant passes its gates on every seed"
        )
        return {"champion": None, "runner_up": None, "reason": reason, "lead": None, "verdict": None}
    champion, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else None
    lead = (
        stats.paired_difference(validation_accuracies(rows[champion]), validation_accuracies(rows[runner_up]))
        if runner_up
        else None
    )
    verdict = ("beyond seed noise" if lead["beyond_noise"] else "indistinguishable") if lead else "no runner-up"
    return {
        "champion": champion,
        "runner_up": runner_up,
        "lead": lead,
        "verdict": verdict,
        "reason": "best mean validation accuracy among variants whose every seed passes its gates",
    }


def summary(rows: dict[str, dict], selection: dict) -> dict:
    """compare.json: per variant the means, spreads and interval; then the selection."""
    variants = {}
    for name, row in rows.items():
        trained, evaluated = row["train"]["aggregate"], row["eval"]
        variants[name] = {
            "seeds": row["train"]["seeds"],
            "validation_accuracy_mean": trained["validation_accuracy_mean"],
            "validation_accuracy_std": trained["validation_accuracy_std"],
            "test_accuracy_mean": evaluated["test_accuracy_mean"],
            "test_accuracy_std": evaluated["test_accuracy_std"],
            "test_accuracy_ci95": evaluated["test_accuracy_ci95"],
            "train_loss_mean": trained["train_loss_mean"],
            "train_loss_std": trained["train_loss_std"],
            "gates_passed": evaluated["passed"],
            "gate_pass_fraction": evaluated["gate_pass_fraction"],
            "diverged_seeds": trained["diverged_seeds"],
            "epochs": max((seed["epochs_completed"] for seed in row["train"]["per_seed"].values()), default=0),
        }
    return {"champion": selection["champion"], "selection": selection, "variants": variants}


def markdown(rows: dict[str, dict], selection: dict, registered: dict | None, curves: str) -> str:
    lines = [
        "# Variant comparison",
        "",
        "Mean ± std over the seeds; the choice uses validation accuracy only, the test split is reported.",
        "",
        "| variant | differs from `train` | seeds | val acc | test acc (95% CI) | train loss | gates pass | epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        trained, evaluated = row["train"]["aggregate"], row["eval"]
        changed = ", ".join(f"{key}={value}" for key, value in row["changed"].items()) or "(defaults)"
        interval = evaluated["test_accuracy_ci95"]
        test = _pm(evaluated["test_accuracy_mean"], evaluated["test_accuracy_std"]) + (
            f" ({interval[0]:.4f}-{interval[1]:.4f})" if interval else ""
        )
        label = f"**{name}** (champion)" if name == selection["champion"] else name
        lines.append(
            f"| {label} | {changed} | {len(row['train']['seeds'])} "
            f"| {_pm(trained['validation_accuracy_mean'], trained['validation_accuracy_std'])} | {test} "
            f"| {_pm(trained['train_loss_mean'], trained['train_loss_std'])} | {_gates(row)} "
            f"| {_epochs(row)} |"
        )
    lines += [
        "",
        *selection_lines(selection, registered),
        "",
        "Gates are d2l's `train_ch3` assertions (train loss < threshold, train and test accuracy > threshold), "
        "judged per seed.",
        "",
        f"![curves]({curves})",
        "",
    ]
    return "\n".join(lines)


def selection_lines(selection: dict, registered: dict | None) -> list[str]:
    if selection["champion"] is None:
        return [f"Champion: none ({selection['reason']})."]
    lines = [f"Champion: **{selection['champion']}** ({selection['reason']})."]
    lead = selection["lead"]
    if lead and lead["interval"]:
        lines.append(
            f"Lead over {selection['runner_up']} in validation accuracy: {lead['mean']:+.4f}, 95% interval "
            f"{lead['interval'][0]:+.4f} to {lead['interval'][1]:+.4f} over seeds {lead['seeds']}: "
            f"**{selection['verdict']}**."
        )
    elif selection["runner_up"]:
        lines.append(f"Lead over {selection['runner_up']}: **{selection['verdict']}** (fewer than two shared seeds).")
    if registered:
        lines.append(
            f"Registered `{registered['name']}` version {registered['version']} (seed {registered['seed']}, "
            f"test accuracy {registered['champion_test_accuracy']:.4f}) under alias "
            f"`{registered['alias']}`: {registered['why']}."
        )
    return lines


def _pm(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


def _gates(row: dict) -> str:
    evaluated, diverged = row["eval"], row["train"]["aggregate"]["diverged_seeds"]
    failing = [f"{name} {fraction:.0%}" for name, fraction in evaluated["gate_pass_fraction"].items() if fraction < 1]
    text = f"{evaluated['passed_fraction']:.0%}" + (f" ({', '.join(failing)})" if failing else "")
    return text + (f"; {diverged} diverged" if diverged else "")


def _epochs(row: dict) -> int:
    return max((seed["epochs_completed"] for seed in row["train"]["per_seed"].values()), default=0)


def draw_curves(path: Path, rows: dict[str, dict]) -> None:
    """Train loss and validation accuracy per epoch: each variant's mean over seeds, with a ±1 std band."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in rows.items():
        epochs = [record["epoch"] for record in row["history"]]
        for panel, column in zip(axes, ("train_loss", "validation_accuracy")):
            means = [record[column] for record in row["history"]]
            if None in means:
                continue
            spreads = [record[f"{column}_std"] for record in row["history"]]
            (line,) = panel.plot(epochs, means, marker=".", label=name)
            panel.fill_between(
                epochs,
                [m - s for m, s in zip(means, spreads)],
                [m + s for m, s in zip(means, spreads)],
                color=line.get_color(),
                alpha=0.2,
            )
    axes[0].set(xlabel="epoch", ylabel="train loss (log scale)", yscale="log", title="train loss (mean ± std)")
    axes[1].set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy (mean ± std)")
    for panel in axes:
        panel.grid(alpha=0.3)
        panel.legend()
    figure.tight_layout()
    write_png(path, figure)


def register(name: str, row: dict, registered_model: str, chosen_because: str | None = None) -> dict:
    """Register the chosen seed's model; move @champion only from a promotable run, else @challenger.
    The version's description is its model card (the registry page shows it)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline import model_card, tracking

    trained = row["train"]
    model_uri = trained["mlflow_model_uri"]
    _check_artifacts(model_uri)
    allowed, why = tracking.promotable()
    alias = tracking.CHAMPION_ALIAS if allowed else tracking.CHALLENGER_ALIAS
    client = MlflowClient()
    version = _existing_version(client, registered_model, alias, trained["mlflow_run_id"])
    if version is None:
        version = mlflow.register_model(model_uri, registered_model, tags={"variant": name}).version
        client.set_registered_model_alias(registered_model, alias, version)
    reasons = (chosen_because, f"alias `{alias}`: {why}")
    card = model_card.from_compare_row(name, row, tracking.git_commit(), model_uri, reasons)
    client.update_model_version(registered_model, str(version), description=card)
    return {
        "name": registered_model,
        "alias": alias,
        "version": int(version),
        "model_uri": model_uri,
        "seed": trained["mlflow_model_seed"],
        "variant": name,
        "why": why,
        "champion_test_accuracy": row["eval"]["model_seed_test_accuracy"],
    }


def _existing_version(client, registered_model: str, alias: str, run_id: str) -> str | None:
    import mlflow

    try:
        current = client.get_model_version_by_alias(registered_model, alias)
    except mlflow.exceptions.MlflowException:
        return None  # no such model or alias yet
    return current.version if current.run_id == run_id else None


def _check_artifacts(model_uri: str | None) -> None:
    """Refuse to register a model whose files are gone (say, a deleted mlartifacts/)."""
    import mlflow

    if not model_uri:
        raise PipelineError("compare: the champion has no logged model (train.json has no mlflow_model_uri)")
    try:
        files = [artifact.path for artifact in mlflow.artifacts.list_artifacts(artifact_uri=model_uri)]
    except Exception as error:  # noqa: BLE001 - any failure means there is nothing to serve
        files, reason = [], str(error).splitlines()[0][:200]
    else:
        reason = f"found {files or 'no files'}"
    if "MLmodel" not in files:
        raise PipelineError(f"compare: refusing to register {model_uri}: its artifacts are missing ({reason})")


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--results", type=Path, required=True, help="directory of <variant>/{train,eval}.json")
    parser.add_argument("--report", type=Path, required=True, help="Markdown table")
    parser.add_argument("--summary", type=Path, required=True, help="JSON: per-variant figures and the selection")
    parser.add_argument("--curves", type=Path, required=True, help="PNG of all variants' curves")
    args = parser.parse_args()
    params = config.load(args.params)
    rows = collect(params, args.results)
    selection = select(rows)

    from pipeline import tracking

    with tracking.stage_run("compare", params.mlflow.experiment) as mlflow_run:
        import mlflow

        draw_curves(args.curves, rows)
        result = summary(rows, selection)
        registered = None
        if selection["champion"] is not None:
            registered = register(selection["champion"], rows[selection["champion"]], params.mlflow.registered_model)
            mlflow.set_tags(
                {"champion": selection["champion"], f"{registered['alias']}_version": registered["version"]}
            )
        report = markdown(rows, selection, registered, args.curves.name)
        result.update(
            registered=registered,
            mlflow_run_id=mlflow_run.info.run_id,
            champion_test_accuracy=registered and registered["champion_test_accuracy"],
            champion_model_uri=registered and registered["model_uri"],
            champion_version=registered and registered["version"],
        )
        mlflow.log_text(report, "compare.md")
        mlflow.log_artifact(str(args.curves))
        mlflow.log_dict(result, "compare.json")
        write_text(args.report, report)
        write_json(args.summary, result)
    print(report)


if __name__ == "__main__":
    main()
