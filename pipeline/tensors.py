"""Prepared splits on disk: {"images": float32 [N, 784], "labels": int64 [N]}, checked whenever they are read."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.errors import PipelineError

FEATURES = 784


def load_split(path: Path, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a prepared split back, refusing anything but plain tensors of the expected shape, dtype and labels."""
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise PipelineError(f"cannot read prepared data {path}: {_first_line(error)}") from None
    if not isinstance(blob, dict) or set(blob) != {"images", "labels"}:
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise PipelineError(f"{path}: got {found}, expected a mapping with keys ['images', 'labels']")
    images, labels = blob["images"], blob["labels"]
    _expect(path, "images", images, torch.float32, 2)
    _expect(path, "labels", labels, torch.int64, 1)
    if images.shape[1] != FEATURES or len(images) != len(labels):
        raise PipelineError(f"{path}: images {tuple(images.shape)} and labels {tuple(labels.shape)}, "
                            f"expected [N, {FEATURES}] and [N]")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise PipelineError(f"{path}: labels range from {labels.min().item()} to {labels.max().item()}, "
                            f"expected 0 to {classes - 1}")
    return images, labels


def save_split(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    from pipeline.files import write_torch

    write_torch(path, {"images": images, "labels": labels})


def _expect(path: Path, key: str, value: object, dtype: torch.dtype, dims: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != dims:
        got = f"{value.dtype} with {value.dim()} dimensions" if isinstance(value, torch.Tensor) else type(value).__name__
        raise PipelineError(f"{path}: {key} is {got}, expected a {dims}-d {dtype} tensor")


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0][:300]
