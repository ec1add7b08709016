"""d2l's multilayer perceptron in its two forms: from scratch (W1, b1, W2, b2) and as nn.Sequential."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json, write_torch

INPUTS, OUTPUTS = 784, 10


def relu(x: torch.Tensor) -> torch.Tensor:
    """d2l's hand-written ReLU, max(x, 0); a 0-d zero broadcasts, so no zeros_like(x) is allocated and filled."""
    return torch.max(x, x.new_zeros(()))


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x))


def tanh(x: torch.Tensor) -> torch.Tensor:
    return 2 * sigmoid(2 * x) - 1


def leaky_relu(x: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    return torch.where(x > 0, x, slope * x)


SCRATCH_ACTIVATIONS = {"relu": relu, "sigmoid": sigmoid, "tanh": tanh, "leaky_relu": leaky_relu}
MODULE_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class ScratchMLP(nn.Module):
    """As d2l writes it: parameters W1, b1, W2, b2 (more for deeper nets) and X @ W + b."""

    def __init__(self, hidden: tuple[int, ...], activation: str) -> None:
        super().__init__()
        sizes = (INPUTS, *hidden, OUTPUTS)
        for layer, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            setattr(self, f"W{layer}", nn.Parameter(torch.empty(fan_in, fan_out)))
            setattr(self, f"b{layer}", nn.Parameter(torch.zeros(fan_out)))
        self.layers = len(sizes) - 1
        self.activation = SCRATCH_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, INPUTS)
        for layer in range(1, self.layers + 1):
            x = torch.addmm(getattr(self, f"b{layer}"), x, getattr(self, f"W{layer}"))
            if layer < self.layers:
                x = self.activation(x)
        return x


def module_mlp(hidden: tuple[int, ...], activation: str) -> nn.Sequential:
    """The concise form: Flatten, then Linear and activation layers."""
    sizes = (INPUTS, *hidden, OUTPUTS)
    # (Leaky) ReLU may overwrite the Linear output: autograd keeps only its result, so each step
    # allocates and writes one activation-sized tensor less.
    options = {"inplace": True} if activation in ("relu", "leaky_relu") else {}
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), MODULE_ACTIVATIONS[activation](**options)]
    return nn.Sequential(*layers[:-1])


InitStd = float | tuple[float, ...] | None  # one std for every layer, one per layer, or None: PyTorch's default


def build(
    impl: str, hidden: tuple[int, ...], activation: str, init_std: InitStd, generator: torch.Generator | None = None
) -> nn.Module:
    """The MLP with weights ~ N(0, init_std^2) and zero biases (or PyTorch's nn.Linear default), drawn from
    `generator` in d2l's [fan_in, fan_out] layout: both forms start from the same numbers for the same seed."""
    model = ScratchMLP(hidden, activation) if impl == "scratch" else module_mlp(hidden, activation)
    with torch.no_grad():
        for layer, (weight, bias) in enumerate(initial_layers(hidden, init_std, generator)):
            set_layer(model, layer, weight, bias)
    return model


def initial_layers(hidden: tuple[int, ...], init_std: InitStd, generator: torch.Generator | None) -> list:
    """Each layer's (W as [fan_in, fan_out], b), drawn in layer order from one generator."""
    sizes = (INPUTS, *hidden, OUTPUTS)
    stds = init_std if isinstance(init_std, tuple) else (init_std,) * (len(sizes) - 1)
    if len(stds) != len(sizes) - 1:
        raise PipelineError(f"init_std: got {len(stds)} values, expected one per layer ({len(sizes) - 1})")
    layers = []
    for (fan_in, fan_out), std in zip(zip(sizes, sizes[1:]), stds):
        if (
            std is None
        ):  # nn.Linear's reset_parameters: kaiming_uniform_(a=sqrt(5)) and its bias, both U(+-1/sqrt(fan_in))
            bound = fan_in**-0.5
            weight = torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=generator)
            bias = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        else:
            weight, bias = torch.empty(fan_in, fan_out).normal_(0.0, std, generator=generator), torch.zeros(fan_out)
        layers.append((weight, bias))
    return layers


def set_layer(model: nn.Module, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Set one layer from W as [fan_in, fan_out]: as it is for the scratch form, transposed for nn.Linear."""
    if isinstance(model, ScratchMLP):
        getattr(model, f"W{layer + 1}").copy_(weight)
        getattr(model, f"b{layer + 1}").copy_(bias)
    else:
        linear = [module for module in model if isinstance(module, nn.Linear)][layer]
        linear.weight.copy_(weight.T)
        linear.bias.copy_(bias)


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy weights between the two forms (nn.Linear stores W transposed)."""
    transpose = isinstance(source, ScratchMLP) != isinstance(target, ScratchMLP)
    with torch.no_grad():
        for source_param, target_param in zip(source.parameters(), target.parameters()):
            target_param.copy_(source_param.T if transpose and source_param.dim() == 2 else source_param)


def save(model: nn.Module, path: Path, architecture: dict) -> None:
    """The state dict (loads with weights_only=True) and, beside it, the architecture as JSON."""
    write_torch(path, {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()})
    write_json(path.with_suffix(".json"), architecture)


def load(path: Path) -> nn.Module:
    """Rebuild a saved model; never unpickles anything but tensors."""
    from pipeline.tensors import load_tensors

    architecture = read_json(path.with_suffix(".json"))
    if isinstance(architecture, dict) and architecture.get("diverged"):
        raise PipelineError(f"{path}: the training diverged, so no model was saved")
    model = _empty_model(path.with_suffix(".json"), architecture)
    state = load_tensors(path, "a state dict of tensors saved by pipeline.model.save")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as error:
        raise PipelineError(f"{path}: weights do not fit {architecture}: {_mismatch(error)}") from None
    return model


def _empty_model(path: Path, architecture: object) -> nn.Module:
    """The model an architecture JSON describes, to load weights into."""
    try:
        return build(architecture["impl"], tuple(architecture["hidden"]), architecture["activation"], 1.0)
    except (KeyError, TypeError, ValueError):
        raise PipelineError(
            f"{path}: got {architecture!r:.200}, expected the keys impl, hidden and activation "
            f"(one of {', '.join(SCRATCH_ACTIVATIONS)})"
        ) from None


def _mismatch(error: BaseException) -> str:
    # load_state_dict says "Error(s) in loading state_dict for X:" first and the mismatches on the lines below.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[1:] or lines)[:300]
