"""Mean and spread over seeds: what every summary of several runs reports (train, the study)."""

from __future__ import annotations

import statistics


def mean_and_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values present (std 0.0 for one value; None, None for none)."""
    present = [value for value in values if value is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0
