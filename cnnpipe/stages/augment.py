"""augment: the training split (optionally class-balanced with augmented copies) + the online policy.

A sharded dataset gives sharded output, the balanced copies included, so train.data_mode stream sees the same
training split as the device path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnpipe.augment import POLICY_FILE, PREVIEW_FILE, AugmentPolicy, apply_policy, flip_tables, no_flips
from cnnpipe.config import AugmentConfig
from cnnpipe.data.images import image_grid
from cnnpipe.data.store import Split, read_dataset, write_dataset

PREVIEW_IMAGES = 64


def _augment_uint8(images: np.ndarray, labels: np.ndarray, policy: AugmentPolicy, g: torch.Generator,
                   boxes: np.ndarray | None = None, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    out_x, out_y = [], []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).permute(0, 3, 1, 2).float() / 255
        box = None if boxes is None else torch.from_numpy(np.asarray(boxes[start:start + chunk]))
        x, y = apply_policy(x, torch.from_numpy(labels[start:start + chunk]), policy, g, box)
        out_x.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        out_y.append(y.numpy())
    return np.concatenate(out_x), np.concatenate(out_y)


def balance(split: Split, target: int, policy: AugmentPolicy, g: torch.Generator) -> tuple[Split, dict[int, int]]:
    """Top up every class below `target` images with augmented copies of its own images.

    A copy keeps its source's box: the box crop happens online, and a copy's shift is small."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    counts = np.bincount(split.labels)
    picks = [rng.choice(np.flatnonzero(split.labels == c), target - n, replace=True)
             for c, n in enumerate(counts) if 0 < n < target]
    if not picks:
        return split, {}
    src = np.sort(np.concatenate(picks))
    # copies keep their class: the flip table only remaps labels online, not here
    never = no_flips(len(counts))
    copy_policy = AugmentPolicy(**{**policy.to_dict(), "hflip": never, "vflip": never, "rot180": never,
                                   "box_crop": 0.0})
    new_x, new_y = _augment_uint8(split.images[src], split.labels[src], copy_policy, g)
    added = dict(zip(*np.unique(new_y, return_counts=True)))
    boxes = None if split.boxes is None else np.concatenate([split.boxes, split.boxes[src]])
    return Split(np.concatenate([split.images, new_x]), np.concatenate([split.labels, new_y]), boxes), \
        {int(k): int(v) for k, v in added.items()}


def preview_png(split: Split, policy: AugmentPolicy, g: torch.Generator) -> bytes:
    """A grid of augmented training samples, as users will want to eyeball the policy."""
    take = np.sort(np.random.default_rng(0).choice(len(split.labels), min(PREVIEW_IMAGES, len(split.labels)), replace=False))
    x, _ = _augment_uint8(split.images[take], split.labels[take], policy, g,
                          None if split.boxes is None else split.boxes[take])
    grid = image_grid(x, cols=8, scale=max(1, 64 // x.shape[1]))
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def run(*, cfg: AugmentConfig, data: Path, augmented: Path) -> dict:
    """The processed dataset `data`'s training split (balanced when asked) + the online policy -> `augmented`."""
    ds = read_dataset(data, splits=("train",))
    policy = AugmentPolicy.from_config(cfg, flip_tables(ds.classes, cfg.flip))
    g = torch.Generator().manual_seed(cfg.seed)
    train = ds.splits["train"]
    if cfg.balance_to:
        train, added = balance(Split(np.asarray(train.images), np.asarray(train.labels), train.boxes), cfg.balance_to,
                               policy, g)
    else:
        added = {}
    manifest = write_dataset(augmented, ds.classes, {"train": train}, {
        "source": ds.manifest["source"],
        "augment": {"balance_to": cfg.balance_to, "added_per_class": {ds.classes[k]: v for k, v in added.items()}},
    }, extra_files={
        POLICY_FILE: policy.to_dict(),
        PREVIEW_FILE: preview_png(train, policy, g),
    }, shard_images=ds.manifest.get("shard_images") if ds.manifest.get("shards") else None)
    return {"train_images": manifest["counts"]["train"]["total"], "added": sum(added.values()),
            "policy_version": policy.version}
