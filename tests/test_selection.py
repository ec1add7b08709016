"""Honest selection: a stratified validation split, intervals checked against t tables, and the selection rule."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pipeline import config, stats
from pipeline.errors import PipelineError
from pipeline.stages import compare, prepare
from tests.conftest import idx_bytes, make_split

T_975 = {4: 2.776445}  # Student t quantiles from a printed table (df -> t at 0.975)


def test_validation_split_is_stratified_exact_and_fixed_by_its_seed():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    held_out = prepare.validation_indices(labels, 100, seed=0)
    assert len(held_out) == 100 and len(set(held_out.tolist())) == 100
    assert torch.bincount(labels[held_out]).tolist() == [60, 30, 10]
    assert torch.equal(held_out, prepare.validation_indices(labels, 100, seed=0))
    assert not torch.equal(held_out, prepare.validation_indices(labels, 100, seed=1))
    uneven = prepare.validation_indices(labels, 7, seed=0)  # 4.2, 2.1, 0.7: largest remainders get the rest
    assert torch.bincount(labels[uneven], minlength=3).tolist() == [4, 2, 1]


@pytest.mark.parametrize(
    "count, message",
    [
        (1000, "prepare.validation: got 1000, expected 0 to 999"),
        (-1, "prepare.validation: got -1, expected 0 to 999"),
        (2, "prepare.validation: got 2, which leaves class 2 without validation images"),
    ],
)
def test_a_split_that_cannot_be_made_is_refused(count, message):
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    with pytest.raises(PipelineError, match=message):
        prepare.validation_indices(labels, count, seed=0)


def test_prepare_writes_three_disjoint_splits_normalized_with_the_train_part_only(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (train_images, train_labels), (test_images, test_labels) = make_split(200, seed=1), make_split(50, seed=2)
    for kind, array in [
        ("train_images", train_images),
        ("train_labels", train_labels),
        ("test_images", test_images),
        ("test_labels", test_labels),
    ]:
        (raw / prepare.FILE_KINDS[kind]).write_bytes(idx_bytes(array))
    figures = prepare.run(raw, tmp_path / "out", normalize=True, validation=40, seed=3)
    assert (figures["train_count"], figures["validation_count"], figures["test_count"]) == (160, 40, 50)
    assert figures["validation_class_counts"] == [4] * 10
    from pipeline.tensors import load_split

    train, validation = (load_split(tmp_path / "out" / f"{split}.pt") for split in ("train", "validation"))
    pixels = lambda split: (split[0] * figures["std"] + figures["mean"]).mul(255).round()
    rows = {tuple(row.tolist()) for row in pixels(train)}
    assert not rows & {tuple(row.tolist()) for row in pixels(validation)}  # no image in both
    assert len(rows) + len(validation[1]) == 200
    assert abs(train[0].double().mean().item()) < 1e-5 and abs(train[0].double().std().item() - 1) < 1e-4


def test_t_interval_matches_a_table_computation():
    values = [0.85, 0.86, 0.84, 0.87, 0.855]
    low, high = stats.t_interval(values)
    half = T_975[4] * statistics.stdev(values) / math.sqrt(5)
    assert low == pytest.approx(statistics.fmean(values) - half, abs=1e-6)
    assert high == pytest.approx(statistics.fmean(values) + half, abs=1e-6)
    assert stats.t_interval([0.9]) is None


def test_verdicts_come_from_two_one_sided_tests_against_the_margin_with_bonferroni():
    close = stats.paired_comparison({"0": 0.861, "1": 0.852, "2": 0.870}, {"0": 0.860, "1": 0.851, "2": 0.871}, 0.005)
    differences = [0.001, 0.001, -0.001]
    half = stats_t(0.95, 2) * statistics.stdev(differences) / math.sqrt(3)  # TOST at alpha 0.05: a 90% interval
    assert close["interval"] == pytest.approx(
        [statistics.fmean(differences) - half, statistics.fmean(differences) + half]
    )
    assert close["verdict"] == "equivalent" and close["seeds"] == ["0", "1", "2"]
    # The same differences spread over more comparisons get a wider interval: Bonferroni.
    corrected = stats.paired_comparison(
        {"0": 0.861, "1": 0.852, "2": 0.870}, {"0": 0.860, "1": 0.851, "2": 0.871}, 0.005, comparisons=6
    )
    assert corrected["interval"][1] - corrected["interval"][0] > close["interval"][1] - close["interval"][0]
    assert corrected["confidence"] == pytest.approx(1 - 0.1 / 6)
    noisy = stats.paired_comparison({"0": 0.86, "1": 0.84, "2": 0.87}, {"0": 0.85, "1": 0.85, "2": 0.85}, 0.005)
    assert noisy["verdict"] == "inconclusive"  # not "equivalent": failing to find a difference is no equivalence
    better = stats.paired_comparison({"0": 0.86, "1": 0.87, "2": 0.865}, {"0": 0.80, "1": 0.80, "2": 0.81}, 0.005)
    worse = stats.paired_comparison({"0": 0.80, "1": 0.80, "2": 0.81}, {"0": 0.86, "1": 0.87, "2": 0.865}, 0.005)
    assert (better["verdict"], worse["verdict"]) == ("better", "worse")
    assert stats.paired_comparison({"0": 0.9}, {"0": 0.8}, 0.005)["verdict"] == "inconclusive"  # one seed: no test


def stats_t(confidence: float, df: int) -> float:
    return {(0.95, 2): 2.919986}[(confidence, df)]  # Student t at 0.95, 2 degrees of freedom, from a printed table


def test_the_test_accuracy_interval_holds_the_test_sets_own_sampling_error():
    generator = torch.Generator().manual_seed(0)
    right = torch.rand(10000, generator=generator) < 0.87  # five seeds that agree on every image: no seed spread
    interval = stats.bootstrap_accuracy_interval([right.tolist()] * 5, resamples=2000)
    accuracy = right.float().mean().item()
    binomial = 1.96 * math.sqrt(accuracy * (1 - accuracy) / 10000)  # about 0.0066
    assert interval[0] < accuracy < interval[1]
    assert interval[1] - interval[0] == pytest.approx(2 * binomial, rel=0.15)
    assert stats.t_interval([accuracy] * 5) == pytest.approx((accuracy, accuracy))  # what seeds alone would say
    assert stats.bootstrap_accuracy_interval([right.tolist()], resamples=200) is None  # one seed: no interval


def row(
    validation: list[float | None], train_gates: bool = True, test_gate: bool = True, changed: dict | None = None
) -> dict:
    per_seed = {str(seed): {"validation_accuracy": value} for seed, value in enumerate(validation)}
    present = [value for value in validation if value is not None]
    mean = statistics.fmean(present) if present else None
    return {
        "train": {"per_seed": per_seed, "aggregate": {"validation_accuracy_mean": mean}},
        "eval": {"train_gates_passed": train_gates, "passed": train_gates and test_gate},
        "changed": changed or {},
    }


def choose(rows: dict, margin: float = 0.005, prefer: str = "fewest_changes") -> dict:
    settings = config.CompareParams(margin=margin, alpha=0.05, prefer=prefer, bootstrap=100)
    return compare.select(rows, compare.compare_pairs(rows, settings), settings)


def test_the_champion_has_the_best_mean_validation_accuracy_among_variants_that_pass_the_train_gates():
    rows = {
        "best_but_fails": row([0.95, 0.95, 0.95], train_gates=False),
        "second": row([0.86, 0.85, 0.87]),
        "third": row([0.80, 0.81, 0.80]),
        "close": row([0.855, 0.84, 0.865]),
    }
    selection = choose(rows)
    assert selection["champion"] == "second" and selection["equivalent"] == []


def test_the_test_gate_takes_no_part_in_the_choice():
    rows = {"fails_test_gate": row([0.90, 0.91, 0.90], test_gate=False), "passes": row([0.80, 0.81, 0.80])}
    assert choose(rows)["champion"] == "fails_test_gate"


def test_among_equivalent_variants_the_stated_rule_picks_not_the_noise():
    rows = {
        "scratch": row([0.8801, 0.8702, 0.8753, 0.8651], changed={"impl": "scratch"}),
        "defaults": row([0.8800, 0.8700, 0.8750, 0.8650]),
        "worse": row([0.80, 0.81, 0.80, 0.79], changed={"init_std": 1.0}),
    }
    fewest = choose(rows)
    assert (fewest["best_by_mean"], fewest["champion"], fewest["equivalent"]) == ("scratch", "defaults", ["defaults"])
    assert choose(rows, prefer="first_listed")["champion"] == "scratch"
    assert choose(rows, margin=0.0001)["champion"] == "scratch"  # a tighter margin: no longer equivalent


def test_no_validation_data_means_no_champion_and_says_why():
    selection = choose({"a": row([None, None]), "b": row([None])})
    assert selection["champion"] is None and "validation is 0" in selection["reason"]
    assert "gates" in choose({"a": row([0.9], train_gates=False)})["reason"]
