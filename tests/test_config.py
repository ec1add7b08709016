"""params.yaml checking: every bad key or value is named before any work starts."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from pipeline import config
from tests.conftest import REPO, tool_env


def write_params(tmp_path: Path, change) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repo_params_load_with_the_d2l_defaults():
    params = config.load(REPO / "params.yaml")
    d2l = params.variant("d2l")
    assert (d2l.hidden, d2l.activation, d2l.lr, d2l.batch_size, d2l.epochs, d2l.init_std) == (
        (256,),
        "relu",
        0.1,
        256,
        10,
        0.01,
    )
    assert params.variant("unit_init").init_std == 1.0
    assert params.variant("unit_init_30").epochs == 30
    assert params.variant("d2l_scratch").impl == "scratch"
    assert len(d2l.seeds) >= 5 and params.data.min_kbytes_per_s == 50  # issue 22: at least 5 seeds a variant
    assert all(len(variant.seeds) >= 5 for variant in params.variants.values())
    assert (params.prepare.validation, params.prepare.seed) == (5000, 0)


def test_params_are_frozen_and_a_replace_is_checked_again():
    train = config.load(REPO / "params.yaml").train
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.lr = 1.0
    assert dataclasses.replace(train, lr=0.5, seeds=[7]).seeds == (7,)
    assert dataclasses.asdict(train)["hidden"] == (256,)
    with pytest.raises(pydantic.ValidationError):
        dataclasses.replace(train, lr=-1.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["train"].update(learning_rat=0.1), "train.learning_rat: unknown key"),
        (lambda p: p["train"].pop("epochs"), "train.epochs: missing key"),
        (lambda p: p["train"].update(epochs="ten"), "train.epochs: got 'ten', expected an integer"),
        (lambda p: p["train"].update(epochs=2.5), "train.epochs: got 2.5, expected an integer"),
        (lambda p: p["train"].update(lr=0), "train.lr: got 0, expected a number > 0"),
        (lambda p: p["train"].update(batch_size=0), "train.batch_size: got 0, expected an integer >= 1"),
        (lambda p: p["train"].update(init_std=-1), "train.init_std: got -1, expected a number > 0"),
        (lambda p: p["train"].update(activation="gelu"), "train.activation: got 'gelu', expected one of"),
        (lambda p: p["train"].update(optimizer="lbfgs"), "train.optimizer: got 'lbfgs', expected one of"),
        (lambda p: p["train"].update(hidden=[256, "x"]), "train.hidden[1]: got 'x', expected an integer"),
        (lambda p: p["train"].update(hidden=[0]), "train.hidden[0]: got 0, expected an integer >= 1"),
        (lambda p: p["prepare"].update(normalize="yes"), "prepare.normalize: got 'yes', expected true or false"),
        (lambda p: p["variants"]["d2l"].update(learning_rat=1), "variants.d2l.learning_rat: unknown key"),
        (lambda p: p["variants"]["d2l"].update(epochs=0), "variants.d2l.epochs: got 0, expected an integer >= 1"),
        (lambda p: p["evaluate"].update(min_test_accuracy=1.5), "evaluate.min_test_accuracy: got 1.5"),
        (lambda p: p["data"].update(dataset="cifar10"), "data.dataset: got 'cifar10', expected one of"),
        (lambda p: p["data"].update(sha256={"train_images": "00"}), "data.sha256: fashion_mnist has hashes pinned"),
        (lambda p: p.update(extra={}), "extra: unknown key"),
    ],
)
def test_bad_params_name_the_key(tmp_path, change, message):
    with pytest.raises(config.ParamsError) as error:
        config.load(write_params(tmp_path, change))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


TINY_SHA256 = {kind: "0" * 64 for kind in ("train_images", "train_labels", "test_images", "test_labels")}


def custom_dataset(params: dict, **data) -> None:
    params["data"].update(dataset="tiny", sources=["/nowhere"], sha256=TINY_SHA256, **data)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["data"].update(timeout_s=math.inf), "data.timeout_s: got inf, expected a finite number"),
        (lambda p: p["train"].update(lr=math.nan), "train.lr: got nan, expected a finite number"),
        (
            lambda p: p["evaluate"].update(max_train_loss=-math.inf),
            "evaluate.max_train_loss: got -inf, expected a finite",
        ),
        (
            lambda p: p["train"].update(lr=10**400),
            "train.lr: got 100000000000000000...0000000000000000000, expected a finite",
        ),
        (lambda p: p["variants"].update({7: {}}), "variants.7: got 7, expected a name of letters, digits, '_' or '-'"),
        (lambda p: p["train"].update(epochs=2**63), f"train.epochs: got {2**63}, expected an integer < 2**63 (int64)"),
        (lambda p: p["train"].update(seeds=[1e23]), "train.seeds[0]: got 1e+23, expected an integer >= 0 and < 2**63"),
        (lambda p: p["train"].update(seeds=[0, 2**63]), f"train.seeds[1]: got {2**63}, expected an integer < 2**63"),
        (lambda p: p["train"].update(seeds=[-1]), "train.seeds[0]: got -1, expected an integer >= 0 and < 2**63"),
        (lambda p: p["train"].update(seeds=[]), "train.seeds: got [], expected a non-empty list of distinct integers"),
        (
            lambda p: p["train"].update(seeds=[0, 1, 0]),
            "train.seeds: got [0, 1, 0], expected a non-empty list of distinct",
        ),
        (lambda p: p["train"].update(seeds=0), "train.seeds: got 0, expected a non-empty list of distinct integers"),
        (
            lambda p: p["variants"]["d2l"].update(seeds=[3, 3]),
            "variants.d2l.seeds: got [3, 3], expected a non-empty list",
        ),
        (lambda p: p["train"].update(seed=0), "train.seed: unknown key, expected one of ['impl', 'hidden', "),
        (lambda p: p["prepare"].update(validation=-1), "prepare.validation: got -1, expected an integer >= 0"),
        (
            lambda p: p["prepare"].update(validation=60000),
            "prepare.validation: got 60000, expected fewer than the 60000 train images of fashion_mnist",
        ),
        (
            lambda p: p["prepare"].update(validation=5),
            "prepare.validation: got 5, expected 0 or at least 10 (one image per",
        ),
        (
            lambda p: (custom_dataset(p, counts={"train": 600, "test": 200}), p["prepare"].update(validation=600)),
            "prepare.validation: got 600, expected fewer than the 600 train images of tiny",
        ),
        (lambda p: p["prepare"].pop("seed"), "prepare.seed: missing key"),
        (lambda p: p["prepare"].update(seed=1.5), "prepare.seed: got 1.5, expected an integer >= 0 and < 2**63"),
        (lambda p: p["data"].update(min_kbytes_per_s=0), "data.min_kbytes_per_s: got 0, expected a number > 0"),
        (
            lambda p: p["data"].update(counts={"train": 9, "test": 9}),
            "data.counts: fashion_mnist has counts pinned in code",
        ),
        (lambda p: custom_dataset(p, counts={"train": 600}), "data.counts.test: missing key"),
    ],
)
def test_new_checks_name_the_key(tmp_path, change, message):
    with pytest.raises(config.ParamsError) as error:
        config.load(write_params(tmp_path, change))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_custom_dataset_without_counts_leaves_the_validation_size_to_prepare(tmp_path):
    params = config.load(write_params(tmp_path, lambda p: (custom_dataset(p), p["prepare"].update(validation=70000))))
    assert params.prepare.validation == 70000 and params.data.spec().counts is None
    params = config.load(
        write_params(
            tmp_path,
            lambda p: (custom_dataset(p, counts={"train": 600, "test": 200}), p["prepare"].update(validation=100)),
        )
    )
    assert params.data.spec().counts == {"train": 600, "test": 200}


@pytest.mark.parametrize("name", ["two words", "a@b", "a/b", "a:b", "a.b", "-x", "_x", "caf\u00e9", ""])
def test_variant_names_that_dvc_or_a_shell_cannot_carry_are_rejected(tmp_path, name):
    with pytest.raises(config.ParamsError) as error:
        config.load(write_params(tmp_path, lambda p: p["variants"].update({name: {}})))
    assert str(error.value) == (
        f"variants.{name}: got {name!r}, expected a name of letters, digits, '_' or '-' "
        "that starts with a letter or digit"
    )


@pytest.mark.parametrize(
    "line, added, path",
    [
        ("  lr: 0.1", ["  lr: 0.5"], "train.lr"),
        ("    init_std: 0.01", ["  d2l:", "    lr: 0.2"], "variants.d2l"),
        ("    init_std: 0.01", ["    init_std: 0.02"], "variants.d2l.init_std"),
    ],
)
def test_a_key_given_twice_is_rejected_with_its_path_and_lines(tmp_path, line, added, path):
    lines = (REPO / "params.yaml").read_text().splitlines()
    at = lines.index(line) + 1
    lines[at:at] = added
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    key, indent = path.rsplit(".", 1)[-1], added[0][: len(added[0]) - len(added[0].lstrip())]
    first, second = [number for number, text in enumerate(lines, 1) if text.startswith(f"{indent}{key}:")][:2]
    with pytest.raises(
        config.ParamsError,
        match=rf"^{path}: got a second '{key}' at line {second} "
        rf"\(the first is at line {first}\), expected each key once$",
    ):
        config.load(tmp_path / "params.yaml")


def test_aliases_and_yaml_exponents_still_load(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  lr: 0.1\n", "  lr: &rate 1e-1\n", 1)
    text = text.replace("  unit_init:\n", "  fast:\n    lr: *rate\n  unit_init:\n")
    (tmp_path / "params.yaml").write_text(text)
    params = config.load(tmp_path / "params.yaml")
    assert params.train.lr == params.variant("fast").lr == 0.1


WIDE = [10_000_000]


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda p: p["variants"]["d2l"].update(hidden=WIDE), "variants.d2l.hidden: got [10000000]"),
        (lambda p: p["train"].update(hidden=WIDE), "train.hidden: got [10000000]"),
        (lambda p: p["variants"]["d2l"].update(batch_size=10**9), "variants.d2l.batch_size: got 1000000000"),
    ],
)
def test_a_model_too_large_for_memory_is_rejected_from_its_sizes(tmp_path, monkeypatch, change, key):
    monkeypatch.setattr(config, "physical_memory_bytes", lambda: 16 * 10**9)
    with pytest.raises(config.ParamsError) as error:
        config.load(write_params(tmp_path, change))
    assert str(error.value).startswith(f"{key}, expected a model that fits in memory: training needs about ")
    assert str(error.value).endswith(
        " GB (parameters, gradients, optimizer state, one batch), this machine has 16.0 GB"
    )


def test_training_bytes_counts_parameters_gradients_optimizer_state_and_one_batch():
    train = config.load(REPO / "params.yaml").train  # 784-256-10, SGD, batch 256
    parameters = 784 * 256 + 256 + 256 * 10 + 10
    assert config.training_bytes(train, 784, 10) == (4 * 2 * parameters, 4 * 256 * (784 + 2 * (256 + 10)))
    adam = dataclasses.replace(train, optimizer="adam")
    assert config.training_bytes(adam, 784, 10)[0] == 4 * 4 * parameters


def test_load_section_checks_one_section_with_its_own_model(tmp_path):
    assert config.load_section(REPO / "params.yaml", "train", config.TrainParams).epochs == 10
    path = write_params(tmp_path, lambda p: p["train"].update(lr=0))
    with pytest.raises(config.ParamsError, match=r"^train\.lr: got 0, expected a number > 0$"):
        config.load_section(path, "train", config.TrainParams)
    with pytest.raises(config.ParamsError, match="^cifar: missing key$"):
        config.load_section(path, "cifar", config.TrainParams)


def test_float_params_accept_yaml_exponents_and_integers(tmp_path):
    params = config.load(write_params(tmp_path, lambda p: p["train"].update(lr="1e-3", init_std=1)))
    assert params.train.lr == 0.001 and params.train.init_std == 1.0


@pytest.mark.integration
def test_stage_exits_2_with_one_line_before_any_work(tmp_path):
    params = write_params(tmp_path, lambda p: p["variants"]["d2l"].update(optimizer="adamw"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.train",
            "--params",
            str(params),
            "--variant",
            "d2l",
            "--data",
            str(tmp_path / "nothing"),
            "--stats",
            str(tmp_path / "stats.json"),
            "--models",
            str(tmp_path / "models"),
            "--summary",
            str(tmp_path / "m.json"),
            "--history",
            str(tmp_path / "h.csv"),
        ],
        cwd=REPO,
        env=tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: variants.d2l.optimizer: got 'adamw', expected one of ['sgd', 'adam', 'adagrad', 'rmsprop']"
    ]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m.json").exists()


def test_a_model_no_machine_can_hold_stops_the_stage_with_one_line(tmp_path):
    params = write_params(
        tmp_path,
        lambda p: (p["data"].update(sources=[str(tmp_path / "nowhere")]), p["variants"]["d2l"].update(hidden=[10**12])),
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.download",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "raw"),
            "--record",
            str(tmp_path / "download.json"),
        ],
        cwd=REPO,
        env=tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: variants.d2l.hidden: got [1000000000000], expected a model that fits")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
