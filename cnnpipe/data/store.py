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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe import remote
from cnnpipe.data.chunks import DIGEST_BYTES, Chunk, summarize
from cnnpipe.data.shards import write_shard
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest, read_json, staged_dir, write_array

FORMAT = "cnnpipe.dataset/1"
MANIFEST_FILE = "manifest.json"
CLASSES_FILE = "classes.json"
IMAGES_FILE, LABELS_FILE, BOXES_FILE = "{split}_images.npy", "{split}_labels.npy", "{split}_boxes.npy"
MAX_MANIFEST_BYTES = 64 * 2**20  # a remote manifest (or class list, policy, preview) larger than this is not one
NPY_HEADER_BYTES = 4096  # an .npy file's header, at most (numpy pads it to 64 or 4096 bytes)
FIGURES_DIR = "figures"  # ingest's figures of the data (class distribution, samples, pixel histogram)
SPLITS = ("train", "val", "test")
CHUNK_IMAGES = 2048  # images per chunk when no shard size is given


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


def channel_stats(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale, from C x 256 pixel-value counts (exact, any order)."""
    values = np.arange(256) / 255.0
    n = np.maximum(hist.sum(1), 1)
    mean = hist @ values / n
    std = np.sqrt(np.maximum(hist @ values ** 2 / n - mean ** 2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def _check(name: str, images: np.ndarray, labels: np.ndarray, boxes: np.ndarray | None,
           shape: tuple[int, int, int]) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        raise ValueError(f"split {name}: expected uint8 N x {' x '.join(map(str, shape))}, got {images.dtype} {images.shape}")
    if boxes is not None and boxes.shape != (len(labels), 4):
        raise ValueError(f"split {name}: expected boxes {len(labels)} x 4, got {boxes.shape}")


def _write_npy(path: Path, dtype: type, shape: tuple[int, ...], parts: list[Path]) -> None:
    """A .npy of `shape` whose data are the `parts`' bytes, copied in order (each deleted once copied, so the
    disk holds one copy of the data): what np.save writes, without the array in memory."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 16 * 2**20)
            part.unlink()


class DatasetWriter:
    """Writes a processed dataset chunk by chunk under `root`: a chunk's arrays become part files in
    `root`/parts, its shard (when on) a finished tar in `root`/out; `finish` joins each split's parts into
    its .npy files in `root`/out and writes the manifest. It holds one chunk at a time (and each image's
    16-byte digest), whatever the dataset's size. `add` returns the chunk's record, which `keep` takes
    back from a journal to resume an interrupted write."""

    def __init__(self, root: Path, classes: list[str], splits: tuple[str, ...], shape: tuple[int, int, int],
                 boxes: bool, shard_images: int | None):
        self.root, self.out, self.parts = root, root / "out", root / "parts"
        self.classes, self.shape, self.boxes, self.shard_images = classes, tuple(shape), boxes, shard_images
        self.records: dict[str, list[dict]] = {name: [] for name in splits}
        self.out.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)

    def first_index(self, split: str, index: int) -> int:
        """Where chunk `index` starts in its split's arrays (every earlier chunk is added or kept)."""
        return sum(r["count"] for r in self.records[split] if r["index"] < index)

    def images_part(self, split: str, index: int) -> Path:
        """Where the producer of chunk `index` of `split` writes its pixels (raw uint8, C order)."""
        return self.parts / f"{split}-{index:06d}.images"

    def add(self, split: str, index: int, chunk: Chunk) -> dict:
        """Record chunk `index` of `split` (its pixels are in images_part already): its labels, boxes, shard."""
        if (chunk.boxes is not None) != self.boxes:
            raise ValueError("boxes must be given for every split or for none")
        files = {str(self.images_part(split, index).relative_to(self.root)): chunk.images_sha256}
        for kind, array in (("labels", chunk.labels), ("boxes", chunk.boxes)):
            if array is not None:
                name = f"parts/{split}-{index:06d}.{kind}"
                write_array(self.root / name, array)
                files[name] = hashlib.sha256(np.ascontiguousarray(array)).hexdigest()
        shard = None
        if self.shard_images:
            shard = write_shard(self.out, split, index, self.first_index(split, index), chunk.pngs, chunk.labels,
                                chunk.boxes)
            files[f"out/{shard['file']}"] = shard["sha256"]
        record = {"split": split, "index": index, "count": len(chunk.labels), "files": files, "shard": shard,
                  "bad": chunk.bad, "per_class": np.bincount(chunk.labels, minlength=len(self.classes)).tolist(),
                  "hist": chunk.hist.tolist(), "digests": chunk.digests.hex()}
        self.records[split].append(record)
        return record

    def keep(self, record: dict) -> bool:
        """Take a chunk an interrupted write recorded, if its files are all there with their sha256."""
        intact = all((self.root / name).is_file() and file_digest(self.root / name) == digest
                     for name, digest in record["files"].items())
        if intact:
            self.records[record["split"]].append(record)
        return intact

    def bad_files(self) -> list[dict]:
        return [bad for records in self.records.values() for r in sorted(records, key=_index) for bad in r["bad"]]

    def duplicates(self) -> dict[str, int]:
        """Exact-duplicate images (same bytes) shared by two splits: a leakage check."""
        size = 2 * DIGEST_BYTES
        hashes = {name: {r["digests"][i:i + size] for r in records for i in range(0, len(r["digests"]), size)}
                  for name, records in self.records.items()}
        names = list(hashes)
        return {f"{a}-{b}": len(hashes[a] & hashes[b]) for i, a in enumerate(names) for b in names[i + 1:]}

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Join the parts into the arrays, write the class list and the manifest (counts, size, channels and
        train mean/std added); the completed dataset is `root`/out."""
        counts, shards = {}, {}
        for name, records in self.records.items():
            records = sorted(records, key=_index)
            n = sum(r["count"] for r in records)
            arrays = [(IMAGES_FILE, "images", np.uint8, (n, *self.shape)), (LABELS_FILE, "labels", np.int64, (n,))]
            arrays += [(BOXES_FILE, "boxes", np.float32, (n, 4))] if self.boxes else []
            for file, kind, dtype, shape in arrays:
                parts = [self.root / f for r in records for f in r["files"] if f.endswith(f".{kind}")]
                _write_npy(self.out / file.format(split=name), dtype, shape, parts)
            per_class = np.sum([r["per_class"] for r in records], axis=0) if records else np.zeros(len(self.classes))
            counts[name] = {"total": n, "per_class": dict(zip(self.classes, per_class.astype(int).tolist()))}
            shards[name] = [r["shard"] for r in records]
        train = self.records.get("train", [])
        mean, std = channel_stats(np.sum([r["hist"] for r in train], axis=0) if train else np.zeros((self.shape[2], 256)))
        manifest = {
            "format": FORMAT,
            **manifest,
            "image_size": int(self.shape[0]),
            "channels": int(self.shape[2]),
            "num_classes": len(self.classes),
            "counts": counts,
            "mean": mean,
            "std": std,
            "boxes": self.boxes,
        }
        if self.shard_images:
            manifest["shard_images"] = self.shard_images
            manifest["shards"] = shards
        (self.out / CLASSES_FILE).write_text(json.dumps(self.classes, indent=2) + "\n")
        (self.out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest


def _index(record: dict) -> int:
    return record["index"]


def write_files(directory: Path, files: dict[str, bytes | dict | list]) -> None:
    """name -> bytes, or a dict/list written as JSON, under `directory`."""
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (directory / name).write_bytes(content)
        else:
            (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def write_dataset(path: Path | str, classes: list[str], splits: dict[str, Split], manifest: dict[str, Any],
                  extra_files: dict[str, bytes | dict | list] | None = None, shard_images: int | None = None) -> dict:
    """Write in-memory splits atomically, through the chunked writer ingest uses; the manifest gets counts,
    size, channels and train mean/std added.

    `extra_files` (name -> bytes, or a dict/list written as JSON) land in the same atomic directory. With
    `shard_images`, every split is also written as shards of that many images (manifest: `shards`).
    """
    shape = next(iter(splits.values())).images.shape[1:]
    for name, s in splits.items():
        _check(name, s.images, s.labels, s.boxes, shape)
    boxes = [s.boxes is not None for s in splits.values()]
    if any(boxes) and not all(boxes):
        raise ValueError("boxes must be given for every split or for none")
    step = shard_images or CHUNK_IMAGES
    with staged_dir(path, None) as staging:
        writer = DatasetWriter(staging.root, classes, tuple(splits), shape, all(boxes), shard_images)
        for name, s in splits.items():
            for index, start in enumerate(range(0, len(s.labels), step)):
                part = slice(start, start + step)
                chunk = summarize(s.images[part], s.labels[part], None if s.boxes is None else s.boxes[part], [],
                                  bool(shard_images), writer.images_part(name, index))
                writer.add(name, index, chunk)
        manifest = writer.finish(manifest)
        write_files(staging.out, extra_files or {})
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
    raw = remote.read_bytes(remote.join(location, MANIFEST_FILE), max_bytes=MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw)
        budgets = {CLASSES_FILE: MAX_MANIFEST_BYTES, **dict.fromkeys(extra_files, MAX_MANIFEST_BYTES)}
        pixels = int(manifest["image_size"]) ** 2 * int(manifest["channels"])
        for split in splits:  # each array's size follows from the manifest: more is refused before it is all read
            n = int(manifest["counts"][split]["total"])
            budgets |= {IMAGES_FILE.format(split=split): NPY_HEADER_BYTES + n * pixels,
                        LABELS_FILE.format(split=split): NPY_HEADER_BYTES + n * 8,
                        **({BOXES_FILE.format(split=split): NPY_HEADER_BYTES + n * 16} if manifest.get("boxes") else {})}
    except (ValueError, TypeError, KeyError):
        raise CnnpipeError(f"dataset manifest '{remote.join(location, MANIFEST_FILE)}': not JSON with image_size, "
                           f"channels and the counts of {', '.join(splits) or 'no split'}") from None
    for name, budget in budgets.items():
        (dest / name).write_bytes(remote.read_bytes(remote.join(location, name), max_bytes=budget))
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


FEW_VAL_IMAGES = 100  # below this, one validation image moves accuracy by more than a point


def few_val_images(n: int) -> str | None:
    """A note when the validation split is too small to choose train's kept epoch and evaluate's temperature reliably."""
    if n >= FEW_VAL_IMAGES:
        return None
    return (f"the validation split holds {n} images (< {FEW_VAL_IMAGES}): the kept epoch and the calibration temperature "
            f"rest on few images (one image = {100 / n:.1f} accuracy points); raise ingest.val_fraction or give more "
            f"val images")
