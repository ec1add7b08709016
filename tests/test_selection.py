"""Honest selection: a stratified validation split, intervals checked against t tables, and the selection rule."""

from __future__ import annotations

import math
import statistics

import numpy
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
    error = statistics.stdev(differences) / math.sqrt(3)
    mean = statistics.fmean(differences)
    # better/worse read the 95% interval (alpha 0.05, one comparison), TOST at alpha each side the 90% one.
    assert close["difference_interval"] == pytest.approx(
        [mean - T_TABLE[(2, 0.975)] * error, mean + T_TABLE[(2, 0.975)] * error]
    )
    narrow = T_TABLE[(2, 0.95)] * error
    assert close["equivalence_interval"] == pytest.approx([mean - narrow, mean + narrow])
    assert close["verdict"] == "equivalent" and close["seeds"] == ["0", "1", "2"]
    # The same differences spread over more comparisons get wider intervals: Bonferroni.
    corrected = stats.paired_comparison(
        {"0": 0.861, "1": 0.852, "2": 0.870}, {"0": 0.860, "1": 0.851, "2": 0.871}, 0.005, comparisons=6
    )
    assert (
        corrected["difference_interval"][1] - corrected["difference_interval"][0]
        > close["difference_interval"][1] - close["difference_interval"][0]
    )
    assert (corrected["difference_confidence"], corrected["equivalence_confidence"]) == pytest.approx(
        (1 - 0.05 / 6, 1 - 0.1 / 6)
    )
    noisy = stats.paired_comparison({"0": 0.86, "1": 0.84, "2": 0.87}, {"0": 0.85, "1": 0.85, "2": 0.85}, 0.005)
    assert noisy["verdict"] == "inconclusive"  # not "equivalent": failing to find a difference is no equivalence
    better = stats.paired_comparison({"0": 0.86, "1": 0.87, "2": 0.865}, {"0": 0.80, "1": 0.80, "2": 0.81}, 0.005)
    worse = stats.paired_comparison({"0": 0.80, "1": 0.80, "2": 0.81}, {"0": 0.86, "1": 0.87, "2": 0.865}, 0.005)
    assert (better["verdict"], worse["verdict"]) == ("better", "worse")
    assert stats.paired_comparison({"0": 0.9}, {"0": 0.8}, 0.005)["verdict"] == "inconclusive"  # one seed: no test


T_TABLE = {(2, 0.975): 4.302653, (2, 0.95): 2.919986}  # Student t (df, quantile), from a printed table


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
    """A variant as compare reads it; each seed gets the first accuracy x 10,000 images right, so variants with
    close accuracies differ on few images."""
    per_seed = {str(seed): {"validation_accuracy": value} for seed, value in enumerate(validation)}
    present = [value for value in validation if value is not None]
    mean = statistics.fmean(present) if present else None
    images = torch.arange(10000)
    return {
        "train": {"per_seed": per_seed, "aggregate": {"validation_accuracy_mean": mean}},
        "eval": {"train_gates_passed": train_gates, "passed": train_gates and test_gate},
        "validation_correct": {
            seed: images < round(figures["validation_accuracy"] * 10000)
            for seed, figures in per_seed.items()
            if figures["validation_accuracy"] is not None
        },
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


def saved_models(folder, seeds: list[int], diverged: list[int]) -> dict:
    """Tiny MLPs saved as train saves them, and the train.json figures evaluate reads."""
    from pipeline import model as mlp

    folder.mkdir()
    per_seed = {}
    for seed in seeds + diverged:
        per_seed[str(seed)] = {"diverged": seed in diverged, "train_loss": 0.4, "train_accuracy": 0.8}
        if seed in seeds:
            model = mlp.build("module", (8,), "relu", 0.1, torch.Generator().manual_seed(seed))
            mlp.save(model, folder / f"seed-{seed}.pt", {"impl": "module", "hidden": [8], "activation": "relu"})
    return {"seeds": seeds + diverged, "per_seed": per_seed, "model_seed": seeds[0]}


def test_evaluate_records_which_validation_images_each_seed_got_right_as_packed_bits(tmp_path):
    import json

    from pipeline import evaluation
    from pipeline import model as mlp

    trained = saved_models(tmp_path / "models", seeds=[0, 1], diverged=[2])
    generator = torch.Generator().manual_seed(5)
    test = torch.randn(30, 784, generator=generator), torch.randint(0, 10, (30,), generator=generator)
    validation = torch.randn(21, 784, generator=generator), torch.randint(0, 10, (21,), generator=generator)
    thresholds = config.EvaluateParams(max_train_loss=0.5, min_train_accuracy=0.7, min_test_accuracy=0.7)
    settings = {"loss": "cross_entropy", "thresholds": thresholds, "bootstrap": 100}
    report = evaluation.evaluate_variant("tiny", trained, tmp_path / "models", test, validation, settings)
    assert report["validation_images"] == 21 and sorted(report["validation_correct"]) == ["0", "1"]  # 2 diverged
    for seed in ("0", "1"):
        with torch.no_grad():  # the reference: the saved model itself, not the batched evaluation
            right = mlp.load(tmp_path / "models" / f"seed-{seed}.pt")(validation[0]).argmax(1) == validation[1]
        assert numpy.array_equal(stats.unpack_bits(report["validation_correct"][seed], 21), right.numpy())
    again = evaluation.evaluate_variant("tiny", trained, tmp_path / "models", test, validation, settings)
    assert json.dumps(again) == json.dumps(report)  # the same bytes: no timestamps, a fixed bootstrap seed
    empty = evaluation.evaluate_variant(
        "tiny", trained, tmp_path / "models", test, (validation[0][:0], validation[1][:0]), settings
    )
    assert (empty["validation_images"], empty["validation_correct"]) == (0, {"0": "", "1": ""})


def test_compare_reads_the_bits_back_and_says_in_one_line_what_to_rerun(tmp_path):
    right = torch.tensor([True, False, True, True, False, False, False, True, True])
    evaluated = {"validation_images": 9, "validation_correct": {"0": stats.pack_bits(right)}}
    correct = compare.validation_correctness(evaluated, tmp_path / "d2l.json", "d2l")
    assert list(correct) == ["0"] and numpy.array_equal(correct["0"], right.numpy())
    with pytest.raises(PipelineError, match=r"d2l.json: no validation_correct .* rerun: dvc repro -f -s evaluate@d2l$"):
        compare.validation_correctness({"validation_images": 9}, tmp_path / "d2l.json", "d2l")
    with pytest.raises(PipelineError, match=r"not packed bits of its validation_images \(1 bytes, expected 2"):
        compare.validation_correctness({"validation_images": 9, "validation_correct": {"0": "ff"}}, tmp_path, "d2l")


def test_every_pair_is_judged_on_the_same_image_draws_at_the_stated_levels():
    rows = {
        "a": row([0.860, 0.850, 0.870, 0.865]),
        "b": row([0.861, 0.851, 0.871, 0.866]),
        "c": row([0.80, 0.81, 0.80, 0.79]),
    }
    settings = config.CompareParams(margin=0.005, alpha=0.05, prefer="fewest_changes", bootstrap=200)
    comparisons = compare.compare_pairs(rows, settings)
    assert [(item["a"], item["b"], item["verdict"]) for item in comparisons] == [
        ("a", "b", "equivalent"),
        ("a", "c", "better"),
        ("b", "c", "better"),
    ]
    assert comparisons[0]["difference_mean"] == pytest.approx(-0.001)
    assert (comparisons[0]["difference_confidence"], comparisons[0]["equivalence_confidence"]) == pytest.approx(
        (1 - 0.05 / 3, 1 - 0.1 / 3)
    )
    assert comparisons == compare.compare_pairs(rows, settings)  # the bootstrap's seed is fixed
    result = {"comparisons": comparisons, "margin": 0.005, "alpha": 0.05, "correction": "Bonferroni over 3 comparisons"}
    lines = compare.comparison_lines({**result, "bootstrap": {"resamples": 200}})
    assert "| a | b | difference | 98.33% interval | 96.67% interval | verdict |" in lines
    assert "at a family-wise error rate of at most 0.05" in lines[0] and "200 bootstrap resamples" in lines[0]


def test_variants_evaluated_on_different_validation_splits_are_refused(tmp_path):
    rows = {"a": {"eval": {"validation_images": 5000}}, "b": {"eval": {"validation_images": 4000}}}
    with pytest.raises(PipelineError, match=r"validation_images differ between variants \({'a': 5000, 'b': 4000}\)"):
        compare._same_validation_images(rows, tmp_path)
