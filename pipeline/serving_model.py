"""The served MLP as MLflow loads it (models-from-code): this file is copied into the model and run on load.

Images go in as Fashion-MNIST stores them (integer pixels 0-255, N x 28 x 28 or N x 784); the train split's
mean and std come from the model's config, so a caller never normalizes. Out comes, per image, the class
index, its name and the ten probabilities. Nothing is unpickled: the weights are a state dict read with
`torch.load(weights_only=True)`. It imports only torch, numpy, pandas and mlflow, so the model loads where
this project is not installed.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

SIDE = 28
PIXELS = SIDE * SIDE
MIN_BRIGHTEST = 16
ACTIVATIONS = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu": torch.nn.functional.leaky_relu,
}


def invalid(message: str) -> MlflowException:
    """The scoring server answers INVALID_PARAMETER_VALUE with HTTP 400 and this message."""
    return MlflowException.invalid_parameter_value(message)


def check_images(images: object) -> np.ndarray:
    """Integer pixels 0-255 as (N, 28, 28) or (N, 784), returned as (N, 784); anything else is refused."""
    if not isinstance(images, np.ndarray):
        raise invalid(f"expected a numpy array of images, got {type(images).__name__}")
    if images.dtype.kind not in "ui":
        raise invalid(
            f"expected integer pixels 0-255 (uint8, as the dataset stores them), got dtype {images.dtype}; "
            "do not scale or normalize them, the model does that"
        )
    if not (images.shape[1:] == (SIDE, SIDE) or images.shape[1:] == (PIXELS,)) or len(images) == 0:
        raise invalid(
            f"expected images of shape (N, {SIDE}, {SIDE}) or (N, {PIXELS}) with N >= 1, got {tuple(images.shape)}"
        )
    flat = images.reshape(len(images), PIXELS)
    if flat.min() < 0 or flat.max() > 255:
        raise invalid(f"pixel values must be 0-255, got {flat.min()} to {flat.max()}")
    # Every Fashion-MNIST image has a pixel of 254 or 255. Scaled (0-1) or normalized (about -1 to 2) pixels
    # sent as JSON floats are cast to uint8 by MLflow before we see them, so they arrive as 0, 1 and 2.
    dim = np.flatnonzero(flat.max(axis=1) < MIN_BRIGHTEST)
    if len(dim):
        raise invalid(
            f"image {dim[0]}: its brightest pixel is {flat[dim[0]].max()} of 255, so it is blank or was "
            "scaled or normalized before sending; send raw 0-255 pixels"
        )
    return flat


def layers_from_state(state: dict[str, torch.Tensor], impl: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W, b) per layer with W as (inputs, outputs), for either form of pipeline/model.py's MLP."""
    if impl == "scratch":  # W1, b1, W2, b2, ...
        return [(state[f"W{layer}"], state[f"b{layer}"]) for layer in range(1, len(state) // 2 + 1)]
    # nn.Sequential: "1.weight", "1.bias", "3.weight", ...; nn.Linear computes addmm(b, x, weight.T) on this
    # transposed view, so taking the same view keeps its GEMM, and its results, bit for bit.
    indices = sorted(int(key.split(".")[0]) for key in state if key.endswith(".weight"))
    return [(state[f"{index}.weight"].T, state[f"{index}.bias"]) for index in indices]


class FashionClassifier(PythonModel):
    """The MLP with its input normalization inside: raw pixels in, classes and probabilities out."""

    def load_context(self, context: PythonModelContext) -> None:
        config = context.model_config
        state = torch.load(context.artifacts["weights"], weights_only=True, map_location="cpu")
        self.layers = layers_from_state(state, config["architecture"]["impl"])
        self.activation = ACTIVATIONS[config["architecture"]["activation"]]
        self.mean, self.std = float(config["mean"]), float(config["std"])
        self.class_names = list(config["class_names"])

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """The same float32 operations, in the same order, as the prepare stage and the MLP's forward."""
        x = torch.tensor(images).float().div_(255).sub_(self.mean).div_(self.std)
        for layer, (weight, bias) in enumerate(self.layers, start=1):
            x = torch.addmm(bias, x, weight)
            if layer < len(self.layers):
                x = self.activation(x)
        return x

    def predict(
        self, context: PythonModelContext | None, model_input: np.ndarray, params: dict | None = None
    ) -> pd.DataFrame:
        logits = self.logits(check_images(model_input))
        indices = logits.argmax(1).tolist()
        return pd.DataFrame(
            {
                "class_index": indices,
                "class_name": [self.class_names[i] for i in indices],
                "probabilities": torch.softmax(logits, 1).tolist(),
            }
        )


mlflow.models.set_model(FashionClassifier())
