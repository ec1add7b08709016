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


def machine(device: torch.device | None = None) -> str:
    """The machine's processor, its core count, the device and torch: figures in the reports hold for it alone."""
    import os
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    processor = names[0] if names else (platform.processor() or platform.machine())
    where = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return f"{processor}, {os.cpu_count()} CPUs{where}, torch {torch.__version__}"
