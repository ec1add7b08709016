"""Atomic writes: a temp file or directory beside the target, then a rename; a killed stage leaves no half-file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result should look like any other file
    try:
        yield Path(temp)
        os.replace(temp, path)
    except OSError as error:
        raise PipelineError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    for stale in path.parent.glob(f".{path.name}.*.tmpdir"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmpdir", dir=path.parent))
    os.chmod(temp, 0o777 & ~_UMASK)
    try:
        yield temp
        if path.exists():
            shutil.rmtree(path)
        os.replace(temp, path)
    except PipelineError as error:  # a file that could not be written is named where the user will look for it
        raise PipelineError(str(error).replace(str(temp), str(path))) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as temp:
        temp.write_text(text)


def write_torch(path: Path, value: Any) -> None:
    """torch.save, atomically. Serialized in memory first: torch reports a failed write (full disk)
    as an obscure RuntimeError from its zip writer, Python's own write as a plain OSError."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    with atomic_file(path) as temp:
        temp.write_bytes(buffer.getbuffer())


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported when a stage draws (it costs ~0.5 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_png(path: Path, figure: Any) -> None:
    """Save a matplotlib figure atomically, then free it."""
    try:
        with atomic_file(path) as temp:
            figure.savefig(temp, format="png", dpi=100)
    finally:
        pyplot().close(figure)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PipelineError(f"cannot create {path.parent}: {error.strerror or error}") from None
