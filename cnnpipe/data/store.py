"""The processed-dataset format every stage after ingest reads.

    <dir>/manifest.json          format, source, input sha256s, counts, image size, channel mean/std
    <dir>/classes.json           class names, index = label
    <dir>/<split>_images.npy     uint8 N x H x W x C (memory-mappable)
    <dir>/<split>_labels.npy     int64 N
    <dir>/<split>_boxes.npy      float32 N x 4, only when the source has boxes (GTSRB's ROI) and the images
                                 are whole frames: x1, y1, x2, y2 in pixels of the stored image, edges
                                 (x2, y2 exclusive, as PIL's crop takes them)

    <dir>/shards/<split>-*.tar   optional: the same splits as WebDataset shards, for streaming (format and
                                 reader in cnnpipe/data/shards.py); the manifest lists them with sha256s

The augmented dataset (augment -> train) is the same format holding only the train split, plus
`policy.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe import remote
from cnnpipe.data.shards import write_shards
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir, read_json

FORMAT = "cnnpipe.dataset/1"
MANIFEST_FILE = "manifest.json"
CLASSES_FILE = "classes.json"
IMAGES_FILE, LABELS_FILE, BOXES_FILE = "{split}_images.npy", "{split}_labels.npy", "{split}_boxes.npy"
FIGURES_DIR = "figures"  # ingest's figures of the data (class distribution, samples, pixel histogram)
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N
    boxes: np.ndarray | None = None  # float32 N x 4, the object's box in the stored image (see above)


@dataclass
class Dataset:
    classes: list[str]
    splits: dict[str, Split]
    manifest: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    @property
    def has_boxes(self) -> bool:
        return bool(self.manifest.get("boxes"))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale, in chunks so a memory-mapped array stays cheap."""
    c = images.shape[-1]
    total, sq, n = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].reshape(-1, c).astype(np.float64) / 255.0
        total += chunk.sum(0)
        sq += (chunk ** 2).sum(0)
        n += len(chunk)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean ** 2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def cross_split_duplicates(splits: dict[str, Split]) -> dict[str, int]:
    """Exact-duplicate images (same bytes) shared by two splits: a leakage check."""
    hashes = {name: {hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in s.images}
              for name, s in splits.items()}
    names = list(hashes)
    return {f"{a}-{b}": len(hashes[a] & hashes[b]) for i, a in enumerate(names) for b in names[i + 1:]}


def write_dataset(path: Path | str, classes: list[str], splits: dict[str, Split], manifest: dict[str, Any],
                  extra_files: dict[str, bytes | dict | list] | None = None, shard_images: int | None = None) -> dict:
    """Write the dataset atomically; the manifest gets counts, size, channels and train mean/std added.

    `extra_files` (name -> bytes, or a dict/list written as JSON) land in the same atomic directory. With
    `shard_images`, every split is also written as shards of that many images (manifest: `shards`).
    """
    first = next(iter(splits.values())).images
    h, w, c = first.shape[1:]
    mean, std = channel_stats(splits["train"].images)
    counts = {}
    for name, s in splits.items():
        if s.images.dtype != np.uint8 or s.images.ndim != 4 or s.images.shape[1:] != (h, w, c):
            raise ValueError(f"split {name}: expected uint8 N x {h} x {w} x {c}, got {s.images.dtype} {s.images.shape}")
        per_class = np.bincount(s.labels, minlength=len(classes))
        if s.boxes is not None and s.boxes.shape != (len(s.labels), 4):
            raise ValueError(f"split {name}: expected boxes {len(s.labels)} x 4, got {s.boxes.shape}")
        counts[name] = {"total": int(len(s.labels)), "per_class": dict(zip(classes, per_class.tolist()))}
    boxes = [s.boxes is not None for s in splits.values()]
    if any(boxes) and not all(boxes):
        raise ValueError("boxes must be given for every split or for none")
    manifest = {
        "format": FORMAT,
        **manifest,
        "image_size": int(h),
        "channels": int(c),
        "num_classes": len(classes),
        "counts": counts,
        "mean": mean,
        "std": std,
        "boxes": all(boxes),
    }
    with atomic_dir(path) as tmp:
        for name, s in splits.items():
            np.save(tmp / IMAGES_FILE.format(split=name), np.ascontiguousarray(s.images))
            np.save(tmp / LABELS_FILE.format(split=name), s.labels.astype(np.int64))
            if s.boxes is not None:
                np.save(tmp / BOXES_FILE.format(split=name), s.boxes.astype(np.float32))
        if shard_images:
            manifest["shard_images"] = shard_images
            manifest["shards"] = {name: write_shards(tmp, name, s.images, s.labels, s.boxes, shard_images)
                                  for name, s in splits.items()}
        (tmp / CLASSES_FILE).write_text(json.dumps(classes, indent=2) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    return manifest


def read_dataset(path: Path | str, splits: tuple[str, ...] = SPLITS, mmap: bool = True) -> Dataset:
    """Read and check a processed dataset; every problem is one line naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CnnpipeError(f"dataset '{path}' not found (expected a directory written by `cnnpipe ingest`)")
    manifest = read_json(path / MANIFEST_FILE, "dataset manifest")
    if manifest.get("format") != FORMAT:
        raise CnnpipeError(f"dataset manifest '{path / 'manifest.json'}': expected format {FORMAT}, "
                           f"got {manifest.get('format')!r}")
    classes = read_json(path / CLASSES_FILE, "class list")
    if not isinstance(classes, list) or len(classes) != manifest.get("num_classes"):
        raise CnnpipeError(f"class list '{path / 'classes.json'}': expected {manifest.get('num_classes')} names")
    out = {}
    shape = (manifest["image_size"], manifest["image_size"], manifest["channels"])
    for name in splits:
        img_path, lab_path = path / IMAGES_FILE.format(split=name), path / LABELS_FILE.format(split=name)
        if not img_path.exists():
            raise CnnpipeError(f"dataset '{path}' has no '{name}' split ({img_path.name} missing)")
        try:
            images = np.load(img_path, mmap_mode="r" if mmap else None, allow_pickle=False)
            labels = np.load(lab_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CnnpipeError(f"dataset file in '{path}' for split '{name}' is not a readable .npy: {e}") from None
        if images.dtype != np.uint8 or images.shape[1:] != shape or len(images) != len(labels):
            raise CnnpipeError(f"dataset file '{img_path}': expected uint8 N x {' x '.join(map(str, shape))} "
                               f"with {len(labels)} images, got {images.dtype} {images.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise CnnpipeError(f"dataset file '{lab_path}': labels outside 0..{len(classes) - 1}")
        boxes = _read_boxes(path / BOXES_FILE.format(split=name), len(labels), shape) if manifest.get("boxes") else None
        out[name] = Split(images, labels, boxes)
    return Dataset(classes, out, manifest)


def decoded_mb(manifest: dict[str, Any], split: str) -> float:
    """Size of a split's uint8 images in MiB, from its manifest."""
    side, channels = manifest["image_size"], manifest["channels"]
    return manifest["counts"][split]["total"] * side * side * channels / 2**20


def fetch_dataset(location: remote.Location, dest: Path, splits: tuple[str, ...], extra_files: tuple[str, ...] = ()) -> Path:
    """A local copy of a remote dataset's manifest, class list, the arrays of `splits` and `extra_files` (no
    shards: they are streamed), in `dest`; a local dataset is returned as it is."""
    if not remote.is_remote(location):
        return Path(location)
    dest.mkdir(parents=True, exist_ok=True)
    raw = remote.read_bytes(remote.join(location, MANIFEST_FILE))
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise CnnpipeError(f"dataset manifest '{remote.join(location, MANIFEST_FILE)}': not JSON") from None
    names = [CLASSES_FILE, *extra_files]
    for split in splits:
        names += [f.format(split=split) for f in (IMAGES_FILE, LABELS_FILE, *([BOXES_FILE] if manifest.get("boxes") else []))]
    for name in names:
        (dest / name).write_bytes(remote.read_bytes(remote.join(location, name)))
    (dest / MANIFEST_FILE).write_bytes(raw)  # last: a copy with a manifest is whole
    return dest


def _read_boxes(path: Path, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A split's boxes, checked: n x 4 finite floats with 0 <= x1 < x2 <= width (and the same for y)."""
    try:
        boxes = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CnnpipeError(f"dataset file '{path}': not a readable .npy of boxes: {e}") from None
    h, w = shape[:2]
    ok = boxes.shape == (n, 4) and boxes.dtype.kind == "f" and bool(np.isfinite(boxes).all())
    if ok and n:
        x1, y1, x2, y2 = boxes.T
        ok = bool(((x1 >= 0) & (x1 < x2) & (x2 <= w) & (y1 >= 0) & (y1 < y2) & (y2 <= h)).all())
    if not ok:
        raise CnnpipeError(f"dataset file '{path}': expected {n} x 4 float boxes (x1, y1, x2, y2) inside the "
                           f"{w}x{h} images, got {boxes.dtype} {boxes.shape}")
    return boxes.astype(np.float32)
