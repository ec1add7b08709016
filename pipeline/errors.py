"""The one exception type for problems the user can fix; every stage prints it as one line (see cli.py)."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, unreachable source); str() is one line."""


def first_line(error: BaseException) -> str:
    """An exception as one short line for an `error:` message: its first line, or its type when it has none."""
    return (str(error).strip() or type(error).__name__).splitlines()[0][:300]
