"""Many ReLU MLPs of one shape trained as one computation: plain SGD on cross-entropy, in fp32 or bf16.

A variant's seeds (or a study's init points) differ only in their numbers, so their weights stack into
[M, fan_in, fan_out] tensors and each of fused.py's five GEMMs becomes one `bmm` over all M models: one
dispatch instead of M, and GEMMs big enough to keep both cores busy. `bmm` keeps the models apart, so a
model that diverges cannot disturb the others. Each model draws its own order from its own generator, as
fused.sgd_epoch does, so a seed's fp32 epoch here matches its one-model epoch within float tolerance.

bf16: the matrix multiplies run in bf16 (the inputs converted once, the weights cast from fp32 masters each
step); the updates go to the fp32 masters, and loss, softmax and accuracy stay fp32. On a CPU with
AVX512-BF16 or AMX-BF16 a bf16 GEMM is 3-4x an fp32 one; elsewhere bf16 runs but is slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import fused
from pipeline import model as mlp
from pipeline.errors import PipelineError

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}  # what Linux's /proc/cpuinfo calls the units bf16 GEMMs need
LOW = {"fp32": torch.float32, "bf16": torch.bfloat16}
_relu_backward = torch.ops.aten.threshold_backward
CONTIGUOUS = torch.contiguous_format


@dataclass
class Stack:
    """M models' parameters: per layer weights [M, fan_in, fan_out] and biases [M, fan_out], fp32."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]

    @property
    def models(self) -> int:
        return len(self.weights[0])


def resolve_precision(name: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """auto: bf16 where the CPU has bf16 GEMM units or the CUDA device supports bf16, else fp32."""
    if name not in PRECISIONS:
        raise PipelineError(f"train.precision: got {name!r}, expected one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type != "cpu":
        return "fp32"  # mps: no fast bf16 GEMM to count on
    if cpuinfo is None:  # Linux only; macOS and the rest have no such file, and get fp32
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    return "bf16" if CPU_BF16_FLAGS & cpu_flags(cpuinfo) else "fp32"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The words of /proc/cpuinfo's `flags` lines (x86)."""
    lines = (line.split(":", 1) for line in cpuinfo.splitlines() if line.startswith("flags"))
    return {flag for parts in lines if len(parts) == 2 for flag in parts[1].split()}


def model_layers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A ReLU MLP's layers as (weight [in, out], bias), views of its parameters, in either form."""
    if isinstance(model, mlp.ScratchMLP) and model.activation is mlp.relu:
        return [(getattr(model, f"W{layer}").detach(), getattr(model, f"b{layer}").detach())
                for layer in range(1, model.layers + 1)]  # fmt: skip
    layers = fused.relu_layers(model)
    if layers is None:
        raise PipelineError(
            f"batched training: got a {type(model).__name__} that is not a ReLU MLP; "
            "expected pipeline.model.module_mlp or ScratchMLP with activation relu"
        )
    return layers


def stack(models: Sequence[nn.Module], device: torch.device) -> Stack:
    """The models' parameters stacked on `device`, as fp32 copies; all models must have one shape."""
    per_model = [model_layers(model) for model in models]
    shapes = {tuple(tuple(weight.shape) for weight, _ in layers) for layers in per_model}
    if len(shapes) != 1:
        raise PipelineError(f"batched training: got models of shapes {sorted(shapes)}, expected one shape")
    columns = list(zip(*per_model))  # per layer, every model's (weight, bias)
    return Stack(
        weights=[torch.stack([w for w, _ in column]).to(device, torch.float32) for column in columns],
        biases=[torch.stack([b for _, b in column]).to(device, torch.float32) for column in columns],
    )


@torch.no_grad()
def unstack(trained: Stack, models: Sequence[nn.Module]) -> None:
    """Write the stack's weights back into the models (the inverse of `stack`), in their own dtype and device."""
    for index, model in enumerate(models):
        for (weight, bias), trained_weight, trained_bias in zip(model_layers(model), trained.weights, trained.biases):
            weight.copy_(trained_weight[index])  # weight is a view: nn.Linear's transposed storage gets W.T
            bias.copy_(trained_bias[index])


def as_inputs(images: torch.Tensor, precision: str) -> torch.Tensor:
    """The images in the dtype the GEMMs take; convert once and pass the result to every sgd_epoch."""
    return images.to(LOW[precision])


@torch.no_grad()
def sgd_epoch(
    models: Stack,
    lr: float,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generators: list[torch.Generator],
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of every model in its own random order; per-step summed losses [M, steps] and correct counts [M]."""
    if precision not in LOW or len(generators) != models.models:
        raise PipelineError(
            f"batched.sgd_epoch: got precision {precision!r} and {len(generators)} generators, expected fp32 or "
            f"bf16 (resolve_precision's answer) and one generator per model ({models.models})"
        )
    count, low = len(labels), LOW[precision]
    inputs_all = images if images.dtype == low else as_inputs(images, precision)  # pass as_inputs' result: saves this
    if _per_model(models.weights[0]) and low == torch.float32:
        return _one_after_another(models, lr, inputs_all, labels, batch_size, generators)
    orders = torch.stack([torch.randperm(count, device=images.device, generator=g) for g in generators])
    shuffled_labels = labels[orders]  # [M, N], as fused.sgd_epoch gathers them, once per epoch
    step = _Step(models, low, batch_size)
    true_log_probabilities, predictions = [], []
    for batch, label in zip(orders.split(batch_size, 1), shuffled_labels.split(batch_size, 1)):
        activations = step.forward(inputs_all.index_select(0, batch.reshape(-1)).view(*batch.shape, -1))
        logits = activations.pop()
        predictions.append(logits.argmax(2))
        # Classes on dim 1: the CPU's log_softmax over 10 classes is ~20x faster there than on the last dim.
        log_probabilities = torch.log_softmax(logits.transpose(1, 2).to(torch.float32, memory_format=CONTIGUOUS), 1)
        label = label.unsqueeze(1)
        true_log_probabilities.append(log_probabilities.gather(1, label))
        grad = log_probabilities.exp_().scatter_add_(1, label, step.minus_ones[:, :, : label.shape[2]])
        # grad: n * dLoss/dlogits (softmax minus one-hot), back as [M, n, classes]
        step.backward(activations, grad.transpose(1, 2), -lr / label.shape[2])
    losses = -step_sums(torch.cat(true_log_probabilities, 2).squeeze(1), batch_size)
    return losses, (torch.cat(predictions, 1) == shuffled_labels).sum(1)


def step_sums(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per row, sums of consecutive batch_size-long runs (the last may be shorter): [M, N] -> [M, steps]."""
    rows, count = values.shape
    full = count // batch_size * batch_size
    sums = values[:, :full].reshape(rows, -1, batch_size).sum(2)
    return torch.cat([sums, values[:, full:].sum(1, keepdim=True)], 1) if full < count else sums


def _per_model(tensor: torch.Tensor) -> bool:
    """fp32 on a CPU: the models train one after another (fused.layers_epoch), each one's weights staying in cache
    for its epoch. Batching buys nothing there: MKL's batched fp32 GEMM is no faster than one sgemm per model, and
    interleaving the models made batched fp32 ~10% slower than one seed at a time on a 2-core EPYC."""
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu"


def _one_after_another(
    models: Stack, lr: float, images: torch.Tensor, labels: torch.Tensor, batch_size: int, generators: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's epoch by fused.layers_epoch on views of the stack: the same orders, the same figures."""
    results = [
        fused.layers_epoch(
            [(weight[index], bias[index]) for weight, bias in zip(models.weights, models.biases)],
            lr,
            images,
            labels,
            batch_size,
            generator,
        )
        for index, generator in enumerate(generators)
    ]
    losses, correct = zip(*results)
    return torch.stack(losses), torch.stack(correct)


class _Step:
    """One SGD step's forward and backward over the stack, with the buffers it reuses from step to step."""

    def __init__(self, models: Stack, low: torch.dtype, batch_size: int) -> None:
        self.models, self.low = models, low
        first = models.weights[0]
        self.ones = first.new_ones(models.models, 1, batch_size)  # bias gradient as a GEMM: ones @ grad
        self.minus_ones = -self.ones  # for softmax minus one-hot
        self.layers = list(zip(models.weights, models.biases))  # fp32: the masters themselves
        if low != torch.float32:  # bf16 copies, refreshed from the masters each step
            self.layers = [(weight.to(low), bias.to(low)) for weight, bias in self.layers]

    def forward(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's input, then the logits (in the GEMMs' dtype)."""
        if self.low != torch.float32:
            for (weight, bias), master, master_bias in zip(self.layers, self.models.weights, self.models.biases):
                weight.copy_(master)
                bias.copy_(master_bias)
        activations = [inputs]
        for weight, bias in self.layers[:-1]:
            activations.append(torch.baddbmm(bias.unsqueeze(1), activations[-1], weight).relu_())
        weight, bias = self.layers[-1]
        activations.append(torch.baddbmm(bias.unsqueeze(1), activations[-1], weight))
        return activations

    def backward(self, activations: list[torch.Tensor], grad: torch.Tensor, alpha: float) -> None:
        """Backpropagate `grad` (fp32) and update the fp32 masters in place: W += alpha * dW, alpha = -lr / n."""
        for layer in reversed(range(len(self.layers))):
            grad_low = grad.to(self.low)  # a no-op in fp32 and below the logits
            if layer > 0:  # with the weight as it was in the forward pass
                grad_input = torch.bmm(grad_low, self.layers[layer][0].transpose(1, 2))
            self.update(layer, activations[layer], grad, grad_low, alpha)
            if layer > 0:
                grad = _relu_backward(grad_input, activations[layer], 0)

    def update(self, layer: int, inputs: torch.Tensor, grad: torch.Tensor, grad_low: torch.Tensor, alpha: float):
        """One layer's W += alpha * inputs.T @ grad and b += alpha * grad summed over the batch, on the masters."""
        weight, bias = self.models.weights[layer], self.models.biases[layer]
        if self.low == torch.float32:  # the GEMM that computes the gradient adds it, as fused.step does
            weight.baddbmm_(inputs.transpose(1, 2), grad, alpha=alpha)
            bias.unsqueeze(1).baddbmm_(self.ones[:, :, : grad.shape[1]], grad, alpha=alpha)
        else:  # baddbmm_ needs one dtype: the bf16 gradient is made, then added to the fp32 master
            weight.add_(torch.bmm(inputs.transpose(1, 2), grad_low), alpha=alpha)
            bias.add_(grad.sum(1, dtype=torch.float32), alpha=alpha)


@torch.inference_mode()
def evaluate(
    models: Stack, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 10000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model mean cross-entropy [M] (fp32) and accuracy [M] (exact counts over N, float64), on the CPU;
    NaN for an empty split."""
    loss = images.new_zeros(models.models, dtype=torch.float32)
    correct = torch.zeros_like(loss)
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = x.float()
        # One model at a time: the images are shared, and M models' activations at once would be M times the memory.
        for index in range(models.models):
            logits = x
            for layer, (weight, bias) in enumerate(zip(models.weights, models.biases)):
                logits = torch.addmm(bias[index], logits if layer == 0 else logits.relu(), weight[index])
            loss[index] += F.cross_entropy(logits, y, reduction="sum")
            correct[index] += (logits.argmax(1) == y).sum()
    # On the CPU in float64 (MPS has none): an accuracy of 0.8836, not float32's 0.8835999965667725.
    return (loss / len(labels)).cpu(), correct.cpu().double() / len(labels)
