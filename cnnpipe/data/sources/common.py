"""What every file-based source needs: resolve a path or URL, hash inputs, list the entries to decode."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cnnpipe.config import IngestConfig
from cnnpipe.data import versioned
from cnnpipe.data.archive import ArchiveLimits, FileTree
from cnnpipe.data.download import fetch, is_url
from cnnpipe.data.raw import Entries, Entry
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
        return fetch(spec, Path(cfg.cache_dir), cfg.sha256 if field == "path" else None,
                     max_bytes=int(cfg.max_total_mb * 2**20), deadline_s=cfg.download_deadline_s)
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
        # os.fsencode: a name that is not UTF-8 hashes as its bytes (UTF-8 names as before)
        h.update(os.fsencode(p.relative_to(path).as_posix()) + f"\0{file_digest(p)}\n".encode())
    return {"path": str(path), "sha256": h.hexdigest(), "kind": "folder"}


def open_tree(path: Path, cfg: IngestConfig) -> FileTree:
    """A folder or archive, read within ingest's memory limits."""
    return FileTree(path, ArchiveLimits(cfg.max_member_mb, cfg.max_compression_ratio, cfg.max_total_mb,
                                          cfg.max_members))


def pending(tree: FileTree, entries: list[Entry], cfg: IngestConfig) -> Entries:
    """The entries to decode (ingest decodes them chunk by chunk). Entries with a ROI are cropped to it when
    `cfg.roi_crop`; otherwise the whole frame is kept and the ROI becomes the image's box (when every entry
    has one)."""
    keep_boxes = not cfg.roi_crop and bool(entries) and all(e.roi is not None for e in entries)
    if keep_boxes and cfg.resize != "squash":  # a stored box is the ROI scaled with the whole frame
        raise CnnpipeError(f"ingest.resize {cfg.resize!r}: whole frames with their boxes (ingest.roi_crop: false) "
                           "are stored squashed; expected ingest.resize: squash")
    return Entries(tree, entries, keep_boxes)
