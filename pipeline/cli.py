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
    """SIGINT and SIGTERM raise KeyboardInterrupt, but never inside UNINTERRUPTIBLE code: there the signal
    waits until the store code has returned to its caller (a line tracer on the frames below it, set only
    while it waits), checked again every RETRY_S seconds (SIGALRM) as well."""
    if _inside(frame, UNINTERRUPTIBLE):
        _pending[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        _trace_callers(frame)
        return
    _deliver(signum)


def _deliver(signum: int) -> None:
    _pending.clear()
    sys.settrace(None)
    signal.setitimer(signal.ITIMER_REAL, 0)  # a retry still due would otherwise end the process by SIGALRM
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _trace_callers(frame: FrameType) -> None:
    """Give every frame below the outermost store frame a line tracer: the first line one of them runs, the
    store code has returned, and the signal is delivered there. The timer alone can starve: its handler runs
    right after a C call returns, and when SQLite's C calls take nearly all the time that is nearly always
    inside SQLAlchemy (a test waited 60 s so under load)."""
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    outermost = max(index for index, each in enumerate(stack) if _inside_module(each, UNINTERRUPTIBLE))
    sys.settrace(_untraced)  # line tracers run only while some trace function is set
    for caller in stack[outermost + 1 :]:
        caller.f_trace = _deliver_at_line


def _untraced(frame: FrameType, event: str, arg: object) -> None:
    return None  # frames started while a signal waits are not traced


def _deliver_at_line(frame: FrameType, event: str, arg: object):
    if event == "line" and _pending:
        _deliver(_pending[0])
    return _deliver_at_line


def _retry_pending(signum: int, frame: FrameType | None) -> None:
    if _pending:
        _interrupt(_pending[0], frame)


def _inside(frame: FrameType | None, modules: tuple[str, ...]) -> bool:
    while frame is not None:
        if _inside_module(frame, modules):
            return True
        frame = frame.f_back
    return False


def _inside_module(frame: FrameType, modules: tuple[str, ...]) -> bool:
    name = frame.f_globals.get("__name__", "")
    return any(name == module or name.startswith(module + ".") for module in modules)


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
