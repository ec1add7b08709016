"""Stage `evaluate`: one variant's models on the test split, read once per model, to report and never to choose.

Per seed: test loss and accuracy, per-class accuracy, d2l's gates (pipeline/evaluation.py); for the variant:
the means over its finite seeds, the gates' pass fractions, and a 95% interval for the test accuracy that
resamples seeds and test images. The served seed's confusion matrix is drawn, and its rows go to `dvc plots`.
Which validation images each seed got right is stored as packed bits, for compare's paired bootstrap.
The figures are logged onto the training's MLflow runs, found by the MD5 of the train.json they made.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import cli, config, evaluation, tracking
from pipeline.cli import stage_entry
from pipeline.files import read_json, write_json
from pipeline.tensors import load_split


def run(params: config.Params, variant: str, summary: Path, models: Path, test: Path, validation: Path) -> dict:
    """The variant's evaluation report (see evaluation.evaluate_variant)."""
    settings = {
        "loss": params.variant(variant).loss,
        "thresholds": params.evaluate,
        "bootstrap": params.compare.bootstrap,
    }
    splits = load_split(test), load_split(validation)
    return evaluation.evaluate_variant(variant, read_json(summary), models, *splits, settings)


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--summary", type=Path, required=True, help="the variant's train.json")
    parser.add_argument("--models", type=Path, required=True, help="directory of seed-<s>.pt")
    parser.add_argument("--test", type=Path, required=True, help="the prepared test split (test.pt)")
    parser.add_argument("--validation", type=Path, required=True, help="the prepared validation split (validation.pt)")
    parser.add_argument("--report", type=Path, required=True, help="JSON: per seed and for the variant")
    parser.add_argument("--confusion", type=Path, required=True, help="JSON rows {actual, predicted} for dvc plots")
    parser.add_argument("--plot", type=Path, required=True, help="PNG: the served seed's confusion matrix")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    report = run(params, args.variant, args.summary, args.models, args.test, args.validation)
    from pipeline.datasets import class_names

    names = class_names(params.data.dataset)
    matrix = report["confusion"]
    title = f"{args.variant}: confusion matrix (test), seed {report['model_seed']}"
    evaluation.draw_confusion(args.plot, matrix, names, title)
    write_json(args.confusion, evaluation.confusion_records(matrix, names) if matrix else [])

    from pipeline import mlflow_runs

    with tracking.logged_run("evaluate", params.mlflow.experiment, variant=args.variant):
        import mlflow

        mlflow_runs.log_evaluation(args.variant, args.summary, report, names)
        mlflow.log_dict(report, f"evaluation-{args.variant}.json")
    write_json(args.report, report)
    print(
        f"{args.variant}: test accuracy {report['test_accuracy_mean']}, "
        f"gates passed by {report['passed_fraction']:.0%} of seeds"
    )


if __name__ == "__main__":
    main()
