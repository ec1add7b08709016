"""A variant's resumable training state: one file for all its seeds, resumed only while it is still valid.

Valid means made by the same params and seeds, on the same resolved device and precision, by the same torch
and the same training code, from the same data; anything else is discarded with one line saying why, so a
checkpoint left by a run that failed is never resumed by the code that fixed it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from pipeline import config
from pipeline.files import write_torch

# The code whose change makes a checkpoint stale: the trainer, the models, and the stage that drives them.
TRAINING_CODE = ("batched.py", "model.py", "checkpoints.py", "stages/train.py")


def fingerprint(
    params: config.TrainParams, device: torch.device, *splits: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, str]:
    """What a checkpoint must match, part by part: params and seeds, device, precision, torch, the training code
    and the data (its shapes and a sample)."""
    settings = {**dataclasses.asdict(params)}
    precision = settings.pop("precision")
    code, data = hashlib.sha256(), hashlib.sha256()
    root = Path(__file__).parent
    for name in TRAINING_CODE:
        code.update((root / name).read_bytes())
    for images, labels in splits:
        data.update(str(tuple(images.shape)).encode())
        data.update(images[:: max(1, len(images) // 64)].contiguous().numpy().tobytes())
        data.update(labels.contiguous().numpy().tobytes())
    return {
        "params": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "device": str(device),
        "precision": precision,
        "torch": str(torch.__version__),
        "code": code.hexdigest(),
        "data": data.hexdigest(),
    }


def save(path: Path, fingerprint: dict[str, str], epoch: int, group, shuffles: list, results: list) -> None:
    """The state after `epoch`: weights, optimizer state, each seed's generator, history and divergence."""
    weights = group.weights()
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "weights": [tensor.detach().cpu() for tensor in weights.weights],
        "biases": [tensor.detach().cpu() for tensor in weights.biases],
        "optimizers": [step.state_dict() for step in group.optimizers],
        "shuffles": [shuffle.get_state() for shuffle in shuffles],
        "histories": [result.history for result in results],
        "seconds": [result.seconds for result in results],
        "diverged": [result.diverged or {} for result in results],
    }
    write_torch(path, state)


def resume(path: Path | None, fingerprint: dict[str, str], group, shuffles: list, results: list) -> int:
    """Load a valid checkpoint into the group, generators and results; its epoch, or 0 when there is none."""
    state = _valid(path, fingerprint)
    if state is None:
        return 0
    from pipeline.batched import Stack

    device = group.device
    saved = Stack([w.to(device) for w in state["weights"]], [b.to(device) for b in state["biases"]])
    group.load(saved, state["optimizers"])
    for shuffle, generator_state, result, history, seconds, diverged in zip(
        shuffles, state["shuffles"], results, state["histories"], state["seconds"], state["diverged"]
    ):
        shuffle.set_state(generator_state)
        result.history.extend(history)
        result.seconds, result.diverged = seconds, diverged or None
    print(f"resuming from {path} after epoch {state['epoch']}")
    return state["epoch"]


def _valid(path: Path | None, fingerprint: dict[str, str]) -> dict | None:
    """A checkpoint's state when it exists, loads (tensors only) and matches; else None, saying why."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is only a lost shortcut
        print(f"ignoring unreadable checkpoint {path}: {str(error).splitlines()[0]}")
        return None
    saved = state.get("fingerprint") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        print(f"ignoring checkpoint {path}: it records no fingerprint")
        return None
    differ = [part for part in fingerprint if saved.get(part) != fingerprint[part]]
    if differ:
        print(f"ignoring checkpoint {path}: made with other {', '.join(differ)}")
        return None
    return state
