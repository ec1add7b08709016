"""The benchmark on small generated data: its JSON, its arithmetic, and a GEMM bound that does the epoch's GEMMs.

Nothing here asserts a speed: timings on a shared machine are the bench's business, not a test's.
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench
from pipeline import config, tensors
from pipeline.stages import prepare
from tests.conftest import REPO, VENV_BIN, run_tool

KEYS = {
    "epoch_s",
    "gemm_bound_s",
    "d2l_epoch_s",
    "ratio_vs_gemm",
    "speedup_vs_d2l",
    "device",
    "torch",
    "threads",
    "epochs",
    "measured_epochs",
    "test_accuracy",
    "d2l_test_accuracy",
    "accuracy_gap_points",
    "seconds",
    "test_accuracy_d2l_inputs",
    "device_name",
    "load_average_at_start",
    "floor_epoch_s",
    "ratio_floor",
    "accuracy_gap_points_d2l_inputs",
    "accuracy_epochs",
    "accuracy_seeds",
    "accuracy",
    "models_per_s",
    "bf16_ratio_vs_gemm",
}
TIMED = {"d2l", "ours", "gemm", "floor", "fp32_single", "fp32_batched", "bf16_batched", "bf16_gemm"}


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    return bench.write_synthetic_idx(tmp_path_factory.mktemp("raw"), {"train": 512, "test": 128}, seed=1)


def small_params(**overrides) -> config.TrainParams:
    return dataclasses.replace(config.load(REPO / "params.yaml").variant("d2l"), batch_size=64, **overrides)


def test_summary_takes_medians_after_the_warm_up_and_ratios_from_them():
    seconds = {
        "d2l": [99.0, 30.0, 40.0, 20.0],
        "ours": [9.0, 2.0, 4.0, 3.0],
        "gemm": [9.0, 1.0, 2.0, 2.0],
        "floor": [9.0, 1.0, 0.5, 0.4],
    }
    result = bench.summarize(seconds)
    assert (result["epoch_s"], result["gemm_bound_s"], result["d2l_epoch_s"]) == (3.0, 2.0, 30.0)
    assert result["floor_epoch_s"] == 0.5
    assert (result["ratio_vs_gemm"], result["speedup_vs_d2l"], result["ratio_floor"]) == (1.5, 10.0, 1.25)
    assert (result["epochs"], result["measured_epochs"]) == (4, 3)


def test_accuracy_study_trains_to_ten_epochs_and_averages_the_seeds():
    calls = {}

    def counting(name, accuracies):
        def epoch():
            calls[name] = calls.get(name, 0) + 1
            return accuracies[calls[name] - 1]

        return epoch

    runs = [
        {
            "d2l": counting("d2l0", [0.0] * 6 + [0.84]),
            "ours": counting("ours0", [0.0] * 6 + [0.85]),
            "ours_d2l_inputs": counting("pix0", [0.0] * 9 + [0.83]),
        },
        {
            "d2l": counting("d2l1", [0.0] * 9 + [0.86]),
            "ours": counting("ours1", [0.0] * 9 + [0.87]),
            "ours_d2l_inputs": counting("pix1", [0.0] * 9 + [0.86]),
        },
    ]
    trained = {"d2l": (3, 0.0), "ours": (3, 0.0)}  # the timed rounds: seed 0's d2l and ours, 3 epochs
    result = bench.accuracy_study(runs, trained, seeds=[0, 1])
    assert calls == {"d2l0": 7, "ours0": 7, "pix0": 10, "d2l1": 10, "ours1": 10, "pix1": 10}
    assert result["accuracy"] == {"d2l": [0.84, 0.86], "ours": [0.85, 0.87], "ours_d2l_inputs": [0.83, 0.86]}
    assert (result["test_accuracy"], result["d2l_test_accuracy"], result["test_accuracy_d2l_inputs"]) == (
        0.86,
        0.85,
        0.845,
    )
    assert result["accuracy_gap_points"] == pytest.approx(1.0)
    assert result["accuracy_gap_points_d2l_inputs"] == pytest.approx(-0.5)
    assert (result["accuracy_epochs"], result["accuracy_seeds"]) == (10, [0, 1])


def test_accuracy_study_trains_no_further_when_the_timed_rounds_reached_ten_epochs():
    trained_on = []
    runs = [{name: (lambda name=name: trained_on.append(name) or 0.5) for name in ("d2l", "ours", "ours_d2l_inputs")}]
    result = bench.accuracy_study(runs, {"d2l": (10, 0.84), "ours": (10, 0.86)}, seeds=[0])
    assert trained_on == ["ours_d2l_inputs"] * 10
    assert result["accuracy"] == {"d2l": [0.84], "ours": [0.86], "ours_d2l_inputs": [0.5]}
    assert result["accuracy_epochs"] == 10


def test_bench_run_reports_every_key_from_its_own_measurements(raw_dir, tmp_path):
    lines = []
    result = bench.run(small_params(), True, raw_dir, tmp_path / "absent", "cpu", 3, 2, lines.append, seeds=2, models=3)
    assert KEYS <= set(result) and len(lines) == 4 and lines[-1].startswith("accuracy after 10 epochs, seeds [0, 1]")
    assert all(len(values) == 2 and 0 <= min(values) <= max(values) <= 1 for values in result["accuracy"].values())
    assert result["test_accuracy"] == pytest.approx(statistics.fmean(result["accuracy"]["ours"]), abs=1e-4)
    json.loads(json.dumps(result))  # the JSON line round-trips
    seconds = result["seconds"]
    assert set(seconds) == TIMED
    assert all(len(values) == 3 and min(values) > 0 for values in seconds.values())
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    rates = result["models_per_s"]
    assert rates["fp32_single"] == pytest.approx(1 / medians["fp32_single"], rel=1e-4)
    assert rates["bf16_batched"] == pytest.approx(3 / medians["bf16_batched"], rel=1e-4)
    assert result["bf16_ratio_vs_gemm"] == pytest.approx(medians["bf16_batched"] / medians["bf16_gemm"], rel=1e-3)
    assert result["epoch_s"] == pytest.approx(medians["ours"], rel=1e-4)
    assert result["ratio_vs_gemm"] == pytest.approx(result["epoch_s"] / result["gemm_bound_s"], rel=1e-3)
    assert result["speedup_vs_d2l"] == pytest.approx(result["d2l_epoch_s"] / result["epoch_s"], rel=1e-3)
    assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["d2l_test_accuracy"] <= 1
    assert (result["device"], result["data"], result["threads"]) == ("cpu", str(raw_dir), torch.get_num_threads())


@pytest.mark.parametrize("impl", ["module", "scratch"])
def test_gemm_bound_does_exactly_the_matrix_multiplies_of_a_real_epoch(raw_dir, impl):
    """Counted by torch's FLOP counter: the bound's GEMMs against train_epoch + evaluate."""
    params = small_params(impl=impl)
    train_data, test_data = (prepare.read_raw_split(raw_dir, split) for split in ("train", "test"))
    epoch, net = bench.our_epoch(params, torch.device("cpu"), train_data, test_data, params.seeds[0])
    gemms = bench.gemm_epoch(net, params.batch_size, train_data[0], test_data[0])
    with FlopCounterMode(display=False) as real:
        epoch()
    with FlopCounterMode(display=False) as bound:
        gemms()
    assert bound.get_total_flops() == real.get_total_flops() > 0


def test_batched_gemm_bound_does_exactly_the_matrix_multiplies_of_a_real_bf16_epoch(raw_dir):
    """Counted by torch's FLOP counter: the bound's bmms against batched.train_epoch in bf16 for three seeds."""
    params = small_params()
    train_data = prepare.read_raw_split(raw_dir, "train")
    epoch, stacked, inputs = bench.batched_train_epoch(params, torch.device("cpu"), train_data, [0, 1, 2], "bf16")
    gemms = bench.batched_gemm_epoch(stacked, params.batch_size, inputs)
    with FlopCounterMode(display=False) as real:
        epoch()
    with FlopCounterMode(display=False) as bound:
        gemms()
    assert bound.get_total_flops() == real.get_total_flops() > 0


def test_models_per_second_counts_each_batched_model():
    seconds = {
        "fp32_single": [9, 2, 2],
        "fp32_batched": [9, 5, 5],
        "bf16_batched": [9, 2.5, 2.5],
        "bf16_gemm": [9, 2, 2],
    }
    result = bench.models_per_second(seconds, models=5)
    assert result["models_per_s"] == {"fp32_single": 0.5, "fp32_batched": 1.0, "bf16_batched": 2.0, "bf16_gemm": 2.5}
    assert (result["bf16_ratio_vs_gemm"], result["batched_models"]) == (1.25, 5)


@pytest.mark.integration
def test_command_line_quick_run_ends_with_one_json_line(raw_dir, tmp_path):
    result = run_tool(
        [
            str(VENV_BIN / "python"),
            "-m",
            "benchmarks.bench",
            "--quick",
            "--device",
            "cpu",
            "--raw",
            str(raw_dir),
            "--prepared",
            str(tmp_path / "absent"),
            "--workers",
            "0",
            "--results",
            str(tmp_path / "bench.json"),
        ],
        cwd=REPO,
        timeout=120,
    )
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert KEYS <= set(last) and last["epochs"] == bench.EPOCHS["quick"]
    kept = json.loads((tmp_path / "bench.json").read_text())
    assert kept["models_per_s"] == last["models_per_s"] and kept["command"].startswith("python -m benchmarks.bench")
    assert kept["torch"] == torch.__version__ and kept["system"]["cpu_count"] > 0 and "CPUs" in kept["machine"]
    assert "ours / GEMMs" in result.stdout


def test_missing_data_is_generated_in_the_real_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SPLIT_COUNTS", {"train": 300, "test": 100})  # the real sizes, scaled down
    raw_dir, prepared_dir, source = bench.bench_data(tmp_path / "no_raw", tmp_path / "no_prepared", tmp_path, True)
    images, labels = tensors.load_split(prepared_dir / "train.pt")
    assert source == "generated" and images.shape == (300, 784) and labels.shape == (300,)
    assert prepare.read_raw_split(raw_dir, "test")[0].shape == (100, 784)


@pytest.mark.integration
def test_no_seeds_is_a_one_line_error():
    result = run_tool(
        [str(VENV_BIN / "python"), "-m", "benchmarks.bench", "--seeds", "0"], cwd=REPO, timeout=120, check=False
    )
    assert result.returncode == 2 and result.stderr.strip() == "error: --seeds: got 0, expected 1 or more"
