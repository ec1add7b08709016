"""Checked loads: a prepared split or a saved model that is not what we wrote is one line naming the file."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from pipeline import model as mlp
from pipeline import tensors
from pipeline.errors import PipelineError

ARCHITECTURE = {"impl": "scratch", "hidden": [16], "activation": "relu"}


class WritesMarker:
    """An object whose unpickling would run code: it would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def split(images: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"images": images, "labels": labels}


SPLIT_FAULTS = {
    "raw pickle": (
        lambda path, marker: path.write_bytes(pickle.dumps(split(WritesMarker(marker), 1))),
        "refusing to load",
    ),
    "torch.save of an object": (
        lambda path, marker: torch.save(split(WritesMarker(marker), 1), path),
        "refusing to load",
    ),
    "random bytes": (lambda path, marker: path.write_bytes(os.urandom(4096)), 'expected {"images"'),
    "empty file": (lambda path, marker: path.write_bytes(b""), "empty"),
    "missing file": (lambda path, marker: None, "no such file"),
    "wrong keys": (
        lambda path, marker: torch.save({"x": torch.zeros(2, 784)}, path),
        "got ['x'], expected a mapping with keys ['images', 'labels']",
    ),
    "images 28x28": (
        lambda path, marker: torch.save(split(torch.zeros(3, 28, 28), torch.zeros(3, dtype=torch.int64)), path),
        "expected a 2-d torch.float32 tensor",
    ),
    "images float64": (
        lambda path, marker: torch.save(
            split(torch.zeros(3, 784, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)), path
        ),
        "images is torch.float64",
    ),
    "100 features": (
        lambda path, marker: torch.save(split(torch.zeros(3, 100), torch.zeros(3, dtype=torch.int64)), path),
        "expected [N, 784] and [N]",
    ),
    "label 37": (
        lambda path, marker: torch.save(split(torch.zeros(3, 784), torch.tensor([0, 37, 1])), path),
        "labels range from 0 to 37, expected 0 to 9",
    ),
}


def one_line_error(load, path: Path, named: Path | None = None) -> str:
    """The message of the PipelineError that load(path) raises: one line, naming `named` (default: path)."""
    with pytest.raises(PipelineError) as raised:
        load(path)
    message = str(raised.value)
    assert "\n" not in message and str(named or path) in message
    return message


@pytest.mark.parametrize("fault", SPLIT_FAULTS)
def test_a_bad_split_is_one_line_naming_the_file_and_what_was_expected(tmp_path, fault):
    write, expected = SPLIT_FAULTS[fault]
    path, marker = tmp_path / "train.pt", tmp_path / "pwned"
    write(path, marker)
    message = one_line_error(tensors.load_split, path)
    assert expected in message and "expected" in message
    assert not marker.exists()  # nothing in the file ran


def test_a_good_split_loads(tmp_path):
    images, labels = torch.rand(5, 784), torch.arange(5)
    tensors.save_split(tmp_path / "train.pt", images, labels)
    loaded = tensors.load_split(tmp_path / "train.pt")
    assert torch.equal(loaded[0], images) and torch.equal(loaded[1], labels)


def saved_weights(hidden: tuple[int, ...]) -> dict:
    return mlp.build("scratch", hidden, "relu", 0.1).state_dict()


MODEL_FAULTS = {
    "weights of another width": (
        lambda path, marker: torch.save(saved_weights((8,)), path),
        "size mismatch for W1: copying a param with shape torch.Size([784, 8])",
    ),
    "missing weights": (lambda path, marker: torch.save({"W1": torch.zeros(784, 16)}, path), "Missing key(s)"),
    "a pickle": (lambda path, marker: torch.save({"W1": WritesMarker(marker)}, path), "refusing to load"),
    "random bytes": (lambda path, marker: path.write_bytes(os.urandom(4096)), "expected a state dict"),
    "empty file": (lambda path, marker: path.write_bytes(b""), "empty"),
    "missing file": (lambda path, marker: None, "no such file"),
}


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_bad_model_file_is_one_line_naming_it(tmp_path, fault):
    write, expected = MODEL_FAULTS[fault]
    path, marker = tmp_path / "seed-0.pt", tmp_path / "pwned"
    (tmp_path / "seed-0.json").write_text(json.dumps(ARCHITECTURE))
    write(path, marker)
    assert expected in one_line_error(mlp.load, path)
    assert not marker.exists()


@pytest.mark.parametrize("architecture", [{"impl": "scratch"}, [16], {**ARCHITECTURE, "activation": "gelu"}])
def test_a_bad_architecture_file_is_one_line_naming_it(tmp_path, architecture):
    torch.save(saved_weights((16,)), tmp_path / "seed-0.pt")
    (tmp_path / "seed-0.json").write_text(json.dumps(architecture))
    message = one_line_error(mlp.load, tmp_path / "seed-0.pt", named=tmp_path / "seed-0.json")
    assert "expected the keys impl, hidden and activation" in message


def test_a_missing_architecture_file_is_one_line_naming_it(tmp_path):
    torch.save(saved_weights((16,)), tmp_path / "seed-0.pt")
    assert "cannot read" in one_line_error(mlp.load, tmp_path / "seed-0.pt", named=tmp_path / "seed-0.json")
