"""Look inside a trained model with forward hooks: works for every architecture of the registry."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def penultimate(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The input of the last Linear layer (the embedding the classifier separates), N x D."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().flatten(1)))
    try:
        model.eval()
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured).float()


def first_conv(model: nn.Module) -> torch.Tensor | None:
    """The first convolution's weights, out x in x k x k (None for a model without convolutions)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.weight.detach().float().cpu() if conv is not None else None


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every convolution's output for one image (1 x C x H x W in): [(layer name, C x H x W)]."""
    maps: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: maps.append((name, out[0].detach().float().cpu())))
               for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    return maps
