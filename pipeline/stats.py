"""The statistics the comparison needs: means over seeds, Student-t intervals, verdicts and a bootstrap.

A comparison of two variants is a verdict with its test, so it reads the same on any machine. With m the
number of comparisons the report states (Bonferroni) and d the paired difference first - second:
- `better` / `worse`: the two-sided (1 - alpha / m) interval of d lies wholly above / below 0;
- `equivalent`: two one-sided tests (TOST), each at level alpha / m, against the declared margin: the
  (1 - 2 alpha / m) interval of d lies inside (-margin, +margin);
- `inconclusive`: neither.
`equivalent` is checked first: a difference smaller than the margin is too small to matter even when it is
also "significant". Whatever the true difference, a pair's verdict is wrong with probability at most alpha / m
(at 0: better or worse, alpha / m; strictly inside the margin: only the wrong sign, alpha / 2m; at or beyond
it: equivalent or the wrong sign, both below the one-sided (1 - alpha / m) bound, alpha / m), so the chance of
any wrong verdict among the m pairs (the family-wise error rate) is at most alpha.

The intervals are mean +- t(1 - gamma / 2, S - 1) x standard error over S seeds. Between variants the standard
error comes from a paired bootstrap over seeds x validation images (`paired_bootstrap_comparisons`), so the
verdicts hold against the validation set's sampling as well as the seeds'.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics

import numpy as np

from pipeline.spread import mean_and_std  # noqa: F401 - the summaries' spread, read here by evaluation

CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "equivalent", "inconclusive")
BOOTSTRAP_SEED = 0  # every bootstrap draws from this seed: the same params give the same bytes
CHUNK = 250  # resamples drawn at once: 250 x images counts keeps memory small


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided interval for the mean of `values` (Student t, n - 1 degrees of freedom); None below two values."""
    if len(values) < 2:
        return None
    mean, standard_error = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = t_half_width(standard_error, len(values) - 1, confidence)
    return mean - half, mean + half


def t_half_width(standard_error: float, degrees_of_freedom: int, confidence: float) -> float:
    """Half the two-sided Student-t interval at `confidence`: t(1 - (1 - confidence) / 2, df) x standard error."""
    return t_quantile((1 + confidence) / 2, degrees_of_freedom) * standard_error


@functools.cache
def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """Student t's quantile from scipy rather than a hand-copied table (a plain float, not numpy's):
    scipy.special's inverse of the t CDF, which scipy.stats.t.ppf calls, without importing all of scipy.stats."""
    from scipy.special import stdtrit

    return float(stdtrit(degrees_of_freedom, probability))


def levels(alpha: float, comparisons: int) -> tuple[float, float]:
    """The two confidences a verdict reads: (1 - alpha / m) for better/worse, (1 - 2 alpha / m) for TOST."""
    return 1 - alpha / comparisons, 1 - 2 * alpha / comparisons


def verdict(difference: tuple[float, float] | None, equivalence: tuple[float, float] | None, margin: float) -> str:
    """equivalent: the (1 - 2 alpha / m) interval inside (-margin, margin); better/worse: the (1 - alpha / m)
    interval wholly above/below 0; inconclusive otherwise (or without intervals)."""
    if difference is None or equivalence is None:
        return "inconclusive"
    if -margin < equivalence[0] and equivalence[1] < margin:
        return "equivalent"
    if difference[0] > 0:
        return "better"
    return "worse" if difference[1] < 0 else "inconclusive"


def judged(
    mean: float | None, standard_error: float | None, seeds: int, margin: float, comparisons: int, alpha: float
) -> dict:
    """Both intervals around `mean` (Student t on seeds - 1 degrees of freedom) and the verdict they give."""
    difference_confidence, equivalence_confidence = levels(alpha, comparisons)
    difference = equivalence = None
    if mean is not None and standard_error is not None and seeds >= 2:
        wide, narrow = (
            t_half_width(standard_error, seeds - 1, level) for level in (difference_confidence, equivalence_confidence)
        )
        difference, equivalence = (mean - wide, mean + wide), (mean - narrow, mean + narrow)
    return {
        "difference_mean": mean,
        "standard_error": standard_error,
        "difference_interval": list(difference) if difference else None,
        "difference_confidence": difference_confidence,
        "equivalence_interval": list(equivalence) if equivalence else None,
        "equivalence_confidence": equivalence_confidence,
        "verdict": verdict(difference, equivalence, margin),
    }


def paired_comparison(
    first: dict[str, float], second: dict[str, float], margin: float, comparisons: int = 1, alpha: float = 0.05
) -> dict:
    """first - second over the seeds both have, seeds alone: standard error s / sqrt(S), then `judged`."""
    seeds = sorted(set(first) & set(second), key=_seed_order)
    differences = [first[seed] - second[seed] for seed in seeds]
    mean = statistics.fmean(differences) if differences else None
    error = statistics.stdev(differences) / math.sqrt(len(seeds)) if len(seeds) >= 2 else None
    return {"seeds": seeds, **judged(mean, error, len(seeds), margin, comparisons, alpha)}


def paired_bootstrap_comparisons(
    correct: dict[str, dict[str, np.ndarray]],
    pairs: list[tuple[str, str]],
    margin: float,
    alpha: float,
    resamples: int,
) -> list[dict]:
    """Per pair (first, second), first - second in accuracy over the seeds both have, then `judged` with
    m = len(pairs); `correct` is variant -> seed -> which images that seed's model got right.

    The standard error is the standard deviation of the pair's mean difference over `resamples` bootstrap draws
    of seeds and images with replacement, the same seed and image indices for both variants (every pair shares
    the image draws), times sqrt(S / (S - 1)) so that it is the seeds' own s / sqrt(S) when the images add no
    spread. The draws count the seed x image interaction more than once (Owen, 2007), so the standard error
    errs wide and the error rates above are bounds, up to the t approximation and the bootstrap's own noise
    (about 1 / sqrt(2 resamples) of the standard error: 1.6% at 2,000)."""
    differences = [paired_differences(correct[first], correct[second]) for first, second in pairs]
    resampled = [matrix for _, matrix in differences if matrix.shape[0] >= 2 and matrix.shape[1]]
    variances = iter(bootstrap_variances(resampled, resamples))
    results = []
    for seeds, matrix in differences:
        count, images = matrix.shape
        mean = _exact_sum(matrix) / matrix.size if matrix.size else None
        error = math.sqrt(next(variances) * count / (count - 1)) if count >= 2 and images else None
        results.append({"seeds": seeds, "images": images, **judged(mean, error, count, margin, len(pairs), alpha)})
    return results


def paired_differences(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """The seeds both have, and seeds x images of first's correctness minus second's (-1, 0 or 1)."""
    seeds = sorted(set(first) & set(second), key=_seed_order)
    if not seeds:
        return [], np.zeros((0, 0))
    rows = [np.asarray(first[seed], dtype=np.float64) - np.asarray(second[seed], dtype=np.float64) for seed in seeds]
    return seeds, np.stack(rows)


def bootstrap_variances(matrices: list[np.ndarray], resamples: int, seed: int = BOOTSTRAP_SEED) -> list[float]:
    """Per matrix (integer entries, seeds x images), the variance (n - 1 denominator) over resamples of its mean
    with seeds and images resampled; exact integer sums, so the same draws give the same bits on any machine."""
    matrices, variances = [np.asarray(matrix, dtype=np.float64) for matrix in matrices], []
    for matrix, sums in zip(matrices, resampled_sums(matrices, resamples, seed)):
        totals = [round(total) for total in sums.tolist()]
        spread = len(totals) * sum(total * total for total in totals) - sum(totals) ** 2
        variances.append(spread / (len(totals) * (len(totals) - 1) * matrix.size**2))  # one rounding
    return variances


def resampled_sums(matrices: list[np.ndarray], resamples: int, seed: int = BOOTSTRAP_SEED) -> list[np.ndarray]:
    """Per matrix (seeds x the same N images), per resample, its sum over its seeds and the N images drawn with
    replacement: the image draws are shared, the seed draws are each matrix's own. float64 sums of integer
    entries are exact (every partial sum is an integer far below 2^53, whatever order the BLAS adds in); the
    draws come from numpy's PCG64 at `seed`, the same on every machine."""
    if not matrices:
        return []
    stacked = np.concatenate([np.asarray(matrix, dtype=np.float64) for matrix in matrices])
    offsets = [0, *itertools.accumulate(len(matrix) for matrix in matrices)]
    images, generator = stacked.shape[1], np.random.default_rng(seed)
    sums: list[list[np.ndarray]] = [[] for _ in matrices]
    for start in range(0, resamples, CHUNK):
        count = min(CHUNK, resamples - start)
        draws = generator.integers(0, images, size=(count, images)) + images * np.arange(count)[:, None]
        weights = np.bincount(draws.ravel(), minlength=count * images).reshape(count, images).astype(np.float64)
        per_row = weights @ stacked.T  # count x rows: each seed's sum over the drawn images
        for index, matrix in enumerate(matrices):
            picked = generator.integers(0, len(matrix), size=(count, len(matrix))) + offsets[index]
            sums[index].append(np.take_along_axis(per_row, picked, 1).sum(1))
    return [np.concatenate(parts) for parts in sums]


def _exact_sum(matrix: np.ndarray) -> int:
    return round(float(matrix.sum()))  # integer entries: exact in float64


def _seed_order(seed: str) -> tuple[int, str]:
    return (int(seed), seed) if seed.isdigit() else (0, seed)


def bootstrap_accuracy_interval(
    correct: list[list[bool]] | object, resamples: int, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE
) -> list[float] | None:
    """Percentile interval of the mean accuracy when both the seeds and the test images are resampled.

    `correct` is seeds x images (1 where that seed's model got that image right). Each resample draws seeds
    and images with replacement, so the interval holds the test set's own sampling error (about
    sqrt(p (1 - p) / n), 0.0034 at 0.87 on 10,000 images) as well as the spread over seeds."""
    matrix = np.asarray(correct, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] == 0:
        return None
    values = resampled_sums([matrix], resamples, seed)[0] / matrix.size
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail]).tolist()
    return [low, high]


def pack_bits(correct) -> str:
    """Which images a model got right (a bool vector: numpy, torch or a list), as hex: 8 images a byte, the first
    in the highest bit (numpy's packbits)."""
    return np.packbits(np.asarray(correct, dtype=bool).ravel()).tobytes().hex()


def unpack_bits(text: str, images: int) -> np.ndarray:
    """`pack_bits` undone: a bool array of `images` values; ValueError for text that cannot be that."""
    packed = bytes.fromhex(text)
    if len(packed) != -(-images // 8):
        raise ValueError(f"{len(packed)} bytes, expected {-(-images // 8)} for {images} images")
    return np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:images].astype(bool)
