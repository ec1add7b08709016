"""The verdicts' statistics against references: printed t quantiles, a bootstrap variance worked out by hand and by
enumeration, numpy's packbits, and a simulation with known differences in which the verdicts' error rate stays
within alpha."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy
import pytest
import torch

from pipeline import stats

T_TABLE = {(4, 0.975): 2.776445, (4, 0.95): 2.131847, (4, 0.995): 4.604095, (4, 0.99): 3.746947}  # df, quantile


@pytest.mark.parametrize(
    "alpha, comparisons, difference_quantile, equivalence_quantile",
    [(0.05, 1, 0.975, 0.95), (0.1, 2, 0.975, 0.95), (0.05, 5, 0.995, 0.99)],
)
def test_better_reads_the_one_minus_alpha_over_m_interval_and_equivalent_the_one_minus_two_alpha_over_m(
    alpha, comparisons, difference_quantile, equivalence_quantile
):
    result = stats.judged(0.01, 0.002, seeds=5, margin=0.05, comparisons=comparisons, alpha=alpha)
    wide, narrow = T_TABLE[(4, difference_quantile)] * 0.002, T_TABLE[(4, equivalence_quantile)] * 0.002
    assert result["difference_interval"] == pytest.approx([0.01 - wide, 0.01 + wide], abs=1e-7)
    assert result["equivalence_interval"] == pytest.approx([0.01 - narrow, 0.01 + narrow], abs=1e-7)
    assert result["difference_confidence"] == pytest.approx(1 - alpha / comparisons)
    assert result["equivalence_confidence"] == pytest.approx(1 - 2 * alpha / comparisons)


def test_a_difference_outside_the_one_minus_alpha_interval_only_is_not_called_better():
    # 90% interval 0.01 +- 0.0085 excludes 0, the 95% one (0.01 +- 0.0111) does not: a one-sided test at alpha
    # each way would make "better or worse" a test at 2 alpha.
    result = stats.judged(0.01, 0.004, seeds=5, margin=0.005, comparisons=1, alpha=0.05)
    assert result["equivalence_interval"][0] > 0 > result["difference_interval"][0]
    assert result["verdict"] == "inconclusive"
    assert stats.judged(0.02, 0.004, 5, 0.005, 1, 0.05)["verdict"] == "better"
    assert stats.judged(-0.02, 0.004, 5, 0.005, 1, 0.05)["verdict"] == "worse"
    assert stats.judged(0.001, 0.001, 5, 0.005, 1, 0.05)["verdict"] == "equivalent"  # 0.001 +- 0.0021 in +-0.005
    assert stats.judged(0.001, 0.0, 1, 0.005, 1, 0.05)["verdict"] == "inconclusive"  # one seed: no interval


# A 2 seeds x 3 images difference matrix. By hand: grand mean 1/2, row means 1/3 and 2/3, column means all 1/2,
# so the seed spread (divide by n) is 1/36, the image spread 0, the interaction's 2/9, and the bootstrap variance
# of the mean is (1/36) / 2 + 0 / 3 + (2/9) / 6 = 11/216.
HAND = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])


def test_the_bootstrap_variance_matches_a_hand_computation_and_an_enumeration_of_every_draw():
    means = [
        Fraction(sum(int(HAND[seed, image]) for seed in seeds for image in images), 6)
        for seeds in itertools.product(range(2), repeat=2)
        for images in itertools.product(range(3), repeat=3)
    ]  # all 4 x 27 equally likely resamples
    center = sum(means) / len(means)
    assert sum((mean - center) ** 2 for mean in means) / len(means) == Fraction(11, 216)
    (estimate,) = stats.bootstrap_variances([HAND], resamples=20000)
    assert estimate == pytest.approx(11 / 216, rel=0.03)


def test_a_pairs_standard_error_is_the_bootstraps_and_reduces_to_the_seeds_own_when_images_add_nothing():
    first = {"0": torch.tensor([True, False, False]), "1": torch.tensor([False, True, True])}
    second = {"0": torch.tensor([False, False, False]), "1": torch.tensor([False, False, False]), "2": torch.ones(3)}
    (result,) = stats.paired_bootstrap_comparisons({"a": first, "b": second}, [("a", "b")], 0.1, 0.05, 20000)
    assert (result["seeds"], result["images"], result["difference_mean"]) == (["0", "1"], 3, 0.5)
    assert result["standard_error"] == pytest.approx(math.sqrt(11 / 216 * 2), rel=0.02)  # times S / (S - 1)
    # Every image alike within a seed: no image spread, and the error is the seeds' s / sqrt(S).
    rows = {str(seed): torch.full((50,), accuracy) < 0.5 for seed, accuracy in enumerate([0.0, 1.0, 0.0, 0.0])}
    zero = {seed: torch.zeros(50, dtype=torch.bool) for seed in rows}
    (alike,) = stats.paired_bootstrap_comparisons({"a": rows, "b": zero}, [("a", "b")], 0.1, 0.05, 4000)
    assert alike["difference_mean"] == 0.75
    assert alike["standard_error"] == pytest.approx(math.sqrt(0.25 / 4), rel=0.05)  # stdev(1, 0, 1, 1) = 1/2


def test_the_bootstrap_is_fixed_by_its_seed_and_draws_the_same_images_for_both_variants():
    generator = torch.Generator().manual_seed(0)
    first = {str(seed): torch.rand(300, generator=generator) < 0.8 for seed in range(4)}
    second = {str(seed): torch.rand(300, generator=generator) < 0.7 for seed in range(4)}
    correct, pairs = {"a": first, "b": second, "c": first}, [("a", "b"), ("a", "c")]
    once, again = (stats.paired_bootstrap_comparisons(correct, pairs, 0.01, 0.05, 500) for _ in range(2))
    assert once == again
    assert once[1]["standard_error"] == 0.0 and once[1]["verdict"] == "equivalent"  # a variant against itself
    assert stats.bootstrap_variances([HAND], 500, seed=1) != stats.bootstrap_variances([HAND], 500, seed=0)


def test_no_common_seed_or_one_seed_gives_no_interval():
    one = {"0": torch.ones(8, dtype=torch.bool)}
    results = stats.paired_bootstrap_comparisons(
        {"a": one, "b": {"1": one["0"]}, "c": one}, [("a", "b"), ("a", "c")], 0.1, 0.05, 100
    )
    assert [(result["seeds"], result["difference_interval"], result["verdict"]) for result in results] == [
        ([], None, "inconclusive"),
        (["0"], None, "inconclusive"),
    ]


def test_equivalence_must_hold_against_the_validation_images_sampling_not_only_the_seeds():
    # Every seed alike: A is right on images 0-9 of 100, B on 0-4 and 10-14. The seeds alone see a difference of
    # exactly 0 with no spread; resampling the images sees that the 10 images on which they differ could have
    # been drawn unevenly (standard error about sqrt(0.1 / 100) = 0.032).
    first = {str(seed): torch.arange(100) < 10 for seed in range(5)}
    second = {
        str(seed): (torch.arange(100) < 5) | ((torch.arange(100) >= 10) & (torch.arange(100) < 15)) for seed in range(5)
    }
    seeds_only = stats.paired_comparison({seed: 0.10 for seed in first}, {seed: 0.10 for seed in second}, 0.02)
    (resampled,) = stats.paired_bootstrap_comparisons({"a": first, "b": second}, [("a", "b")], 0.02, 0.05, 2000)
    assert seeds_only["verdict"] == "equivalent"
    assert resampled["difference_mean"] == 0.0 and resampled["verdict"] == "inconclusive"
    assert resampled["standard_error"] == pytest.approx(math.sqrt(0.1 / 100 * 5 / 4), rel=0.1)


def test_packed_bits_are_numpys_packbits_and_read_back():
    generator = torch.Generator().manual_seed(3)
    for count in (0, 1, 8, 37):
        correct = torch.rand(count, generator=generator) < 0.5
        text = stats.pack_bits(correct)
        assert text == numpy.packbits(correct.numpy()).tobytes().hex()
        assert numpy.array_equal(stats.unpack_bits(text, count), correct.numpy())
    with pytest.raises(ValueError, match="2 bytes, expected 5 for 37 images"):
        stats.unpack_bits("ff00", 37)
    with pytest.raises(ValueError):
        stats.unpack_bits("zz", 8)


def simulated_pair(difference: float, seeds: int, images: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Two variants' correctness whose expected accuracy difference is exactly `difference`: per image a base
    rate and a symmetric image effect, per seed and variant a symmetric shift, then a coin per seed and image."""
    uniform = lambda *size, spread: spread * (2 * torch.rand(size, generator=generator) - 1)  # noqa: E731
    base = 0.45 + uniform(images, spread=0.1)
    first_rate = base + difference + uniform(images, spread=0.1) + uniform(seeds, 1, spread=0.1)
    second_rate = base + uniform(seeds, 1, spread=0.1)
    first = torch.rand(seeds, images, generator=generator) < first_rate
    second = torch.rand(seeds, images, generator=generator) < second_rate
    return {str(seed): row for seed, row in enumerate(first)}, {str(seed): row for seed, row in enumerate(second)}


def wrong(verdict: str, difference: float, margin: float) -> bool:
    """Whether a verdict is false for the true difference."""
    return {
        "better": difference <= 0,
        "worse": difference >= 0,
        "equivalent": abs(difference) >= margin,
        "inconclusive": False,
    }[verdict]


@pytest.fixture
def one_thread():
    """Small tensors gain nothing from a second thread, and on a busy machine they wait for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_chance_of_any_wrong_verdict_among_the_pairs_stays_within_alpha(one_thread):
    alpha, margin, trials, seeds = 0.2, 0.1, 200, 8
    differences = {"same": 0.0, "at_margin": margin, "small": -margin / 2}  # m = 3 pairs with known truths
    generator = torch.Generator().manual_seed(0)
    errors, family_errors, equivalent_same = dict.fromkeys(differences, 0), 0, 0
    for _ in range(trials):
        correct, pairs = {}, []
        for name, difference in differences.items():
            correct[f"{name}_a"], correct[f"{name}_b"] = simulated_pair(difference, seeds, 200, generator)
            pairs.append((f"{name}_a", f"{name}_b"))
        results = stats.paired_bootstrap_comparisons(correct, pairs, margin, alpha, resamples=200)
        mistakes = [
            wrong(result["verdict"], difference, margin) for result, difference in zip(results, differences.values())
        ]
        family_errors += any(mistakes)
        equivalent_same += results[0]["verdict"] == "equivalent"
        for name, mistake in zip(differences, mistakes):
            errors[name] += mistake
    slack = 2 * math.sqrt(alpha * (1 - alpha) / trials)  # two binomial standard errors
    assert family_errors / trials <= alpha + slack
    assert errors["same"] / trials <= alpha / 3 + 2 * math.sqrt(alpha / 3 / trials)  # better or worse at 0
    assert errors["at_margin"] / trials <= alpha / 3 + 2 * math.sqrt(alpha / 3 / trials)  # equivalent at the margin
    assert equivalent_same / trials > 0.3  # and the test still finds equivalence where it holds
