"""The real Fashion-MNIST, when this machine has it (Debian's dataset-fashion-mnist): hashes, counts, claims."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import config, tensors
from pipeline.datasets import BUILT_IN
from pipeline.stages import download, prepare, train
from tests.conftest import REAL_FASHION_MNIST, REPO

pytestmark = pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    spec = BUILT_IN["fashion_mnist"]
    local_only = dataclasses.replace(spec, sources=(str(REAL_FASHION_MNIST),))
    out = tmp_path_factory.mktemp("real") / "raw"
    return out, download.run(local_only, out, timeout_s=5)


def test_pinned_hashes_match_the_real_files(raw):
    _, records = raw
    assert {kind: record["sha256"] for kind, record in records.items()} == BUILT_IN["fashion_mnist"].sha256
    assert all(record["source"].startswith(str(REAL_FASHION_MNIST)) for record in records.values())


def test_real_splits_have_the_published_shape(raw, tmp_path):
    out, _ = raw
    stats = prepare.run(out, tmp_path / "prepared", normalize=True)
    assert (stats["train_count"], stats["test_count"], stats["classes"]) == (60000, 10000, 10)
    assert stats["train_class_counts"] == [6000] * 10
    assert round(stats["mean"], 4) == 0.2860 and round(stats["std"], 4) == 0.3530
    images, labels = tensors.load_split(tmp_path / "prepared/test.pt")
    assert images.shape == (10000, 784) and labels.bincount().tolist() == [1000] * 10


@pytest.fixture(scope="module")
def real_data(raw, tmp_path_factory):
    """The pipeline's split: 5,000 validation images held out of train (what train reports on)."""
    out = tmp_path_factory.mktemp("real_prepared")
    prepare.run(raw[0], out, normalize=True, validation=5000, seed=0)
    return [tensors.load_split(out / f"{split}.pt") for split in ("train", "validation")]


@pytest.mark.slow
def test_d2l_settings_reach_about_085_and_unit_init_fails_the_loss_gate(real_data):
    params = config.load(REPO / "params.yaml")
    d2l = train.run(dataclasses.replace(params.variant("d2l"), device="cpu", seeds=(0,)), *real_data)[0].history[-1]
    unit = train.run(dataclasses.replace(params.variant("unit_init"), device="cpu", seeds=(0,)), *real_data)[0]
    unit = unit.history[-1]
    assert d2l["validation_accuracy"] > 0.84 and d2l["train_loss"] < 0.5
    assert unit["train_loss"] > params.evaluate.max_train_loss  # d2l's train_ch3 would assert here
    assert unit["validation_accuracy"] < d2l["validation_accuracy"] - 0.03


@pytest.mark.slow
def test_lr_1e3_diverges_on_real_data_and_is_recorded(real_data):
    params = dataclasses.replace(config.load(REPO / "params.yaml").variant("d2l"), lr=1e3, epochs=2, device="cpu")
    (result,) = train.run(dataclasses.replace(params, seeds=(0,)), *real_data)
    assert result.diverged is not None and result.diverged["epoch"] == 1
    assert not torch.isfinite(torch.tensor(float(result.diverged["loss"])))
