"""Deterministic stratified splits, optionally keeping groups (GTSRB tracks) whole."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int,
                     groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Indices per split: each class is shuffled by `seed` and cut by `fractions` (the rest is 'train').

    With `groups`, whole groups are shuffled and assigned (images of one group never straddle two
    splits), each split taking groups until it holds its fraction of the class's images. Every split
    asked for gets at least one image (or group) of a class that has enough, so a small class is not
    silently missing from validation.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*fractions, "train")}
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if groups is None:
            units = [np.array([i]) for i in rng.permutation(members)]
        else:
            names, inverse = np.unique(groups[members], return_inverse=True)
            units = [members[inverse == g] for g in rng.permutation(len(names))]
        start = 0
        for name, frac in fractions.items():
            want = int(round(frac * len(members)))
            taken, end = 0, start
            while end < len(units) - 1 and taken < want:  # the last unit always stays for train
                taken += len(units[end])
                end += 1
            if frac > 0 and end == start and len(units) - start > 1:
                end = start + 1
            parts[name] += units[start:end]
            start = end
        parts["train"] += units[start:]
    return {name: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for name, p in parts.items()}
