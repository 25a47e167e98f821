"""Batched inference over uint8 images, normalized on the fly."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def to_nchw_uint8(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x C (possibly memory-mapped) -> uint8 N x C x H x W tensor on `device`."""
    # np.array copies: the source may be a read-only memory map, which torch must not alias
    return torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2).contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float N x C x H x W -> standardized float."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return (x - mean) / std


def stats_tensors(mean: list[float], std: list[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   batch_size: int = 512) -> torch.Tensor:
    """Logits (float32, on the images' device) for uint8 N x C x H x W images."""
    was_training = model.training
    model.eval()
    out = [model(normalize(images[i:i + batch_size], mean, std)).float() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    if not out:
        return torch.zeros(0, 0, device=images.device)
    return torch.cat(out)
