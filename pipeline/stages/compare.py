"""Stage `compare`: every pairwise verdict between the variants, and the champion.

Built from the files train and evaluate wrote (one record per fact). Every pair of variants gets a verdict on
validation accuracy, paired by seed and by image: better or worse (the 1 - alpha/m interval excludes 0),
equivalent (two one-sided tests at alpha/m against compare.margin: the 1 - 2 alpha/m interval lies inside it) or
inconclusive, with m the number of pairs (Bonferroni), so the chance of any wrong verdict is at most
compare.alpha. The intervals' standard error comes from a paired bootstrap (compare.bootstrap resamples, a fixed
seed) over the seeds and the validation images that evaluate recorded (pipeline/stats.py).

The choice reads train and validation figures only: among the variants whose every seed passes the train gates,
the best mean validation accuracy wins, and where other variants are equivalent to it, compare.prefer picks
among them. The test gate and test accuracy are reported, never used to choose. Only a run of committed code
outside DVC experiments moves the alias `champion`; any other registers its pick under `challenger` (the registry
and the run say which).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import cli, config, stats, tracking
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import pyplot, read_json, write_json, write_png, write_text

if TYPE_CHECKING:
    import numpy as np


def collect(params: config.Params, results: Path, evaluations: Path) -> dict[str, dict]:
    """variant -> its train figures, mean history, test evaluation, and the params it changes from the defaults."""
    defaults = dataclasses.asdict(params.train)
    rows = {}
    for name, variant in params.variants.items():
        changed = {key: value for key, value in dataclasses.asdict(variant).items() if defaults[key] != value}
        evaluated = read_json(evaluations / f"{name}.json")
        rows[name] = {
            "train": read_json(results / name / "train.json"),
            "history": read_history(results / name / "history.csv"),
            "eval": evaluated,
            "validation_correct": validation_correctness(evaluated, evaluations / f"{name}.json", name),
            "changed": changed,
        }
    _same_validation_images(rows, evaluations)
    return rows


def validation_correctness(evaluated: dict, path: Path, variant: str) -> dict[str, np.ndarray]:
    """seed -> which validation images that seed's model got right, from the packed bits evaluate wrote."""
    rerun = f"rerun: dvc repro -f -s evaluate@{variant}"
    if not isinstance(evaluated.get("validation_correct"), dict) or not isinstance(
        evaluated.get("validation_images"), int
    ):
        raise PipelineError(
            f"{path}: no validation_correct and validation_images (an older evaluate wrote it); {rerun}"
        )
    try:
        return {
            seed: stats.unpack_bits(bits, evaluated["validation_images"])
            for seed, bits in evaluated["validation_correct"].items()
        }
    except (TypeError, ValueError) as error:
        raise PipelineError(
            f"{path}: validation_correct is not packed bits of its validation_images ({error}); {rerun}"
        ) from None


def _same_validation_images(rows: dict[str, dict], evaluations: Path) -> None:
    """Pairs are compared image by image, so every variant must have been evaluated on the same validation split."""
    counts = {name: row["eval"]["validation_images"] for name, row in rows.items()}
    if len(set(counts.values())) > 1:
        raise PipelineError(
            f"{evaluations}: validation_images differ between variants ({counts}); "
            "rerun every evaluate on the same prepared data: dvc repro -f evaluate"
        )


def read_history(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as file:
            return [
                {key: float(value) if value else None for key, value in row.items()} for row in csv.DictReader(file)
            ]
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def validation_accuracies(row: dict) -> dict[str, float]:
    """seed -> final validation accuracy, for the finite seeds that have one."""
    return {
        seed: figures["validation_accuracy"]
        for seed, figures in row["train"]["per_seed"].items()
        if figures["validation_accuracy"] is not None
    }


def compare_pairs(rows: dict[str, dict], settings: config.CompareParams) -> list[dict]:
    """Every pair (in params order), first minus second in validation accuracy, paired by seed and image, by
    stats.paired_bootstrap_comparisons with m = the number of pairs, so the family-wise error rate is alpha."""
    pairs = list(itertools.combinations(rows, 2))
    correct = {name: row["validation_correct"] for name, row in rows.items()}
    results = stats.paired_bootstrap_comparisons(correct, pairs, settings.margin, settings.alpha, settings.bootstrap)
    return [{"a": first, "b": second, **result} for (first, second), result in zip(pairs, results)]


def verdict_between(comparisons: list[dict], first: str, second: str) -> str:
    """The verdict for first against second, whichever order the pair was compared in."""
    flipped = {"better": "worse", "worse": "better"}
    for comparison in comparisons:
        if (comparison["a"], comparison["b"]) == (first, second):
            return comparison["verdict"]
        if (comparison["a"], comparison["b"]) == (second, first):
            return flipped.get(comparison["verdict"], comparison["verdict"])
    raise KeyError((first, second))


def select(rows: dict[str, dict], comparisons: list[dict], settings: config.CompareParams) -> dict:
    """The champion from train and validation figures only: best mean validation accuracy among variants whose
    every seed passes the train gates; among the variants equivalent to it, the one compare.prefer names."""
    eligible = [name for name, row in rows.items() if row["eval"]["train_gates_passed"] and validation_accuracies(row)]
    if not eligible:
        no_validation = not any(validation_accuracies(row) for row in rows.values())
        reason = (
            "prepare.validation is 0: there is no validation data to choose on"
            if no_validation
            else "no variant passes the train gates on every seed"
        )
        return {"champion": None, "best_by_mean": None, "equivalent": [], "reason": reason}
    best = max(eligible, key=lambda name: rows[name]["train"]["aggregate"]["validation_accuracy_mean"])
    tied = [name for name in eligible if name == best or verdict_between(comparisons, name, best) == "equivalent"]
    champion = min(tied, key=lambda name: preference(name, rows, settings.prefer))
    reason = "best mean validation accuracy among variants whose every seed passes the train gates"
    if champion != best:
        reason = f"equivalent to the best by mean, {best}, and preferred by compare.prefer={settings.prefer}"
    return {
        "champion": champion,
        "best_by_mean": best,
        "equivalent": [name for name in tied if name != best],
        "reason": reason,
    }


def preference(name: str, rows: dict[str, dict], rule: str) -> tuple:
    """fewest_changes: fewest train keys changed, then params order; first_listed: params order."""
    order = list(rows).index(name)
    return (len(rows[name]["changed"]), order) if rule == "fewest_changes" else (order,)


def summary(rows: dict[str, dict], selection: dict, comparisons: list[dict], settings: config.CompareParams) -> dict:
    """compare.json: per variant the means (n: finite seeds), spreads and intervals; the verdicts; the selection."""
    variants = {}
    for name, row in rows.items():
        trained, evaluated = row["train"]["aggregate"], row["eval"]
        variants[name] = {
            "seeds": row["train"]["seeds"],
            "finite_seeds": trained["finite_seeds"],
            "precision": row["train"].get("precision"),
            "validation_accuracy_mean": trained["validation_accuracy_mean"],
            "validation_accuracy_std": trained["validation_accuracy_std"],
            "test_accuracy_mean": evaluated["test_accuracy_mean"],
            "test_accuracy_std": evaluated["test_accuracy_std"],
            "test_accuracy_ci95": evaluated["test_accuracy_ci95"],
            "test_accuracy_ci95_method": evaluated["test_accuracy_ci95_method"],
            "train_loss_mean": trained["train_loss_mean"],
            "train_loss_std": trained["train_loss_std"],
            "train_gates_passed": evaluated["train_gates_passed"],
            "gates_passed": evaluated["passed"],
            "gate_pass_fraction": evaluated["gate_pass_fraction"],
            "diverged_seeds": trained["diverged_seeds"],
            "epochs": _epochs(row),
        }
    return {
        "champion": selection["champion"],
        "selection": selection,
        "margin": settings.margin,
        "alpha": settings.alpha,
        "correction": f"Bonferroni over {len(comparisons)} comparisons",
        "family_wise_error_rate": f"at most {settings.alpha}",
        "bootstrap": {
            "resamples": settings.bootstrap,
            "seed": stats.BOOTSTRAP_SEED,
            "resampled": "seeds and validation images, the same draws for both variants of a pair",
        },
        "comparisons": comparisons,
        "variants": variants,
    }


def dvc_metrics(rows: dict[str, dict]) -> dict:
    """The few numbers `dvc metrics diff` and `dvc exp show` list per variant (means over the finite seeds)."""
    return {
        name: {
            "val_acc": _round(row["train"]["aggregate"]["validation_accuracy_mean"]),
            "test_acc": _round(row["eval"]["test_accuracy_mean"]),
            "test_acc_std": _round(row["eval"]["test_accuracy_std"]),
            "train_loss": _round(row["train"]["aggregate"]["train_loss_mean"]),
            "gates": row["eval"]["passed_fraction"],
        }
        for name, row in rows.items()
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def markdown(rows: dict[str, dict], selection: dict, result: dict, curves: str) -> str:
    lines = [
        "# Variant comparison",
        "",
        "Mean ± std over the finite seeds (n of seeds); the choice uses train and validation figures only, the "
        "test split is reported, its 95% interval resampling seeds and test images.",
        "",
        "| variant | differs from `train` | n | val acc | test acc (95% CI) | train loss | gates pass | epochs "
        "| precision |",
        "|---|---|---|---|---|---|---|---|---|",
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
            f"| {label} | {changed} | {trained['finite_seeds']} of {len(row['train']['seeds'])} "
            f"| {_pm(trained['validation_accuracy_mean'], trained['validation_accuracy_std'])} | {test} "
            f"| {_pm(trained['train_loss_mean'], trained['train_loss_std'])} | {_gates(row)} | {_epochs(row)} "
            f"| {row['train'].get('precision', '-')} |"
        )
    lines += ["", *comparison_lines(result), "", *selection_lines(selection), ""]
    lines += [
        "Gates are d2l's `train_ch3` assertions (train loss < threshold, train and test accuracy > threshold), "
        "judged per seed; a diverged seed fails them all.",
        "",
        f"![curves]({curves})",
        "",
    ]
    return "\n".join(lines)


def comparison_lines(result: dict) -> list[str]:
    """The pairwise table, headed by what its two intervals are and the error rate they keep."""
    if not result["comparisons"]:
        return ["Pairwise: one variant, nothing to compare."]
    first = result["comparisons"][0]
    wide, narrow = f"{first['difference_confidence']:.2%}", f"{first['equivalence_confidence']:.2%}"
    lines = [
        f"Pairwise, validation accuracy (a - b), paired by seed and image; {result['correction']} at a family-wise "
        f"error rate of at most {result['alpha']}. better/worse: the {wide} interval excludes 0; equivalent: the "
        f"{narrow} interval lies within ±{result['margin']} (two one-sided tests). Student t on the seeds, with a "
        f"standard error from {result['bootstrap']['resamples']} bootstrap resamples of seeds and validation images.",
        "",
        f"| a | b | difference | {wide} interval | {narrow} interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for comparison in result["comparisons"]:
        difference = comparison["difference_mean"]
        lines.append(
            f"| {comparison['a']} | {comparison['b']} | {'-' if difference is None else f'{difference:+.4f}'} "
            f"| {_span(comparison['difference_interval'])} | {_span(comparison['equivalence_interval'])} "
            f"| {comparison['verdict']} |"
        )
    return lines


def _span(interval: list[float] | None) -> str:
    return f"{interval[0]:+.4f} to {interval[1]:+.4f}" if interval else "-"


def selection_lines(selection: dict) -> list[str]:
    if selection["champion"] is None:
        return [f"Champion: none ({selection['reason']})."]
    lines = [f"Champion: **{selection['champion']}** ({selection['reason']})."]
    if selection["equivalent"]:
        lines.append(f"Equivalent to {selection['best_by_mean']}: {', '.join(selection['equivalent'])}.")
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

    from pipeline import model_card, promotion, tracking

    trained = row["train"]
    model_uri, run_id = row["model_uri"], row["run_id"]
    _check_artifacts(model_uri)
    allowed, why = promotion.promotable()
    alias = tracking.CHAMPION_ALIAS if allowed else tracking.CHALLENGER_ALIAS
    client = MlflowClient()
    version = _existing_version(client, registered_model, alias, run_id)
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
        "seed": trained["model_seed"],
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
        raise PipelineError(
            "compare: the champion has no logged model in this MLflow store (no train run made its train.json); "
            "expected the store the training logged to (MLFLOW_TRACKING_URI), or rerun: dvc repro -f -s train@<variant>"
        )
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
    parser.add_argument("--results", type=Path, required=True, help="directory of <variant>/{train.json,history.csv}")
    parser.add_argument("--evaluations", type=Path, required=True, help="directory of <variant>.json (evaluate)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON: the few numbers DVC compares")
    parser.add_argument("--report", type=Path, required=True, help="Markdown table")
    parser.add_argument("--summary", type=Path, required=True, help="JSON: figures, verdicts and the selection")
    parser.add_argument("--curves", type=Path, required=True, help="PNG of all variants' curves")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    rows = collect(params, args.results, args.evaluations)
    comparisons = compare_pairs(rows, params.compare)
    selection = select(rows, comparisons, params.compare)
    result = summary(rows, selection, comparisons, params.compare)
    report = markdown(rows, selection, result, args.curves.name)
    draw_curves(args.curves, rows)

    from pipeline import mlflow_runs

    with tracking.logged_run("compare", params.mlflow.experiment):
        import mlflow

        if selection["champion"] is not None:
            champion = selection["champion"]
            run, _ = mlflow_runs.training_runs(champion, args.results / champion / "train.json")
            rows[champion]["run_id"] = run and run.info.run_id
            rows[champion]["model_uri"] = run and run.data.tags.get("model_uri")
            registered = register(champion, rows[champion], params.mlflow.registered_model, selection["reason"])
            mlflow.set_tags({"champion": champion, f"{registered['alias']}_version": registered["version"]})
            print(
                f"registered {registered['name']} version {registered['version']} (seed {registered['seed']}) "
                f"under alias {registered['alias']}: {registered['why']}"
            )
        mlflow.log_text(report, "compare.md")
        mlflow.log_artifact(str(args.curves))
        mlflow.log_dict(result, "compare.json")
    write_json(args.metrics, dvc_metrics(rows))
    write_text(args.report, report)
    write_json(args.summary, result)
    print(report)


if __name__ == "__main__":
    main()
