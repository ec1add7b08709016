"""The few statistics the comparison needs: mean and spread over seeds, and Student-t 95% intervals."""

from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.95


def mean_and_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values present (std 0.0 for one value; None, None for none)."""
    present = [value for value in values if value is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% interval for the mean of `values` (Student t, n - 1 degrees of freedom); None below two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t  # scipy's quantile rather than a hand-copied table

    mean, std = statistics.fmean(values), statistics.stdev(values)
    half = t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return float(mean - half), float(mean + half)  # plain floats: scipy gives numpy scalars


def paired_difference(first: dict[str, float], second: dict[str, float]) -> dict:
    """first - second over the seeds both have: mean, 95% interval, and whether the interval excludes 0."""
    seeds = sorted(set(first) & set(second))
    differences = [first[seed] - second[seed] for seed in seeds]
    interval = t_interval(differences)
    return {
        "seeds": seeds,
        "mean": statistics.fmean(differences) if differences else None,
        "interval": list(interval) if interval else None,
        "beyond_noise": interval is not None and (interval[0] > 0 or interval[1] < 0),
    }
