"""Which torch device to run on."""

from __future__ import annotations

import torch

from cnnpipe.errors import CnnpipeError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnpipeError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnpipeError(f"device: {name!r} asked for, but torch sees no CUDA device")
    return device
