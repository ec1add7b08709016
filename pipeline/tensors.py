"""Prepared splits on disk: {"images": float32 [N, 784], "labels": int64 [N]}, checked whenever they are read."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError

FEATURES = 784
SPLIT_LAYOUT = f'{{"images": float32 [N, {FEATURES}], "labels": int64 [N]}} saved by torch.save'


def load_tensors(path: Path, expected: str) -> Any:
    """torch.load that never runs pickled code; a file it cannot read is one line naming it and what it should be."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise PipelineError(f"cannot read {path}: no such file; expected {expected}") from None
    except IsADirectoryError:
        raise PipelineError(f"cannot read {path}: it is a directory; expected {expected}") from None
    except pickle.UnpicklingError as error:
        raise PipelineError(
            f"refusing to load {path}: not a file of plain tensors ({_unpickling_reason(error)}); expected {expected}"
        ) from None
    except EOFError:
        raise PipelineError(f"cannot read {path}: it is empty or cut short; expected {expected}") from None
    except Exception as error:  # noqa: BLE001 - whatever torch.load trips on, the file is not what we wrote
        raise PipelineError(f"cannot read {path}: {_first_sentence(error)}; expected {expected}") from None


def load_split(path: Path, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a prepared split back, refusing anything but plain tensors of the expected shape, dtype and labels."""
    blob = load_tensors(path, SPLIT_LAYOUT)
    if not isinstance(blob, dict) or set(blob) != {"images", "labels"}:
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise PipelineError(f"{path}: got {found}, expected a mapping with keys ['images', 'labels']")
    images, labels = blob["images"], blob["labels"]
    _expect(path, "images", images, torch.float32, 2)
    _expect(path, "labels", labels, torch.int64, 1)
    if images.shape[1] != FEATURES or len(images) != len(labels):
        raise PipelineError(
            f"{path}: images {tuple(images.shape)} and labels {tuple(labels.shape)}, expected [N, {FEATURES}] and [N]"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise PipelineError(
            f"{path}: labels range from {labels.min().item()} to {labels.max().item()}, expected 0 to {classes - 1}"
        )
    return images, labels


def save_split(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    from pipeline.files import write_torch

    write_torch(path, {"images": images, "labels": labels})


def _expect(path: Path, key: str, value: object, dtype: torch.dtype, dims: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != dims:
        got = (
            f"{value.dtype} with {value.dim()} dimensions" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        raise PipelineError(f"{path}: {key} is {got}, expected a {dims}-d {dtype} tensor")


def _unpickling_reason(error: BaseException) -> str:
    # torch's message is a page of advice (including "load it with weights_only=False"); keep only what it refused.
    found = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \S+)", str(error))
    return found.group(0) if found else _first_sentence(error)


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0][:200]
