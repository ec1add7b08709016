"""The one exception type for problems the user can fix; every stage prints it as one line (see cli.py)."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, unreachable source); str() is one line."""
