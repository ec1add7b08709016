"""What every stage's main() shares: its command line, and an entry wrapper that turns errors and signals into exits."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")
DEFAULT_PARAMS = Path("params.yaml")


def stage_parser(doc: str, params: Path = DEFAULT_PARAMS) -> argparse.ArgumentParser:
    """A stage's command line: the first line of its docstring, and where its params file is."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=params)
    return parser


# Python code that a signal must not cut short: an interrupt inside an SQLAlchemy transaction leaves the
# SQLite store locked, and ending the MLflow run as KILLED then fails with "database is locked".
UNINTERRUPTIBLE = ("sqlalchemy", "mlflow.store", "alembic")
RETRY_S = 0.02
_pending: list[int] = []  # a signal that arrived inside such code, delivered once it has returned


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, but never inside UNINTERRUPTIBLE code: there the
    signal waits, checked again every RETRY_S seconds (SIGALRM), until the code has returned."""
    if _inside(frame, UNINTERRUPTIBLE):
        _pending[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    _pending.clear()
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _retry_pending(signum: int, frame: FrameType | None) -> None:
    if _pending:
        _interrupt(_pending[0], frame)


def _inside(frame: FrameType | None, modules: tuple[str, ...]) -> bool:
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if any(name == module or name.startswith(module + ".") for module in modules):
            return True
        frame = frame.f_back
    return False


def stage_entry(main: Callable[[], T]) -> Callable[[], T]:
    """Wrap a stage's main(): PipelineError -> one line on stderr and exit 2; SIGTERM acts like Ctrl-C, and
    neither cuts an MLflow store call short (see _interrupt)."""

    @functools.wraps(main)
    def wrapper() -> T:
        # SIGTERM (what `kill` and CI cancellations send) must unwind like SIGINT, so that
        # open MLflow runs are ended as KILLED and temporary files are removed.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupt)
        signal.signal(signal.SIGALRM, _retry_pending)
        try:
            return main()
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as interrupt:
            print(f"interrupted: {interrupt or 'SIGINT'}", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
