"""Figures of a processed dataset: class distribution, samples per class, pixel intensities."""

from __future__ import annotations

from typing import IO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnpipe.data.images import image_grid  # noqa: E402
from cnnpipe.data.store import Split  # noqa: E402

SAMPLES_PER_CLASS = 8
THUMBNAIL_SIDE = 64  # pixels per sample at most


def class_distribution_png(per_class: dict[str, list[int]], classes: list[str], path: IO[bytes]) -> None:
    """`per_class`: each split's image count per class."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n + 2), 4.5), constrained_layout=True)
    width = 0.8 / len(per_class)
    for k, (name, counts) in enumerate(per_class.items()):
        ax.bar(np.arange(n) + (k - (len(per_class) - 1) / 2) * width, counts, width, label=f"{name} ({sum(counts):,})")
    ax.set_xticks(range(n), classes, rotation=90, fontsize=max(5.0, min(9.0, 200.0 / n)))
    ax.set_ylabel("images")
    ax.set_title("images per class and split")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def samples_png(split: Split, classes: list[str], path: IO[bytes], seed: int = 0) -> None:
    """One row per class, up to SAMPLES_PER_CLASS random images each, the class name beside it (only those are
    read from a memory-mapped split)."""
    rng = np.random.default_rng(seed)
    h, w, c = split.images.shape[1:]
    rows = []
    for k in range(len(classes)):
        idx = np.flatnonzero(split.labels == k)
        pick = np.sort(rng.choice(idx, min(SAMPLES_PER_CLASS, len(idx)), replace=False)) if len(idx) else idx
        row = np.zeros((SAMPLES_PER_CLASS, h, w, c), np.uint8)
        row[:len(pick)] = split.images[pick]
        rows.append(row)
    step = -(-h // THUMBNAIL_SIDE)  # large images shown subsampled: matplotlib holds the grid as float RGBA
    thumbnails = np.concatenate(rows)[:, ::step, ::step]
    side = thumbnails.shape[1]
    grid = image_grid(thumbnails, cols=SAMPLES_PER_CLASS, scale=1)
    fig_h = max(3.0, 0.42 * len(classes))
    fig, ax = plt.subplots(figsize=(fig_h * grid.shape[1] / grid.shape[0] + 2.5, fig_h), constrained_layout=True)
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_yticks([1 + (side + 1) * k + side / 2 for k in range(len(classes))], classes, fontsize=8)
    ax.set_xticks([])
    ax.set_title("training samples per class")
    fig.savefig(path, dpi=100, bbox_inches="tight")  # long class names must not be clipped
    plt.close(fig)


def pixel_histogram_png(hist: np.ndarray, images: int, path: IO[bytes]) -> None:
    """`hist`: C x 256 counts of each pixel value per channel, over `images` training images."""
    c = len(hist)
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    colors = ["gray"] if c == 1 else ["red", "green", "blue"]
    for ch in range(c):
        ax.plot(hist[ch] / max(hist[ch].sum(), 1), color=colors[ch], label="gray" if c == 1 else colors[ch])
    ax.set_xlabel("intensity")
    ax.set_ylabel("fraction of pixels")
    ax.set_title(f"pixel intensities ({images:,} training images)")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
