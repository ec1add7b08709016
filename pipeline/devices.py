"""Which torch device a stage trains on."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """auto prefers cuda, then mps, then cpu; an explicit device that is missing is an error."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()), "cpu": True}
    if name == "auto":
        return torch.device(next(device for device in ("cuda", "mps", "cpu") if available[device]))
    if not available[name]:
        raise PipelineError(
            f"train.device: got {name!r}, but this machine has no {name} device "
            f"(torch {torch.__version__}); expected auto or cpu"
        )
    return torch.device(name)
