"""The one trainer: M >= 1 MLPs of one shape trained together as one computation, through autograd.

A variant's seeds (or a study's init points) differ only in their numbers, so their weights stack into
[M, fan_in, fan_out] tensors and every layer is one `baddbmm` over all M models: one dispatch instead of M.
The loss is the sum over models of each model's mean loss, so autograd gives each model exactly its own
gradient, and the optimizer (torch.optim, element-wise) updates each model as it would alone: a model that
diverges cannot disturb the others. Each model draws its own order from its own generator.

Precision is a param, never the hardware's choice: fp32, or bf16 through torch.autocast (the matrix
multiplies in bf16, the fp32 weights, update and loss kept), which gives bf16 numerics on any CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import model as mlp
from pipeline.errors import PipelineError

PRECISIONS = ("fp32", "bf16")
ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "leaky_relu": F.leaky_relu}
OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


@dataclass
class Stack:
    """M models' parameters: per layer weights [M, fan_in, fan_out] and biases [M, fan_out], fp32 leaves."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str = "relu"

    @property
    def models(self) -> int:
        return len(self.weights[0])

    def parameters(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases]


def model_layers(model: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """An MLP's layers as (weight [in, out], bias), views of its parameters, and its activation, in either form."""
    if isinstance(model, mlp.ScratchMLP):
        names = {function: name for name, function in mlp.SCRATCH_ACTIVATIONS.items()}
        layers = [(getattr(model, f"W{layer}"), getattr(model, f"b{layer}")) for layer in range(1, model.layers + 1)]
        return [(weight.detach(), bias.detach()) for weight, bias in layers], names[model.activation]
    modules = list(model) if isinstance(model, nn.Sequential) else []
    linears = [module for module in modules if isinstance(module, nn.Linear)]
    names = {kind: name for name, kind in mlp.MODULE_ACTIVATIONS.items()}
    activations = {names.get(type(module)) for module in modules[2::2]}
    if not linears or modules[1::2] != linears or None in activations or len(activations) > 1:
        raise PipelineError(
            f"batched training: got a {type(model).__name__} that is not an MLP of pipeline.model; "
            "expected pipeline.model.module_mlp or ScratchMLP"
        )
    return [(linear.weight.detach().t(), linear.bias.detach()) for linear in linears], activations.pop() or "relu"


def stack(models: Sequence[nn.Module], device: torch.device) -> Stack:
    """The models' parameters stacked on `device`, as fp32 copies; all models must have one shape and activation."""
    per_model = [model_layers(model) for model in models]
    shapes = {(tuple(tuple(weight.shape) for weight, _ in layers), activation) for layers, activation in per_model}
    if len(shapes) != 1:
        raise PipelineError(f"batched training: got models of shapes {sorted(shapes)}, expected one shape")
    columns = list(zip(*(layers for layers, _ in per_model)))  # per layer, every model's (weight, bias)
    return Stack(
        weights=[torch.stack([w for w, _ in column]).to(device, torch.float32) for column in columns],
        biases=[torch.stack([b for _, b in column]).to(device, torch.float32) for column in columns],
        activation=per_model[0][1],
    )


@torch.no_grad()
def unstack(trained: Stack, models: Sequence[nn.Module]) -> None:
    """Write the stack's weights back into the models (the inverse of `stack`), in their own dtype and device."""
    for index, model in enumerate(models):
        layers, _ = model_layers(model)
        for (weight, bias), trained_weight, trained_bias in zip(layers, trained.weights, trained.biases):
            weight.copy_(trained_weight[index])  # weight is a view: nn.Linear's transposed storage gets W.T
            bias.copy_(trained_bias[index])


def forward(models: Stack, inputs: torch.Tensor) -> torch.Tensor:
    """Logits [M, n, classes] of every model, from inputs [M, n, features] (each model its own batch)."""
    activation = ACTIVATIONS[models.activation]
    hidden = inputs
    for layer, (weight, bias) in enumerate(zip(models.weights, models.biases)):
        hidden = torch.baddbmm(bias.unsqueeze(1), hidden if layer == 0 else activation(hidden), weight)
    return hidden


def example_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str = "cross_entropy") -> torch.Tensor:
    """Per model and example [M, n], in fp32: cross-entropy, or MSE / L1 between softmax and one-hot targets."""
    logits = logits.float()
    if loss == "cross_entropy":
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # classes on dim 1
    distances = {"mse": F.mse_loss, "l1": F.l1_loss}
    targets = F.one_hot(labels, logits.shape[-1]).float()
    return distances[loss](logits.softmax(-1), targets, reduction="none").sum(-1)


def optimizer(name: str, models: Stack, lr: float, **options: float) -> torch.optim.Optimizer:
    """torch.optim over the stacked parameters: every update is element-wise, so each model steps as it would alone."""
    for parameter in models.parameters():
        parameter.requires_grad_(True)
    return OPTIMIZERS[name](models.parameters(), lr=lr, **options)


@contextmanager
def precision_of(precision: str, device: torch.device) -> Iterator[None]:
    """The matrix multiplies' precision: fp32 as written, or bf16 by torch.autocast on the device."""
    if precision not in PRECISIONS:
        raise PipelineError(f"train.precision: got {precision!r}, expected one of {', '.join(PRECISIONS)}")
    with torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext():
        yield


def train_epoch(
    models: Stack,
    step: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generators: list[torch.Generator],
    loss: str = "cross_entropy",
    precision: str = "fp32",
    logit_scale: float = 1.0,
    after_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of every model in its own random order: per-step summed losses [M, steps] and correct counts [M].

    `logit_scale` s makes the classifier's logits s * f (the losses reported are those of s * f) and takes the
    gradient of loss(s * f) / s: by ReLU's homogeneity that is SGD on the network scaled by sqrt(s) (with b2 at
    lr / s), a temperature study. `after_step(index)` runs after each optimizer step, for diagnostics."""
    if len(generators) != models.models:
        raise PipelineError(f"batched.train_epoch: got {len(generators)} generators, expected {models.models}")
    orders = torch.stack([torch.randperm(len(labels), device=images.device, generator=g) for g in generators])
    shuffled_labels = labels[orders]  # [M, N], gathered once per epoch
    inputs = images.to(torch.bfloat16) if precision == "bf16" else images  # cast once, not in every step
    step_losses, predictions = [], []
    for batch, label in zip(orders.split(batch_size, 1), shuffled_labels.split(batch_size, 1)):
        with precision_of(precision, images.device):
            logits = forward(models, inputs.index_select(0, batch.reshape(-1)).view(*batch.shape, -1))
        if logit_scale != 1.0:
            logits = logits * logit_scale
        losses = example_losses(logits, label, loss)
        step.zero_grad(set_to_none=True)
        (losses.mean(1).sum() / logit_scale).backward()  # each model's gradient is that of its own mean loss
        step.step()
        if after_step is not None:
            after_step(len(step_losses))
        step_losses.append(losses.detach().sum(1))
        predictions.append(logits.detach().argmax(2))
    return torch.stack(step_losses, 1), (torch.cat(predictions, 1) == shuffled_labels).sum(1)


@dataclass
class Evaluation:
    """Per model: mean loss [M] (fp32), accuracy [M] (exact counts over N, float64), predictions [M, N]; on the CPU."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    predictions: torch.Tensor


@torch.inference_mode()
def evaluate(
    models: Stack,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss: str = "cross_entropy",
    batch_size: int = 10000,
    logit_scale: float = 1.0,
) -> Evaluation:
    """Every model on a split, in fp32, one model at a time (M models' activations at once would be M times the
    memory); NaN loss and accuracy for an empty split. `logit_scale`: the classifier's logits are that times f."""
    total = images.new_zeros(models.models, dtype=torch.float32)
    predictions = torch.empty(models.models, len(labels), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size].float(), labels[start : start + batch_size]
        for index in range(models.models):
            one = Stack([w[index : index + 1] for w in models.weights], [b[index : index + 1] for b in models.biases])
            one.activation = models.activation
            logits = forward(one, x.unsqueeze(0)) * logit_scale
            total[index] += example_losses(logits, y.unsqueeze(0), loss).sum()
            predictions[index, start : start + len(y)] = logits[0].argmax(1)
    correct = (predictions == labels).sum(1)
    # On the CPU in float64 (MPS has none): an accuracy of 0.8836, not float32's 0.8835999965667725.
    return Evaluation((total / len(labels)).cpu(), correct.cpu().double() / len(labels), predictions.cpu())
