"""Plain SGD on a ReLU MLP under cross-entropy, with the backward pass and the update written out.

Autograd, `zero_grad` and `optimizer.step` cost ~40 small dispatches per step; at batch 256 on a 2-core CPU
that was ~0.15 s of a ~0.55 s epoch. Here a step is the five GEMMs it needs (per layer the forward X @ W and
dW; dX for all but the first layer) and ~10 small ops. Each weight is updated in place by the GEMM that
computes its gradient, W.addmm_(X.T, dZ, alpha=-lr/n), so no gradient tensor is ever made. The maths is
autograd's and torch.optim.SGD's; tests/test_train.py checks it against a plain reference loop.
Any other case (the scratch form, Adam, other activations or losses) takes the autograd loop in train.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Layer = tuple[torch.Tensor, torch.Tensor]  # (weight as [in, out], bias), detached views of the parameters
_relu_backward = torch.ops.aten.threshold_backward  # what autograd runs for ReLU: grad where output > 0, else 0


def relu_layers(model: nn.Module) -> list[Layer] | None:
    """The layers of an nn.Sequential ReLU MLP as (weight [in, out], bias); None for anything else. The scratch
    form is left to autograd on purpose: it is d2l's own code, trained through its own forward pass."""
    modules = list(model) if isinstance(model, nn.Sequential) else []
    linears = modules[1::2]
    shape = [nn.Flatten] + [nn.Linear, nn.ReLU] * (len(linears) - 1) + [nn.Linear]
    if not linears or [type(module) for module in modules] != shape:
        return None
    return [(linear.weight.detach().t(), linear.bias.detach()) for linear in linears]  # nn.Linear stores W.T


def applies(impl: str, activation: str, optimizer: str, loss: str) -> bool:
    """True for the case written out here: plain SGD on cross-entropy with the nn.Sequential ReLU MLP.
    Decided from the settings, so no torch.optim object is built for it (its constructor imports torch._dynamo)."""
    return (impl, activation, optimizer, loss) == ("module", "relu", "sgd", "cross_entropy")


def sgd_epoch(
    model: nn.Module, lr: float, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass in random order (the same order as train.train_epoch); per-step summed losses and correct count."""
    return layers_epoch(relu_layers(model), lr, images, labels, batch_size, generator)


@torch.no_grad()
def layers_epoch(
    layers: list[Layer], lr: float, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """sgd_epoch on the layers themselves ((weight [in, out], bias) views, updated in place)."""
    order = torch.randperm(len(labels), device=images.device, generator=generator)
    shuffled_labels = labels.index_select(0, order)
    targets = F.one_hot(shuffled_labels, layers[-1][0].shape[1]).to(images.dtype)
    true_log_probabilities = images.new_empty(len(labels), 1)
    predictions = torch.empty_like(shuffled_labels)
    ones = images.new_ones(batch_size)
    for batch, target, label, true_log_probability, predicted in zip(
        order.split(batch_size),
        targets.split(batch_size),
        shuffled_labels.unsqueeze(1).split(batch_size),
        true_log_probabilities.split(batch_size),
        predictions.split(batch_size),
    ):
        inputs = [images.index_select(0, batch)]  # each layer's input, kept for its weight gradient
        for weight, bias in layers[:-1]:
            inputs.append(torch.addmm(bias, inputs[-1], weight).relu_())
        logits = torch.addmm(layers[-1][1], inputs[-1], layers[-1][0])
        torch.argmax(logits, 1, out=predicted)
        log_probabilities = torch.log_softmax(logits, 1)
        torch.gather(log_probabilities, 1, label, out=true_log_probability)
        grad = log_probabilities.exp_().sub_(target)  # n * dLoss/dlogits: softmax minus one-hot
        step(layers, inputs, grad, -lr / len(batch), ones[: len(batch)])
    return -step_sums(true_log_probabilities.squeeze(1), batch_size), (predictions == shuffled_labels).sum()


def step_sums(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Sums of consecutive batch_size-long runs (the last may be shorter); deterministic on a GPU too."""
    full = len(values) // batch_size * batch_size
    sums = values[:full].view(-1, batch_size).sum(1)
    return torch.cat([sums, values[full:].sum(0, keepdim=True)]) if full < len(values) else sums


def step(layers: list[Layer], inputs: list[torch.Tensor], grad: torch.Tensor, alpha: float, ones: torch.Tensor) -> None:
    """Backpropagate `grad` (n * dLoss/dlogits) and update each layer in place: W += alpha * dW, alpha = -lr / n."""
    for layer in reversed(range(len(layers))):
        weight, bias = layers[layer]
        if layer > 0:
            grad_input = torch.mm(grad, weight.t())  # with the weight as it was in the forward pass
        weight.addmm_(inputs[layer].t(), grad, alpha=alpha)
        bias.addmv_(grad.t(), ones, alpha=alpha)
        if layer > 0:
            grad = _relu_backward(grad_input, inputs[layer], 0)
