"""params.yaml checking: every bad key or value is named before any work starts."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
    assert (d2l.hidden, d2l.activation, d2l.lr, d2l.batch_size, d2l.epochs, d2l.init_std) == ((256,), "relu", 0.1, 256, 10, 0.01)
    assert params.variant("unit_init").init_std == 1.0
    assert params.variant("unit_init_30").epochs == 30
    assert params.variant("d2l_scratch").impl == "scratch"


@pytest.mark.parametrize("change, message", [
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
    (lambda p: p["train"].update(hidden=[0]), "train.hidden: got [0], expected a list of integers >= 1"),
    (lambda p: p["prepare"].update(normalize="yes"), "prepare.normalize: got 'yes', expected true or false"),
    (lambda p: p["variants"]["d2l"].update(learning_rat=1), "variants.d2l.learning_rat: unknown key"),
    (lambda p: p["variants"]["d2l"].update(epochs=0), "variants.d2l.epochs: got 0, expected an integer >= 1"),
    (lambda p: p["evaluate"].update(min_test_accuracy=1.5), "evaluate.min_test_accuracy: got 1.5"),
    (lambda p: p["data"].update(dataset="cifar10"), "data.dataset: got 'cifar10', expected one of"),
    (lambda p: p["data"].update(sha256={"train_images": "00"}), "data.sha256: fashion_mnist has hashes pinned"),
    (lambda p: p.update(extra={}), "extra: unknown key"),
])
def test_bad_params_name_the_key(tmp_path, change, message):
    with pytest.raises(config.ParamsError) as error:
        config.load(write_params(tmp_path, change))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_float_params_accept_yaml_exponents_and_integers(tmp_path):
    params = config.load(write_params(tmp_path, lambda p: p["train"].update(lr="1e-3", init_std=1)))
    assert params.train.lr == 0.001 and params.train.init_std == 1.0


@pytest.mark.integration
def test_stage_exits_2_with_one_line_before_any_work(tmp_path):
    params = write_params(tmp_path, lambda p: p["variants"]["d2l"].update(optimizer="adamw"))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.train", "--params", str(params), "--variant", "d2l",
         "--data", str(tmp_path / "nothing"), "--model", str(tmp_path / "m.pt"),
         "--metrics", str(tmp_path / "m.json"), "--history", str(tmp_path / "h.csv")],
        cwd=REPO, env=tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: variants.d2l.optimizer: got 'adamw', expected one of ['sgd', 'adam', 'adagrad', 'rmsprop']"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m.json").exists()
