"""CPU threads shared fairly between trainings running at once (dvc queue start -j N, or two shells)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

SLOTS_DIR = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"d2l-mlp-train-slots-{os.getuid()}"


@contextmanager
def shared_threads() -> Iterator[int]:
    """Hold a training slot; torch gets the machine's cores divided by the slots held at the start.
    OMP_NUM_THREADS, when set, wins: that is the documented way to choose by hand."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        yield torch.get_num_threads()
        return
    slot = _take_slot()
    try:
        threads = max(1, (os.cpu_count() or 1) // max(1, _slots_held()))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(previous)
    finally:
        if slot is not None:
            slot.close()


def _take_slot() -> IO | None:
    """The first free slot file, locked for as long as this training runs; None if the directory is unusable."""
    try:
        SLOTS_DIR.mkdir(mode=0o700, exist_ok=True)
        for index in range(os.cpu_count() or 1):
            handle = open(SLOTS_DIR / f"slot-{index}", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
    except OSError:
        return None
    return None


def _slots_held() -> int:
    """How many slots are locked now, this process's own included."""
    held = 0
    for path in SLOTS_DIR.glob("slot-*"):
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                held += 1
    return held
