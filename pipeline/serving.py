"""The trained MLP as an MLflow model that takes images as they come (issue #14).

`log_model` logs pipeline/serving_model.py as a models-from-code pyfunc: the state dict is an artifact in
the format of models/<variant>/seed-<s>.pt, and the train split's mean and std, the architecture and the class
names are its config. So `mlflow.pyfunc.load_model("models:/d2l-mlp@champion")` and `mlflow models serve`
take uint8 images (N, 28, 28) and answer classes and probabilities; see docs/serving.md.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline import model as mlp
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

MODEL_CODE = Path(__file__).with_name("serving_model.py")
IMAGE_SHAPE = (28, 28)
OUTPUT_COLUMNS = ("class_index", "class_name", "probabilities")


def log_model(
    model: nn.Module, architecture: dict, mean: float, std: float, class_names: tuple[str, ...], name: str = "model"
) -> ModelInfo:
    """Log `model` to the active run as a pyfunc that takes raw uint8 images and normalizes them itself."""
    import mlflow.pyfunc

    with _model_arguments(model, architecture, mean, std, class_names) as arguments:
        return mlflow.pyfunc.log_model(name=name, **arguments)


def save_model(
    model: nn.Module, architecture: dict, mean: float, std: float, class_names: tuple[str, ...], path: Path
) -> None:
    """The same model as a local directory, with no tracking store: `mlflow models serve -m <path>` serves it."""
    import mlflow.pyfunc

    with _model_arguments(model, architecture, mean, std, class_names) as arguments:
        mlflow.pyfunc.save_model(path=str(path), **arguments)


@contextmanager
def _model_arguments(
    model: nn.Module, architecture: dict, mean: float, std: float, class_names: tuple[str, ...]
) -> Iterator[dict]:
    """What MLflow is given: the code, the weights (a file that lasts as long as the block), config, signature."""
    if architecture.get("diverged"):
        raise PipelineError("refusing to log a model whose training diverged")
    if not std > 0:
        raise PipelineError(f"the pixels' std must be > 0, got {std} (with normalize off, mean 0 and std 1)")
    config = {
        "architecture": {key: architecture[key] for key in ("impl", "hidden", "activation")},
        "mean": float(mean),
        "std": float(std),
        "class_names": list(class_names),
    }
    with tempfile.TemporaryDirectory() as temp:
        weights = Path(temp) / "model.pt"
        mlp.save(model, weights, architecture)  # the state dict file DVC tracks as models/<variant>/seed-<s>.pt
        yield {
            "python_model": str(MODEL_CODE),
            "artifacts": {"weights": str(weights)},
            "model_config": config,
            "signature": signature(),
            "input_example": example_images(),
            "pip_requirements": requirements(),
        }


def signature() -> ModelSignature:
    """uint8 images in; per image its class index, class name and the probabilities of all classes out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *IMAGE_SHAPE))])
    outputs = Schema(
        [
            ColSpec(DataType.long, "class_index"),
            ColSpec(DataType.string, "class_name"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs, outputs)


def example_images() -> np.ndarray:
    """Two dataset-like images (a light block on black): what the logged input example shows."""
    images = np.zeros((2, *IMAGE_SHAPE), dtype=np.uint8)
    images[0, 4:24, 9:19] = 200  # tall and narrow, like trousers
    images[1, 8:22, 4:24] = 180  # wide, like a bag
    return images


def requirements() -> list[str]:
    """Named, so MLflow does not scan the environment for them (about a second per model)."""
    import mlflow
    import pandas

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pandas.__version__}",
    ]
