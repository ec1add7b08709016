"""Honest selection: a stratified validation split, intervals checked against t tables, and the selection rule."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pipeline import stats
from pipeline.errors import PipelineError
from pipeline.stages import compare, prepare
from tests.conftest import idx_bytes, make_split

T_975 = {2: 4.302653, 4: 2.776445}  # Student t quantiles from a printed table (df -> t at 0.975)


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


def test_a_lead_smaller_than_the_seed_noise_is_not_beyond_it():
    noisy = stats.paired_difference({"0": 0.86, "1": 0.84, "2": 0.87}, {"0": 0.85, "1": 0.85, "2": 0.85})
    assert noisy["seeds"] == ["0", "1", "2"] and not noisy["beyond_noise"]
    differences = [0.01, -0.01, 0.02]
    half = T_975[2] * statistics.stdev(differences) / math.sqrt(3)
    assert noisy["interval"] == pytest.approx(
        [statistics.fmean(differences) - half, statistics.fmean(differences) + half]
    )
    clear = stats.paired_difference({"0": 0.86, "1": 0.87, "2": 0.865}, {"0": 0.80, "1": 0.80, "2": 0.81})
    assert clear["beyond_noise"] and clear["interval"][0] > 0


def row(validation: list[float], passed: bool = True) -> dict:
    per_seed = {str(seed): {"validation_accuracy": value} for seed, value in enumerate(validation)}
    mean = statistics.fmean(validation) if validation and validation[0] is not None else None
    return {
        "train": {"per_seed": per_seed, "aggregate": {"validation_accuracy_mean": mean}},
        "eval": {"passed": passed},
    }


def test_the_champion_has_the_best_mean_validation_accuracy_among_variants_that_pass():
    rows = {
        "best_but_fails": row([0.95, 0.95, 0.95], passed=False),
        "second": row([0.86, 0.85, 0.87]),
        "third": row([0.80, 0.81, 0.80]),
        "close": row([0.855, 0.85, 0.86]),
    }
    selection = compare.select(rows)
    assert (selection["champion"], selection["runner_up"]) == ("second", "close")
    assert selection["verdict"] == "indistinguishable"
    assert compare.select({"a": row([0.9, 0.91, 0.9]), "b": row([0.8, 0.8, 0.81])})["verdict"] == "beyond seed noise"


def test_no_validation_data_means_no_champion_and_says_why():
    selection = compare.select({"a": row([None, None]), "b": row([None])})
    assert selection["champion"] is None and "validation is 0" in selection["reason"]
    assert "gates" in compare.select({"a": row([0.9], passed=False)})["reason"]
