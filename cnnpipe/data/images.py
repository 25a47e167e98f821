"""Batched image conversions on uint8 N x H x W x C arrays."""

from __future__ import annotations

import numpy as np


def resize_batch(images: np.ndarray, size: int, channels: int, chunk: int = 4096) -> np.ndarray:
    """Resize to size x size and convert to `channels` (1 = luma, 3 = RGB), in batches with torch."""
    if images.shape[1:] == (size, size, channels):
        return images
    # imported here: torch costs hundreds of MB of resident memory, which ingest of files never needs
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size, channels), np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).permute(0, 3, 1, 2).float()
        if x.shape[1] != channels:
            if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
                x = (x[:, :3] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                x = x[:, :1].expand(-1, 3, -1, -1)
        if x.shape[-2:] != (size, size):
            # antialias matters when shrinking; it is a no-op when growing
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def image_grid(images: np.ndarray, cols: int = 8, scale: int = 4) -> np.ndarray:
    """Tile uint8 N x H x W x C images into one uint8 image, each scaled up `scale` times (nearest)."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)  # 1-pixel white gutters
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    return grid.repeat(scale, 0).repeat(scale, 1)
