"""The losses a variant can train with: d2l's cross-entropy, and MSE or L1 on probabilities vs one-hot targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFunction = Callable[..., torch.Tensor]  # (logits, labels, reduction="mean") -> loss


def _on_probabilities(distance: Callable[..., torch.Tensor]) -> LossFunction:
    """A distance between softmax outputs and one-hot targets, summed over classes, per example."""

    def loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        per_example = distance(logits.softmax(1), targets, reduction="none").sum(1)
        return per_example.mean() if reduction == "mean" else per_example.sum()

    return loss


LOSSES: dict[str, LossFunction] = {
    "cross_entropy": F.cross_entropy,
    "mse": _on_probabilities(F.mse_loss),
    "l1": _on_probabilities(F.l1_loss),
}
