"""Stage `train`: one variant of the MLP, for each of its seeds; data moved to the device once, batched by index.

Where the step is d2l's (nn.Sequential ReLU MLP, plain SGD, cross-entropy) the seeds train together as one
batched computation (pipeline/batched.py), in bf16 or fp32 (train.precision); any other form, the scratch one
included, trains seed after seed through autograd. Each seed keeps its own init, its own shuffling and its own
MLflow run (nested under the variant's run): one line per epoch, the same numbers logged with step=epoch (train
loss and accuracy, validation loss and accuracy; the test split is not read here), and its loss on the train
split before any step. A non-finite loss stops that seed: it is recorded as diverged, with null figures and no
model, and the pipeline goes on. With d2l's settings (10 epochs, lr 0.1, batch 256, N(0, 0.01) init)
accuracy reaches about 0.87.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import batched, cli, config, cpu, fused
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.devices import resolve_device
from pipeline.files import atomic_dir, read_json, write_json, write_text
from pipeline.losses import LOSSES, LossFunction
from pipeline.stats import mean_and_std
from pipeline.tensors import load_split

BATCHED_CHECKPOINT = "batched.pt"  # one checkpoint for all the seeds of a batched run
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy", "seconds")
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    seed: int
    model: nn.Module
    device: str
    history: list[dict] = field(default_factory=list)
    diverged: dict | None = None  # {"epoch": e, "step": s, "loss": value} when the loss went non-finite
    run_id: str | None = None  # the seed's MLflow run
    initial_loss: float | None = None  # on the train split, before any step
    precision: str = "fp32"  # of the matrix multiplies


def make_optimizer(params: config.TrainParams, net: nn.Module) -> torch.optim.Optimizer | None:
    """None where the written-out SGD step runs (fused.py); torch.optim otherwise, as d2l writes it."""
    if fused.applies(params.impl, params.activation, params.optimizer, params.loss):
        return None
    optimizers = {
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
    }
    return optimizers[params.optimizer](net.parameters(), lr=params.lr)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    loss_function: LossFunction = F.cross_entropy,
    lr: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass in random order; returns per-step summed losses and the correct count, both on the device."""
    if optimizer is None:  # d2l's case, without autograd: same maths, fewer calls
        return fused.sgd_epoch(model, lr, images, labels, batch_size, generator)
    order = torch.randperm(len(labels), device=images.device, generator=generator)
    batches = order.split(batch_size)
    # Labels are gathered, and predictions compared, once per epoch: against ~1.5 ms of GEMMs per step,
    # every small op in the step costs 10-30 us of dispatch on a CPU.
    shuffled_labels = labels.index_select(0, order)
    predictions = torch.empty_like(shuffled_labels)
    losses = []  # kept on the device: reading them here would sync every step
    for batch, y, predicted in zip(batches, shuffled_labels.split(batch_size), predictions.split(batch_size)):
        logits = model(images.index_select(0, batch))
        loss = loss_function(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        torch.argmax(logits.detach(), 1, out=predicted)
    sizes = torch.tensor([len(batch) for batch in batches], device=images.device)
    return torch.stack(losses) * sizes, (predictions == shuffled_labels).sum()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 10000,
    loss_function: LossFunction = F.cross_entropy,
) -> tuple[float | None, float | None]:
    """Mean loss and accuracy, without autograd; None for an empty split (validation: 0)."""
    if len(labels) == 0:
        return None, None
    model.eval()
    loss, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(x)
        loss += loss_function(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train()
    return loss.item() / len(labels), correct.item() / len(labels)


def run(
    params: config.TrainParams,
    seed: int,
    train_data: Split,
    validation_data: Split,
    checkpoint: Path | None = None,
    report: Callable[[dict], None] = lambda record: None,
) -> TrainResult:
    """Train one seed for params.epochs (resuming from `checkpoint` when it matches); stop early on divergence."""
    device = resolve_device(params.device)
    net = initial_model(params, seed, device)
    optimizer = make_optimizer(params, net)
    shuffle = torch.Generator(device=device).manual_seed(seed)
    train_images, train_labels = (tensor.to(device) for tensor in train_data)
    validation_images, validation_labels = (tensor.to(device) for tensor in validation_data)
    result = TrainResult(seed, net, str(device))
    result.initial_loss = evaluate(net, train_images, train_labels, loss_function=LOSSES[params.loss])[0]
    fingerprint = _fingerprint(params, seed, train_data, validation_data)
    start = resume(checkpoint, fingerprint, net, optimizer, shuffle, result.history)
    loss_function = LOSSES[params.loss]
    for epoch in range(start + 1, params.epochs + 1):
        started = time.perf_counter()
        step_losses, correct = train_epoch(
            net, optimizer, train_images, train_labels, params.batch_size, shuffle, loss_function, params.lr
        )
        losses = step_losses.tolist()  # the one sync of the epoch
        bad_step = next((step for step, value in enumerate(losses) if not math.isfinite(value)), None)
        if bad_step is not None:
            result.diverged = {"epoch": epoch, "step": bad_step + 1, "loss": str(losses[bad_step])}
            break
        validation_loss, validation_accuracy = evaluate(
            net, validation_images, validation_labels, loss_function=loss_function
        )
        record = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(train_labels),
            "train_accuracy": correct.item() / len(train_labels),
            "validation_loss": validation_loss,
            "validation_accuracy": validation_accuracy,
            "seconds": time.perf_counter() - started,
        }
        result.history.append(record)
        report(record)
        if checkpoint is not None:
            save_checkpoint(checkpoint, fingerprint, epoch, net, optimizer, shuffle, result.history)
    return result


def initial_model(params: config.TrainParams, seed: int, device: torch.device) -> nn.Module:
    """The seed's model before any step. Its weights come from a CPU generator in d2l's layout: the same seed
    gives the same start on any device and in either form (model.build)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    return mlp.build(params.impl, params.hidden, params.activation, params.init_std, generator).to(device)


def run_batched(
    params: config.TrainParams,
    train_data: Split,
    validation_data: Split,
    checkpoint: Path | None = None,
    report: Callable[[int, dict], None] = lambda seed, record: None,
) -> list[TrainResult]:
    """Every seed of d2l's step together (batched.sgd_epoch); each seed's figures as train.run gives them."""
    device = resolve_device(params.device)
    precision = batched.resolve_precision(params.precision, device)
    results = [TrainResult(seed, initial_model(params, seed, device), str(device)) for seed in params.seeds]
    train_images, train_labels = (tensor.to(device) for tensor in train_data)
    validation = tuple(tensor.to(device) for tensor in validation_data)
    group = batched.stack([result.model for result in results], device)
    for result, loss in zip(results, batched.evaluate(group, train_images, train_labels)[0].tolist()):
        result.initial_loss, result.precision = loss, precision
    shuffles = [torch.Generator(device=device).manual_seed(seed) for seed in params.seeds]
    inputs = batched.as_inputs(train_images, precision)  # converted once, not every epoch
    fingerprint = _fingerprint(params, list(params.seeds), train_data, validation_data)  # all the seeds
    start = resume_batched(checkpoint, fingerprint, group, shuffles, results)
    for epoch in range(start + 1, params.epochs + 1):
        started = time.perf_counter()
        step_losses, correct = batched.sgd_epoch(
            group, params.lr, inputs, train_labels, params.batch_size, shuffles, precision
        )
        losses, corrects = step_losses.tolist(), correct.tolist()  # the one sync of the epoch
        checked = batched.evaluate(group, *validation) if len(validation[1]) else None
        figures = list(zip(*(tensor.tolist() for tensor in checked))) if checked else [None] * len(results)
        share = (time.perf_counter() - started) / len(results)  # each seed's part of the batched epoch
        for result, seed_losses, seed_correct, seed_validation in zip(results, losses, corrects, figures):
            record_epoch(result, epoch, seed_losses, seed_correct, len(train_labels), seed_validation, share, report)
        if checkpoint is not None:
            save_batched(checkpoint, fingerprint, epoch, group, shuffles, results)
        if all(result.diverged for result in results):
            break
    batched.unstack(group, [result.model for result in results])
    return results


def record_epoch(
    result: TrainResult,
    epoch: int,
    losses: list[float],
    correct: int,
    count: int,
    validation: tuple[float, float] | None,
    seconds: float,
    report: Callable[[int, dict], None],
) -> None:
    """One seed's epoch of a batched run: its record, or its divergence (it then stays diverged)."""
    if result.diverged:
        return
    bad_step = next((step for step, value in enumerate(losses) if not math.isfinite(value)), None)
    if bad_step is not None:
        result.diverged = {"epoch": epoch, "step": bad_step + 1, "loss": str(losses[bad_step])}
        return
    record = {
        "epoch": epoch,
        "train_loss": sum(losses) / count,
        "train_accuracy": correct / count,
        "validation_loss": validation and validation[0],
        "validation_accuracy": validation and validation[1],
        "seconds": seconds,
    }
    result.history.append(record)
    report(result.seed, record)


def save_batched(path: Path, fingerprint: str, epoch: int, group: batched.Stack, shuffles: list, results: list) -> None:
    from pipeline.files import write_torch

    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "weights": group.weights,
        "biases": group.biases,
        "shuffles": [shuffle.get_state() for shuffle in shuffles],
        "histories": [result.history for result in results],
        "diverged": [result.diverged or {} for result in results],
    }
    write_torch(path, state)


def resume_batched(path: Path | None, fingerprint: str, group: batched.Stack, shuffles: list, results: list) -> int:
    """Load a matching checkpoint of a batched run (tensors only); its epoch, or 0 when there is none."""
    state = _matching_checkpoint(path, fingerprint)
    if state is None:
        return 0
    for current, saved in zip([*group.weights, *group.biases], [*state["weights"], *state["biases"]]):
        current.copy_(saved)
    for shuffle, saved, result, history, diverged in zip(
        shuffles, state["shuffles"], results, state["histories"], state["diverged"]
    ):
        shuffle.set_state(saved)
        result.history.extend(history)
        result.diverged = diverged or None
    print(f"resuming from {path} after epoch {state['epoch']}")
    return state["epoch"]


def _fingerprint(params: config.TrainParams, seed: int | list[int], *splits: Split) -> str:
    """What a checkpoint must match to be resumed: the params, the seed, and the data's shape and a sample of it."""
    settings = {**dataclasses.asdict(params), "seeds": None, "seed": seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for images, labels in splits:
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images[:: max(1, len(images) // 64)].contiguous().numpy().tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: Path,
    fingerprint: str,
    epoch: int,
    net: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    shuffle: torch.Generator,
    history: list[dict],
) -> None:
    from pipeline.files import write_torch

    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer else {},
        "shuffle": shuffle.get_state(),
        "history": history,
    }
    write_torch(path, state)


def resume(
    path: Path | None,
    fingerprint: str,
    net: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    shuffle: torch.Generator,
    history: list[dict],
) -> int:
    """Load a matching checkpoint (tensors only) and return its epoch; 0 when there is none to resume."""
    state = _matching_checkpoint(path, fingerprint)
    if state is None:
        return 0
    net.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    shuffle.set_state(state["shuffle"])
    history.extend(state["history"])
    print(f"resuming from {path} after epoch {state['epoch']}")
    return state["epoch"]


def _matching_checkpoint(path: Path | None, fingerprint: str) -> dict | None:
    """A checkpoint's state when it exists, loads (tensors only) and was made with these params and data."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is only a lost shortcut
        print(f"ignoring unreadable checkpoint {path}: {str(error).splitlines()[0]}")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        print(f"ignoring checkpoint {path}: made with other params or data")
        return None
    return state


def seed_summary(result: TrainResult) -> dict:
    """One seed's final figures; null for a diverged seed (its last finite epoch is not its result)."""
    last = result.history[-1] if result.history and not result.diverged else {}
    return {
        "initial_loss": result.initial_loss,
        "precision": result.precision,
        "diverged": result.diverged is not None,
        "diverged_epoch": (result.diverged or {}).get("epoch"),
        "diverged_step": (result.diverged or {}).get("step"),
        "epochs_completed": len(result.history),
        **{key: last.get(key) for key in HISTORY_COLUMNS[1:5]},
        "train_seconds": sum(record["seconds"] for record in result.history),
    }


def best_seed(results: list[TrainResult]) -> TrainResult | None:
    """The seed whose model goes to MLflow: best validation accuracy (lowest train loss without validation)."""
    finished = [result for result in results if result.diverged is None and result.history]
    if not finished:
        return None
    if finished[0].history[-1]["validation_accuracy"] is None:
        return min(finished, key=lambda result: result.history[-1]["train_loss"])
    return max(finished, key=lambda result: result.history[-1]["validation_accuracy"])


def history_csv(results: list[TrainResult]) -> str:
    """Per epoch, each column's mean over the seeds that reached it, and its std (what dvc plots draws)."""
    columns = ["epoch", "seeds"] + [f"{name}{suffix}" for name in HISTORY_COLUMNS[1:5] for suffix in ("", "_std")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns + ["seconds"])
    for epoch in range(1, max((len(result.history) for result in results), default=0) + 1):
        records = [result.history[epoch - 1] for result in results if len(result.history) >= epoch]
        row = [epoch, len(records)]
        for name in HISTORY_COLUMNS[1:5]:
            row += [_csv_number(value) for value in mean_and_std([record[name] for record in records])]
        writer.writerow(row + [_csv_number(statistics.fmean(record["seconds"] for record in records))])
    return buffer.getvalue()


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(value)


def print_epoch(seed: int, record: dict) -> None:
    validation = (
        ""
        if record["validation_accuracy"] is None
        else f"  validation loss {record['validation_loss']:.4f}  validation acc {record['validation_accuracy']:.4f}"
    )
    print(
        f"seed {seed}  epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
        f"train acc {record['train_accuracy']:.4f}{validation}  {record['seconds']:.2f} s",
        flush=True,
    )


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.pt and validation.pt")
    parser.add_argument(
        "--stats", type=Path, required=True, help="prepare's JSON (normalization, for the MLflow model)"
    )
    parser.add_argument("--models", type=Path, required=True, help="directory for seed-<s>.pt and seed-<s>.json")
    parser.add_argument("--summary", type=Path, required=True, help="JSON: per-seed figures and MLflow run ids")
    parser.add_argument("--history", type=Path, required=True, help="CSV, one row per epoch (mean and std over seeds)")
    parser.add_argument(
        "--checkpoints", type=Path, help="directory of resumable state, removed once the stage succeeds"
    )
    args = parser.parse_args()
    params = config.load(args.params)
    train_params = params.variant(args.variant)
    train_data, validation_data = (load_split(args.data / f"{split}.pt") for split in ("train", "validation"))
    resolve_device(train_params.device)  # fail on a missing device before touching MLflow
    train_logged(args, params, train_params, train_data, validation_data)


def train_logged(
    args, params: config.Params, train_params: config.TrainParams, train_data: Split, validation_data: Split
) -> None:
    """Every seed in its own nested MLflow run under the variant's run; then the DVC outputs."""
    from pipeline import tracking

    with tracking.stage_run("train", params.mlflow.experiment, variant=args.variant) as parent:
        import mlflow

        mlflow.log_params(
            {
                **dataclasses.asdict(train_params),
                "variant": args.variant,
                "dataset": params.data.dataset,
                "normalize": params.prepare.normalize,
                "validation": params.prepare.validation,
            }
        )
        digest = tracking.dvc_hash(args.data) or "unknown"
        for context in ("train", "validation"):
            tracking.log_dataset(args.data / f"{context}.pt", f"{params.data.dataset}-{context}", digest, context)
        if fused.applies(train_params.impl, train_params.activation, train_params.optimizer, train_params.loss):
            results = train_seeds_together(args, train_params, train_data, validation_data)
        else:
            results = [train_seed(args, train_params, s, train_data, validation_data) for s in train_params.seeds]
        mlflow.log_param("precision_used", results[0].precision)
        summary = summarize(args.variant, results, parent.info.run_id)
        mlflow.log_metrics({key: value for key, value in summary["aggregate"].items() if value is not None})
        save_models(args.models, train_params, results)  # first: a full disk fails here, with our message
        write_text(args.history, history_csv(results))
        mlflow.log_artifact(str(args.history))
        best = best_seed(results)
        if best is not None:
            summary["mlflow_model_seed"] = best.seed
            summary["mlflow_model_uri"] = log_model(
                best.model, train_params, read_json(args.stats), params.data.dataset
            )
        write_json(args.summary, summary)
    if args.checkpoints is not None:
        for name in [f"seed-{result.seed}.pt" for result in results] + [BATCHED_CHECKPOINT]:
            (args.checkpoints / name).unlink(missing_ok=True)


def train_seed(args, params: config.TrainParams, seed: int, train_data: Split, validation_data: Split) -> TrainResult:
    """One seed in its own nested run, its epochs logged with step=epoch."""
    import mlflow

    from pipeline import tracking

    with tracking.child_run(
        f"train@{args.variant} seed {seed}", {**tracking.lineage_tags("train", args.variant), "seed": str(seed)}
    ) as child:
        mlflow.log_params({"seed": seed, "variant": args.variant})

        def report(record: dict) -> None:
            print_epoch(seed, record)
            mlflow.MlflowClient().log_batch(child.info.run_id, metrics=epoch_metrics(record))

        checkpoint = args.checkpoints / f"seed-{seed}.pt" if args.checkpoints else None
        with cpu.shared_threads():
            result = run(params, seed, train_data, validation_data, checkpoint, report)
        result.run_id = child.info.run_id
        log_outcome(mlflow.MlflowClient(), result)
    return result


def train_seeds_together(
    args, params: config.TrainParams, train_data: Split, validation_data: Split
) -> list[TrainResult]:
    """Every seed in its own nested run, all open while the seeds train as one batch."""
    import mlflow

    from pipeline import tracking

    runs = {
        seed: (f"train@{args.variant} seed {seed}", {**tracking.lineage_tags("train", args.variant), "seed": str(seed)})
        for seed in params.seeds
    }
    with tracking.child_runs(runs) as run_ids:
        from mlflow.entities import Param

        client = mlflow.MlflowClient()
        for seed, run_id in run_ids.items():
            client.log_batch(run_id, params=[Param("seed", str(seed)), Param("variant", args.variant)])

        def report(seed: int, record: dict) -> None:
            print_epoch(seed, record)
            client.log_batch(run_ids[seed], metrics=epoch_metrics(record))

        checkpoint = args.checkpoints / BATCHED_CHECKPOINT if args.checkpoints else None
        with cpu.shared_threads():
            results = run_batched(params, train_data, validation_data, checkpoint, report)
        for result in results:
            result.run_id = run_ids[result.seed]
            log_outcome(client, result)
    return results


def epoch_metrics(record: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(key, value, now, record["epoch"])
        for key, value in record.items()
        if key != "epoch" and value is not None
    ]


def log_outcome(client, result: TrainResult) -> None:
    """A seed's device, precision, initial loss and divergence, on its run; a divergence is also printed."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = {
        "device": result.device,
        "precision": result.precision,
        "diverged": str(result.diverged is not None).lower(),
    }
    if result.diverged:
        tags.update(diverged_epoch=str(result.diverged["epoch"]), diverged_step=str(result.diverged["step"]))
        print(
            f"seed {result.seed} diverged: non-finite loss ({result.diverged['loss']}) at epoch "
            f"{result.diverged['epoch']}, step {result.diverged['step']}; no model saved"
        )
    metrics = [Metric("diverged", float(result.diverged is not None), now, 0)]
    if result.initial_loss is not None and math.isfinite(result.initial_loss):
        metrics.append(Metric("initial_loss", result.initial_loss, now, 0))
    client.log_batch(result.run_id, metrics=metrics, tags=[RunTag(key, value) for key, value in tags.items()])


def summarize(variant: str, results: list[TrainResult], run_id: str) -> dict:
    """train.json: each seed's figures and run, the means and spreads, and the variant's run (lineage)."""
    seeds = {str(result.seed): {**seed_summary(result), "mlflow_run_id": result.run_id} for result in results}
    aggregate = {}
    for name in HISTORY_COLUMNS[1:5]:
        aggregate[f"{name}_mean"], aggregate[f"{name}_std"] = mean_and_std([seed[name] for seed in seeds.values()])
    aggregate["finite_seeds"] = sum(not seed["diverged"] for seed in seeds.values())  # what every mean is over
    aggregate["diverged_seeds"] = sum(seed["diverged"] for seed in seeds.values())
    aggregate["train_seconds"] = sum(seed["train_seconds"] for seed in seeds.values())
    return {
        "variant": variant,
        "seeds": [result.seed for result in results],
        "device": results[0].device,
        "precision": results[0].precision,
        "diverged": aggregate["diverged_seeds"] > 0,
        "per_seed": seeds,
        "aggregate": aggregate,
        "mlflow_run_id": run_id,
        "mlflow_model_seed": None,
        "mlflow_model_uri": None,
    }


def save_model(path: Path, params: config.TrainParams, result: TrainResult) -> None:
    """The state dict (only when finite) and its architecture; a diverged seed's JSON says so instead."""
    described = {**architecture(params), "seed": result.seed, "diverged": result.diverged is not None}
    if result.diverged:
        write_json(path.with_suffix(".json"), described)
    else:
        mlp.save(result.model, path, described)


def save_models(directory: Path, params: config.TrainParams, results: list[TrainResult]) -> None:
    """Every seed's model into `directory`, replaced as a whole."""
    with atomic_dir(directory) as temp:
        for result in results:
            save_model(temp / f"seed-{result.seed}.pt", params, result)


def architecture(params: config.TrainParams) -> dict:
    return {
        "impl": params.impl,
        "hidden": list(params.hidden),
        "activation": params.activation,
        "inputs": mlp.INPUTS,
        "outputs": mlp.OUTPUTS,
    }


def log_model(net: nn.Module, params: config.TrainParams, stats: dict, dataset: str) -> str:
    """The model for serving: raw uint8 images in, the train split's normalization inside (pipeline/serving.py)."""
    from pipeline import serving
    from pipeline.datasets import class_names

    info = serving.log_model(
        net.cpu().eval(),
        architecture(params),
        mean=stats["mean"],
        std=stats["std"],
        class_names=class_names(dataset, mlp.OUTPUTS),
    )
    return info.model_uri


if __name__ == "__main__":
    main()
