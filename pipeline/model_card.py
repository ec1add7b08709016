"""The model card: what a registered version is, as Markdown for its description on the registry page.

`markdown()` takes plain values and writes "-" for any that is missing, so a card can always be written.
`from_compare_row()` is the one place that knows compare's per-variant row; the rest comes from MLflow: the
logged model's params and signature, and the digest of its training run's dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Interval = Sequence[float] | None


def markdown(
    variant: str,
    params: Mapping[str, Any],
    seeds: Sequence[int],
    validation_accuracy: tuple[float | None, Interval],
    test_accuracy: tuple[float | None, Interval],
    data_digest: str | None,
    git_commit: str | None,
    chosen_because: str | None,
    model_input: str | None,
    changed: Mapping[str, Any] | None = None,
) -> str:
    """The card: variant and params, seeds and accuracies (mean and 95% interval), data, code, why, input."""
    lines = [
        f"Model card: variant {variant}",  # plain: the registry's versions table shows this line as it is
        "",
        f"**Why this model:** {chosen_because or '-'}",
        "",
        "| accuracy | mean over seeds | 95% interval |",
        "|---|---|---|",
        f"| validation | {_figure(validation_accuracy[0])} | {_interval(validation_accuracy[1])} |",
        f"| test | {_figure(test_accuracy[0])} | {_interval(test_accuracy[1])} |",
        "",
        f"**Seeds:** {', '.join(str(seed) for seed in seeds) or '-'}",
        "",
        f"**Differs from the train defaults:** {_params(changed) if changed else '(nothing)'}",
        "",
        f"**Params:** {_params(params)}",
        "",
        f"**Data digest:** `{data_digest or '-'}`",
        "",
        f"**Git commit:** `{git_commit or '-'}`",
        "",
        f"**Input:** {model_input or '-'}",
        "",
    ]
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _interval(interval: Interval) -> str:
    return "-" if not interval else f"{interval[0]:.4f} to {interval[1]:.4f}"


def _params(params: Mapping[str, Any] | None) -> str:
    return ", ".join(f"`{key}={value}`" for key, value in sorted((params or {}).items())) or "-"


def from_compare_row(
    variant: str,
    row: Mapping[str, Any],
    git_commit: str | None,
    model_uri: str | None,
    reasons: Sequence[str | None] = (),
) -> str:
    """The card of compare's pick. Reads row["changed"], row["run_id"] (the variant's training run); row["train"]:
    "seeds", "model_seed", "aggregate"["validation_accuracy_mean"], "per_seed"[seed]["validation_accuracy"];
    row["eval"]: "test_accuracy_mean", "test_accuracy_ci95". Any of them may be missing."""
    from pipeline import stats

    trained, evaluated = row.get("train") or {}, row.get("eval") or {}
    validation = [figures.get("validation_accuracy") for figures in (trained.get("per_seed") or {}).values()]
    params, model_input = model_facts(model_uri)
    seed = trained.get("model_seed")
    picked = f"the model is seed {seed}, the variant's best in validation" if seed is not None else None
    return markdown(
        variant,
        params,
        trained.get("seeds") or [],
        (
            (trained.get("aggregate") or {}).get("validation_accuracy_mean"),
            stats.t_interval([value for value in validation if value is not None]),
        ),
        (evaluated.get("test_accuracy_mean"), evaluated.get("test_accuracy_ci95")),
        run_digest(row.get("run_id")),
        git_commit,
        "; ".join(reason for reason in (*reasons[:1], picked, *reasons[1:]) if reason) or None,
        model_input,
        changed=row.get("changed"),
    )


def run_digest(run_id: str | None) -> str | None:
    """The digest of a run's first dataset input (DVC's hash of the prepared data); None where unreadable."""
    import mlflow

    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    datasets = run.inputs.dataset_inputs if run.inputs else []
    return datasets[0].dataset.digest if datasets else None


def model_facts(model_uri: str | None) -> tuple[dict[str, str], str | None]:
    """A logged model's params (those of its training run) and what it takes, from its signature."""
    import mlflow

    if not model_uri:
        return {}, None
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (mlflow.exceptions.MlflowException, OSError):
        return {}, None
    inputs = info.signature.inputs.inputs if info.signature and info.signature.inputs else []
    return dict(info.params or {}), "; ".join(_describe(spec) for spec in inputs) or None


def _describe(spec: Any) -> str:
    """One input of a signature in words: a tensor's dtype and shape (-1: any size), or a column's type."""
    if hasattr(spec, "shape"):
        return f"`{spec.type}` tensor of shape `{tuple(spec.shape)}` (-1: any number)"
    return f"column `{spec.name}` of type `{spec.type}`"
