"""Deterministic stratified splits."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices per split: each class is shuffled by `seed` and cut by `fractions` (the rest is 'train').

    Every split that is asked for gets at least one image of each class that has enough images,
    so a small class is not silently missing from validation.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*fractions, "train")}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, frac in fractions.items():
            take = int(round(frac * len(idx)))
            if frac > 0 and take == 0 and len(idx) - start > 1:
                take = 1
            parts[name].append(idx[start:start + take])
            start += take
        parts["train"].append(idx[start:])
    return {name: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for name, p in parts.items()}
