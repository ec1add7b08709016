"""What the train and evaluate stages log to MLflow, once their figures exist, and how an output finds its runs.

A training's runs are opened, logged and ended in one short step after its models and figures are written:
killing the stage while it trains leaves no run behind. The runs carry the MD5 of the train.json they made
(tag `results_md5`, the hash `dvc.lock` records for that file), so evaluate and compare find them from the
output alone; the outputs themselves hold no run ids, seconds or timestamps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pipeline import config

RESULTS_TAG = "results_md5"


def json_text(value: Any) -> str:
    """The exact text files.write_json writes, so its digest can be tagged before the file exists."""
    return json.dumps(value, indent=2, allow_nan=False) + "\n"


def md5(text: str | bytes) -> str:
    return hashlib.md5(text.encode() if isinstance(text, str) else text).hexdigest()


def log_training(args, params: config.Params, train_params: config.TrainParams, results: list, summary: dict) -> None:
    """The variant's run (params, datasets, means, the served seed's model) and one nested run per seed."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from pipeline import tracking

    digest = md5(json_text(summary))
    with tracking.logged_run("train", params.mlflow.experiment, variant=args.variant) as parent:
        mlflow.set_tag(RESULTS_TAG, digest)
        mlflow.log_params(
            {
                **dataclasses.asdict(train_params),
                "variant": args.variant,
                "dataset": params.data.dataset,
                "normalize": params.prepare.normalize,
                "validation": params.prepare.validation,
            }
        )
        data_digest = tracking.dvc_hash(args.data) or "unknown"
        for context in ("train", "validation"):
            tracking.log_dataset(args.data / f"{context}.pt", f"{params.data.dataset}-{context}", data_digest, context)
        aggregate = {key: value for key, value in summary["aggregate"].items() if value is not None}
        aggregate["train_seconds"] = sum(result.seconds for result in results)
        mlflow.log_metrics(aggregate)
        mlflow.log_artifact(str(args.history))
        client, now = mlflow.MlflowClient(), int(time.time() * 1000)
        tags = {**tracking.lineage_tags("train", args.variant), RESULTS_TAG: digest}
        for result in results:
            run = client.create_run(
                parent.info.experiment_id,
                run_name=f"train@{args.variant} seed {result.seed}",
                tags={**tags, "seed": str(result.seed), "mlflow.parentRunId": parent.info.run_id},
            )
            metrics = [
                Metric(key, value, now, record["epoch"])
                for record in result.history
                for key, value in record.items()
                if key != "epoch" and value is not None
            ]
            metrics += [Metric("diverged", float(result.diverged is not None), now, 0)]
            metrics += [Metric("train_seconds", result.seconds, now, 0)]
            if result.initial_loss is not None and result.initial_loss == result.initial_loss:
                metrics.append(Metric("initial_loss", result.initial_loss, now, 0))
            outcome = {"precision": train_params.precision, "diverged": str(result.diverged is not None).lower()}
            client.log_batch(
                run.info.run_id,
                metrics=metrics,
                params=[Param("seed", str(result.seed)), Param("variant", args.variant)],
                tags=[RunTag(key, value) for key, value in outcome.items()],
            )
            client.set_terminated(run.info.run_id, "FINISHED")
        best = next((result for result in results if result.seed == summary["model_seed"]), None)
        if best is not None:
            from pipeline.files import read_json

            uri = log_model(best.model, train_params, read_json(args.stats), params.data.dataset)
            mlflow.set_tags({"model_uri": uri, "model_seed": str(best.seed)})


def log_model(net, params: config.TrainParams, stats: dict, dataset: str) -> str:
    """The model for serving: raw uint8 images in, the train split's normalization inside (pipeline/serving.py)."""
    from pipeline import model as mlp
    from pipeline import serving
    from pipeline.datasets import class_names
    from pipeline.stages.train import architecture

    info = serving.log_model(
        net.cpu().eval(),
        architecture(params),
        mean=stats["mean"],
        std=stats["std"],
        class_names=class_names(dataset, mlp.OUTPUTS),
    )
    return info.model_uri


def training_runs(variant: str, train_json: Path) -> tuple[Any | None, dict[str, Any]]:
    """The newest variant run that made this train.json (by its MD5), and its seed runs by seed; (None, {})
    when the store has none (a store that was reset, or results made elsewhere)."""
    import mlflow

    digest = md5(Path(train_json).read_bytes())
    found = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.{RESULTS_TAG} = '{digest}' and tags.variant = '{variant}' and tags.stage = 'train'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    parents = [run for run in found if "mlflow.parentRunId" not in run.data.tags]
    if not parents:
        return None, {}
    parent = parents[0]
    seeds = {
        run.data.tags["seed"]: run
        for run in reversed(found)
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "seed" in run.data.tags
    }
    return parent, seeds


def log_evaluation(variant: str, train_json: Path, report: dict, names: tuple[str, ...]) -> str | None:
    """Test figures onto the training's seed runs and their means onto its variant run; the variant run's id,
    or None (with a notice) when no run made this train.json."""
    import mlflow
    from mlflow.entities import Metric

    parent, seeds = training_runs(variant, train_json)
    if parent is None:
        print(f"notice: no MLflow run made {train_json}; the test figures are in the report only")
        return None
    client, now = mlflow.MlflowClient(), int(time.time() * 1000)
    for seed, figures in report["per_seed"].items():
        if seed in seeds:
            run_id = seeds[seed].info.run_id
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in seed_metrics(figures, names).items()])
            client.set_tag(run_id, "gates", "pass" if figures["passed"] else "fail")
    means = {
        "test_accuracy_mean": report["test_accuracy_mean"],
        "test_accuracy_std": report["test_accuracy_std"],
        "test_loss_mean": report["test_loss_mean"],
        "gates_passed_fraction": report["passed_fraction"],
        **{f"gate_{name}_pass_fraction": value for name, value in report["gate_pass_fraction"].items()},
    }
    metrics = [Metric(key, value, now, 0) for key, value in means.items() if value is not None]
    client.log_batch(parent.info.run_id, metrics=metrics)
    client.set_tag(parent.info.run_id, "gates", "pass" if report["passed"] else "fail")
    return parent.info.run_id


def seed_metrics(figures: dict, names: tuple[str, ...]) -> dict[str, float]:
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
    return values
