"""Stage `train`: one variant of the MLP; data moved to the device once and batched by index.

Prints one line per epoch and logs the same numbers to MLflow (step=epoch). A non-finite loss stops
the variant and is recorded as diverged: no model is saved for it, and the pipeline goes on.
With d2l's settings (10 epochs, lr 0.1, batch 256, N(0, 0.01) init) test accuracy reaches about 0.85.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import cli, config, fused, model as mlp
from pipeline.losses import LOSSES, LossFunction
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import write_json, write_text, write_torch
from pipeline.tensors import load_split

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
              "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds")


@dataclass
class TrainResult:
    model: nn.Module
    device: str
    history: list[dict] = field(default_factory=list)
    diverged: dict | None = None  # {"epoch": e, "step": s, "loss": value} when the loss went non-finite


def resolve_device(name: str) -> torch.device:
    """auto prefers cuda, then mps, then cpu; an explicit device that is missing is an error."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()), "cpu": True}
    if name == "auto":
        return torch.device(next(device for device in ("cuda", "mps", "cpu") if available[device]))
    if not available[name]:
        raise PipelineError(f"train.device: got {name!r}, but this machine has no {name} device "
                            f"(torch {torch.__version__}); expected auto or cpu")
    return torch.device(name)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                loss_function: LossFunction = F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass in random order; returns per-step summed losses and the correct count, both on the device."""
    if fused.applies(model, optimizer, loss_function):  # d2l's case, without autograd: same maths, fewer calls
        return fused.sgd_epoch(model, optimizer.param_groups[0]["lr"], images, labels, batch_size, generator)
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
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 10000,
             loss_function: LossFunction = F.cross_entropy) -> tuple[float, float]:
    """Mean loss and accuracy, without autograd."""
    model.eval()
    loss, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(x)
        loss += loss_function(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train()
    return loss.item() / len(labels), correct.item() / len(labels)


def run(params: config.TrainParams, train_data: tuple[torch.Tensor, torch.Tensor],
        test_data: tuple[torch.Tensor, torch.Tensor], checkpoint: Path | None = None,
        report: Callable[[dict], None] = lambda record: None) -> TrainResult:
    """Train for params.epochs (resuming from `checkpoint` when it matches); stop early on divergence."""
    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    # Initial weights come from a CPU generator: the same seed gives the same start on any device.
    net = mlp.build(params.impl, params.hidden, params.activation, params.init_std,
                    torch.Generator().manual_seed(params.seed)).to(device)
    optimizer = OPTIMIZERS[params.optimizer](net.parameters(), lr=params.lr)
    shuffle = torch.Generator(device=device).manual_seed(params.seed)
    train_images, train_labels = (tensor.to(device) for tensor in train_data)
    test_images, test_labels = (tensor.to(device) for tensor in test_data)
    result = TrainResult(net, str(device))
    fingerprint = _fingerprint(params, train_data, test_data)
    start = resume(checkpoint, fingerprint, net, optimizer, shuffle, result.history)
    for epoch in range(start + 1, params.epochs + 1):
        started = time.perf_counter()
        step_losses, correct = train_epoch(net, optimizer, train_images, train_labels, params.batch_size, shuffle,
                                           LOSSES[params.loss])
        losses = step_losses.tolist()  # the one sync of the epoch
        bad_step = next((step for step, value in enumerate(losses) if not math.isfinite(value)), None)
        if bad_step is not None:
            result.diverged = {"epoch": epoch, "step": bad_step + 1, "loss": str(losses[bad_step])}
            break
        test_loss, test_accuracy = evaluate(net, test_images, test_labels, loss_function=LOSSES[params.loss])
        record = {"epoch": epoch, "train_loss": sum(losses) / len(train_labels),
                  "train_accuracy": correct.item() / len(train_labels), "test_loss": test_loss,
                  "test_accuracy": test_accuracy, "seconds": time.perf_counter() - started}
        result.history.append(record)
        report(record)
        if checkpoint is not None:
            save_checkpoint(checkpoint, fingerprint, epoch, net, optimizer, shuffle, result.history)
    return result


def _fingerprint(params: config.TrainParams, *splits: tuple[torch.Tensor, torch.Tensor]) -> str:
    """What a checkpoint must match to be resumed: the params and the data's shape and a sample of it."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(params), sort_keys=True).encode())
    for images, labels in splits:
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images[:: max(1, len(images) // 64)].contiguous().numpy().tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, fingerprint: str, epoch: int, net: nn.Module,
                    optimizer: torch.optim.Optimizer, shuffle: torch.Generator, history: list[dict]) -> None:
    state = {"fingerprint": fingerprint, "epoch": epoch, "model": net.state_dict(),
             "optimizer": optimizer.state_dict(), "shuffle": shuffle.get_state(), "history": history}
    write_torch(path, state)


def resume(path: Path | None, fingerprint: str, net: nn.Module, optimizer: torch.optim.Optimizer,
           shuffle: torch.Generator, history: list[dict]) -> int:
    """Load a matching checkpoint (tensors only) and return its epoch; 0 when there is none to resume."""
    if path is None or not path.exists():
        return 0
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is only a lost shortcut
        print(f"ignoring unreadable checkpoint {path}: {str(error).splitlines()[0]}")
        return 0
    if state.get("fingerprint") != fingerprint:
        print(f"ignoring checkpoint {path}: made with other params or data")
        return 0
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    shuffle.set_state(state["shuffle"])
    history.extend(state["history"])
    print(f"resuming from {path} after epoch {state['epoch']}")
    return state["epoch"]


def summary(variant: str, result: TrainResult, run_id: str) -> dict:
    """The final figures DVC tracks; null where a diverged run has none."""
    last = result.history[-1] if result.history else {}
    return {"variant": variant, "diverged": result.diverged is not None,
            "diverged_epoch": (result.diverged or {}).get("epoch"),
            "diverged_step": (result.diverged or {}).get("step"),
            "epochs_completed": len(result.history),
            **{key: last.get(key) for key in HISTORY_COLUMNS[1:5]},
            "train_seconds": sum(record["seconds"] for record in result.history),
            "epoch_seconds_median": statistics.median([r["seconds"] for r in result.history]) if result.history else None,
            "device": result.device, "mlflow_run_id": run_id, "mlflow_model_uri": None}


def history_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def print_epoch(record: dict) -> None:
    print(f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
          f"train acc {record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f}  "
          f"test acc {record['test_accuracy']:.4f}  {record['seconds']:.2f} s", flush=True)


def log_model(net: nn.Module, example: torch.Tensor) -> str:
    """The model in MLflow's pytorch flavor, with signature and input example (pt2 needs the example)."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    net = net.cpu().eval()
    example = example.cpu().numpy()
    with torch.no_grad():
        signature = infer_signature(example, net(torch.from_numpy(example)).numpy())
    # Naming the requirements skips MLflow's inference of them, which costs seconds per call.
    # The default pt2 format (torch.export) costs ~4 s per model but loads without unpickling code.
    info = mlflow.pytorch.log_model(net, name="model", signature=signature, input_example=example,
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.pt and test.pt")
    parser.add_argument("--model", type=Path, required=True, help="model.pt to write (and model.json beside it)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of the final figures")
    parser.add_argument("--history", type=Path, required=True, help="CSV, one row per epoch")
    parser.add_argument("--checkpoint", type=Path, help="resumable state, removed once the stage succeeds")
    args = parser.parse_args()
    params = config.load(args.params)
    train_params = params.variant(args.variant)
    train_data, test_data = (load_split(args.data / f"{split}.pt") for split in ("train", "test"))
    resolve_device(train_params.device)  # fail on a missing device before touching MLflow

    from pipeline import tracking

    with tracking.stage_run("train", params.mlflow.experiment, variant=args.variant) as mlflow_run:
        import mlflow

        mlflow.log_params({**dataclasses.asdict(train_params), "variant": args.variant,
                           "dataset": params.data.dataset, "normalize": params.prepare.normalize})

        def report(record: dict) -> None:
            print_epoch(record)
            mlflow.log_metrics({key: value for key, value in record.items() if key != "epoch"}, step=record["epoch"])

        result = run(train_params, train_data, test_data, args.checkpoint, report)
        mlflow.set_tag("device", result.device)
        metrics = summary(args.variant, result, mlflow_run.info.run_id)
        mlflow.log_metrics({"diverged": float(result.diverged is not None), "train_seconds": metrics["train_seconds"]})
        if result.diverged:
            mlflow.set_tags({"diverged": "true", "diverged_epoch": result.diverged["epoch"],
                             "diverged_step": result.diverged["step"]})
        # The model file first: a full disk or read-only directory fails here, with our message.
        write_outputs(args, train_params, result)
        if not result.diverged:
            metrics["mlflow_model_uri"] = log_model(result.model, train_data[0][:2])
        write_json(args.metrics, metrics)
        mlflow.log_artifact(str(args.history))
    if args.checkpoint is not None and args.checkpoint.exists():
        os.unlink(args.checkpoint)


def write_outputs(args: argparse.Namespace, params: config.TrainParams, result: TrainResult) -> None:
    """Model (only when finite), its architecture and the history; diverged runs say so instead."""
    architecture = {"impl": params.impl, "hidden": list(params.hidden), "activation": params.activation,
                    "inputs": mlp.INPUTS, "outputs": mlp.OUTPUTS, "diverged": result.diverged is not None}
    if result.diverged:
        print(f"diverged: non-finite loss ({result.diverged['loss']}) at epoch {result.diverged['epoch']}, "
              f"step {result.diverged['step']}; no model saved")
        write_json(args.model.with_suffix(".json"), architecture)
    else:
        mlp.save(result.model, args.model, architecture)
    write_text(args.history, history_csv(result.history))


if __name__ == "__main__":
    main()
