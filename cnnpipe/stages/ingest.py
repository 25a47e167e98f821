"""ingest: a source's files -> the processed dataset (train/val/test) + an ingest report."""

from __future__ import annotations

from pathlib import Path

from cnnpipe.config import IngestConfig
from cnnpipe.data.sources import load_source
from cnnpipe.data.split import stratified_split
from cnnpipe.data.store import SPLITS, Split, cross_split_duplicates, write_dataset
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import ensure_writable_parent, write_json


def run(cfg: IngestConfig, out: Path, report: Path) -> dict:
    ensure_writable_parent(out)
    ensure_writable_parent(report)
    raw = load_source(cfg)
    if len(raw.labels) == 0:
        raise CnnpipeError(f"ingest.source {cfg.source!r}: no images found")
    idx = stratified_split(raw.labels, {"val": cfg.val_fraction, "test": cfg.test_fraction}, cfg.seed)
    splits = {name: Split(raw.images[idx[name]], raw.labels[idx[name]]) for name in SPLITS}
    if len(splits["train"].labels) == 0:
        raise CnnpipeError("ingest: the train split is empty (lower ingest.val_fraction / ingest.test_fraction)")
    duplicates = cross_split_duplicates(splits)
    manifest = write_dataset(out, raw.classes, splits, {
        "source": {"name": cfg.source, "path": cfg.path, "inputs": raw.inputs},
        "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction},
        "bad_files": raw.bad_files,
        "duplicates_across_splits": duplicates,
    })
    summary = {
        "source": cfg.source,
        "images": int(len(raw.labels)),
        "classes": len(raw.classes),
        "splits": {name: c["total"] for name, c in manifest["counts"].items()},
        "bad_files": len(raw.bad_files),
        "duplicates_across_splits": duplicates,
    }
    write_json(report, {**summary, "bad_file_list": raw.bad_files, "counts": manifest["counts"]})
    return summary
