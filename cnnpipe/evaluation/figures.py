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
    font = max(6.0, min(9.0, 200.0 / n))  # 6 pt stays readable at 43 classes
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


def training_curves_png(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation (train alone when nothing was validated)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            # the epochs that have the value: train.val_every skips epochs, train.train_on_val validates none
            rows = [e for e in history if e.get(f"{split}/{metric}") not in (None, "")]
            if rows:
                ax.plot([int(float(e["epoch"])) for e in rows], [float(e[f"{split}/{metric}"]) for e in rows], style,
                        markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def labelled_grid_png(images: np.ndarray, titles: list[str], color: str, path: Path, title: str, cols: int = 8) -> None:
    """Images with a title each (e.g. `pred (true)`), in `color`."""
    n = max(1, len(images))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(titles[i], color=color, fontsize=6.5)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def confidence_histogram_png(confidence: np.ndarray, correct: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    bins = np.linspace(0, 1, 26)
    ax.hist(confidence[correct], bins=bins, alpha=0.7, color="tab:blue", label=f"correct ({correct.sum():,})")
    ax.hist(confidence[~correct], bins=bins, alpha=0.7, color="tab:red", label=f"incorrect ({(~correct).sum():,})")
    ax.set_yscale("log")
    ax.set_xlabel("confidence (top softmax probability)")
    ax.set_ylabel("images (log)")
    ax.set_title("confidence of correct and incorrect predictions")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_png(panels: list[tuple[str, list[dict], float]], path: Path) -> None:
    """One reliability diagram per (title, calibration bins, ECE), side by side (before / after calibration)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), constrained_layout=True, squeeze=False)
    for ax, (title, bins, ece) in zip(axes[0], panels):
        centers = [(b["low"] + b["high"]) / 2 for b in bins]
        width = bins[0]["high"] - bins[0]["low"]
        acc = [b["accuracy"] if b["count"] else 0 for b in bins]
        ax.bar(centers, acc, width=width * 0.95, color="tab:blue", edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: ECE {ece:.4f}")
        ax.legend(loc="upper left")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def filters_png(weights: np.ndarray, path: Path) -> None:
    """First-layer filters (out x in x k x k), each min-max scaled; RGB when the input has 3 channels."""
    n = weights.shape[0]
    cols = min(16, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, cols * 0.8), rows * 0.8 + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            w = weights[i]
            w = (w - w.min()) / (w.max() - w.min() + 1e-8)
            ax.imshow(w.transpose(1, 2, 0) if w.shape[0] == 3 else w[0], cmap=None if w.shape[0] == 3 else "gray",
                      interpolation="nearest")
    fig.suptitle(f"first convolution: {n} filters {weights.shape[2]}x{weights.shape[3]}")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def feature_maps_png(image: np.ndarray, maps: list[tuple[str, np.ndarray]], path: Path, per_layer: int = 8) -> None:
    """The input image and the first channels of every convolution's output, one row per layer."""
    rows = len(maps)
    fig, axes = plt.subplots(rows, per_layer + 1, figsize=((per_layer + 1) * 1.1, rows * 1.15 + 0.3), squeeze=False)
    for r, (name, fmap) in enumerate(maps):
        axes[r, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        axes[r, 0].set_ylabel(f"{name}\n{fmap.shape[1]}x{fmap.shape[2]}", fontsize=6, rotation=0, ha="right", va="center")
        for c in range(per_layer):
            ax = axes[r, c + 1]
            if c < fmap.shape[0]:
                ax.imshow(fmap[c], cmap="viridis", interpolation="nearest")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("feature maps of one test image (first channels of each conv layer)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def tsne_png(points: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> None:
    n = len(classes)
    # distinct colours: tab10 / tab20, or the 60 of tab20 + tab20b + tab20c (no colormap ramp fading to white)
    palette = [plt.get_cmap(name)(i) for name in (("tab10",) if n <= 10 else ("tab20", "tab20b", "tab20c"))
               for i in range(10 if name == "tab10" else 20)]
    fig, ax = plt.subplots(figsize=(8.5 if n <= 20 else 11, 7), constrained_layout=True)
    for k in range(n):
        m = labels == k
        if m.any():
            ax.scatter(points[m, 0], points[m, 1], s=6, color=palette[k % len(palette)], label=classes[k])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of penultimate-layer embeddings ({len(labels):,} test images)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6 if n > 20 else 8, markerscale=2,
              ncol=1 if n <= 25 else 2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_vs_parameters_png(params: list[int], accuracy: list[float], labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    ax.scatter(params, accuracy, s=40, color="tab:blue", zorder=3)
    for x, y, label in zip(params, accuracy, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy vs parameter count")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
