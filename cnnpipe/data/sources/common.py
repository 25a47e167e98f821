"""What every file-based source needs: resolve a path or URL, hash inputs, decode while counting bad files."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnpipe.config import IngestConfig
from cnnpipe.data import versioned
from cnnpipe.data.archive import ArchiveLimits, FileTree, MemberRefused
from cnnpipe.data.decode import BadImage, decode
from cnnpipe.data.download import fetch, is_url
from cnnpipe.data.raw import Images
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest


def resolve(spec: str | None, cfg: IngestConfig, field: str, required: bool = True) -> Path | None:
    """A local path for params field `field`: fetched from the DVC repository when one is named, downloaded
    (and verified) first when it is a URL."""
    if spec is None:
        if required:
            raise CnnpipeError(f"ingest.{field}: required for source {cfg.source!r} (a file, folder or URL)")
        return None
    if cfg.dvc_repo:  # ingest.run has pinned dvc_rev to a commit
        return versioned.fetch(cfg.dvc_repo, cfg.dvc_rev, spec, Path(cfg.cache_dir), field)
    if is_url(spec):
        return fetch(spec, Path(cfg.cache_dir), cfg.sha256 if field == "path" else None)
    path = Path(spec)
    if not path.exists():
        raise CnnpipeError(f"ingest.{field}: '{path}' not found")
    return path


def input_record(path: Path) -> dict:
    """The input's identity for the manifest: a file's sha256, or a folder's hash over its files' hashes."""
    if path.is_file():
        return {"path": str(path), "sha256": file_digest(path)}
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_digest(p)}\n".encode())
    return {"path": str(path), "sha256": h.hexdigest(), "kind": "folder"}


def open_tree(path: Path, cfg: IngestConfig) -> FileTree:
    """A folder or archive, read within ingest's memory limits."""
    return FileTree(path, ArchiveLimits(cfg.max_member_mb, cfg.max_compression_ratio, cfg.max_total_mb))


@dataclass
class Entry:
    name: str  # path inside the tree
    label: int
    roi: tuple[float, float, float, float, float, float] | None = None  # see cnnpipe.data.decode.decode


def stored_box(roi: tuple[float, float, float, float, float, float], size: int) -> list[float]:
    """An inclusive (x1, y1, x2, y2, width, height) ROI -> its edges in a size x size copy of the image."""
    x1, y1, x2, y2, ref_w, ref_h = roi
    sx, sy = size / ref_w, size / ref_h
    return [max(0.0, x1 * sx), max(0.0, y1 * sy), min(size, (x2 + 1) * sx), min(size, (y2 + 1) * sy)]


def decode_entries(tree: FileTree, entries: Iterable[Entry], cfg: IngestConfig, bad: list[dict],
                   desc: str) -> tuple[Images, list[int]]:
    """Decode every entry; unusable files go to `bad`. Returns the images and the indices kept.

    Entries with a ROI are cropped to it when `cfg.roi_crop`; otherwise the whole frame is kept and
    the ROI becomes the image's box (when every entry has one).
    """
    entries = list(entries)
    out = np.empty((len(entries), cfg.image_size, cfg.image_size, cfg.channels), np.uint8)
    labels = np.empty(len(entries), np.int64)
    keep_boxes = not cfg.roi_crop and bool(entries) and all(e.roi is not None for e in entries)
    if keep_boxes and cfg.resize != "squash":  # a stored box is the ROI scaled with the whole frame
        raise CnnpipeError(f"ingest.resize {cfg.resize!r}: whole frames with their boxes (ingest.roi_crop: false) "
                           "are stored squashed; expected ingest.resize: squash")
    boxes = np.empty((len(entries), 4), np.float32)
    kept = []
    for i, e in enumerate(tqdm(entries, desc=desc, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())):
        try:
            out[len(kept)] = decode(tree.read(e.name), f"{tree.path}:{e.name}", cfg.image_size, cfg.channels,
                                    e.roi if cfg.roi_crop else None, cfg.resize)
        except (BadImage, MemberRefused) as err:
            bad.append({"path": f"{tree.path}:{e.name}", "error": str(err)})
            continue
        except OSError as err:
            bad.append({"path": f"{tree.path}:{e.name}", "error": f"unreadable: {err}"})
            continue
        labels[len(kept)] = e.label
        if keep_boxes:
            boxes[len(kept)] = stored_box(e.roi, cfg.image_size)
        kept.append(i)
    return Images(out[:len(kept)], labels[:len(kept)], boxes[:len(kept)] if keep_boxes else None), kept
