"""Figures as PNG files (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Counts and the row-normalized matrix side by side; the figure grows with the class count."""
    n = len(classes)
    side = max(5.0, 0.28 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), constrained_layout=True)
    rows = cm.sum(1, keepdims=True)
    normalized = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    font = max(4.0, min(9.0, 120.0 / n))
    for ax, data, name, fmt in ((axes[0], cm, "counts", "d"), (axes[1], normalized, "row-normalized (recall)", ".2f")):
        im = ax.imshow(data, cmap="Blues", interpolation="nearest")
        ax.set_title(f"{title}: {name}")
        ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
        ax.set_yticks(range(n), classes, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        if n <= 20:  # cell labels stay legible up to ~20 classes; beyond that the colours carry it
            high = data.max() / 2 if data.max() > 0 else 1
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=font,
                            color="white" if data[i, j] > high else "black")
    fig.savefig(path, dpi=110)
    plt.close(fig)
