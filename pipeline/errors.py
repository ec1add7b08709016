"""One exception type for bad input, and the one-line exit every stage uses for it."""
from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, unreachable source); str() is one line."""


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stage_entry(main: Callable[[], T]) -> Callable[[], T]:
    """Wrap a stage's main(): PipelineError -> one line on stderr and exit 2; SIGTERM acts like Ctrl-C."""

    @functools.wraps(main)
    def wrapper() -> T:
        # SIGTERM (what `kill` and CI cancellations send) must unwind like SIGINT, so that
        # open MLflow runs are ended as KILLED and temporary files are removed.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return main()
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as interrupt:
            print(f"interrupted: {interrupt or 'SIGINT'}", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
