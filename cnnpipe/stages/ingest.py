"""ingest: a source's files -> the processed dataset (train/val/test, figures) + an ingest report.

Official splits are used as they come (a source's test set is `test`; a pickle set's valid.p is
`val`); whatever is missing is carved out of the training pool by a stratified, seeded split that
keeps groups (GTSRB tracks) whole.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

from cnnpipe.config import IngestConfig
from cnnpipe.data import figures, versioned
from cnnpipe.data.raw import RawDataset
from cnnpipe.data.sources import load_source
from cnnpipe.data.split import stratified_split
from cnnpipe.data.store import FIGURES_DIR, Split, cross_split_duplicates, write_dataset
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import ensure_writable_parent, write_json

FIGURES = ("class_distribution.png", "samples.png", "pixel_histogram.png")


def split_dataset(raw: RawDataset, cfg: IngestConfig) -> dict[str, Split]:
    fractions = {}
    if raw.val is None:
        fractions["val"] = cfg.val_fraction
    if raw.test is None:
        fractions["test"] = cfg.test_fraction
    idx = stratified_split(raw.pool.labels, fractions, cfg.seed, raw.groups)
    boxes = lambda im, i: None if im.boxes is None else im.boxes[i]  # noqa: E731
    take = lambda i: Split(raw.pool.images[i], raw.pool.labels[i], boxes(raw.pool, i))  # noqa: E731
    official = lambda im: Split(im.images, im.labels, im.boxes)  # noqa: E731
    return {
        "train": take(idx["train"]),
        "val": official(raw.val) if raw.val is not None else take(idx["val"]),
        "test": official(raw.test) if raw.test is not None else take(idx["test"]),
    }


def _figures(splits: dict[str, Split], classes: list[str]) -> dict[str, bytes]:
    pngs = [io.BytesIO() for _ in FIGURES]
    figures.class_distribution_png(splits, classes, pngs[0])
    figures.samples_png(splits["train"], classes, pngs[1])
    figures.pixel_histogram_png(splits["train"], pngs[2])
    return {f"{FIGURES_DIR}/{name}": png.getvalue() for name, png in zip(FIGURES, pngs)}


def run(*, cfg: IngestConfig, data: Path, report: Path) -> dict:
    """Read the source `cfg` names into the processed dataset `data`; the ingest report (counts, unusable
    files) goes to `report`, also when the stage fails on too many unusable files."""
    ensure_writable_parent(data)
    ensure_writable_parent(report)
    origin = None
    if cfg.dvc_repo:  # every input from one commit, even if the named branch moves meanwhile
        commit = versioned.resolve_commit(cfg.dvc_repo, cfg.dvc_rev)
        origin = {"repo": cfg.dvc_repo, "rev": cfg.dvc_rev, "commit": commit}
        cfg = dataclasses.replace(cfg, dvc_rev=commit)
    raw = load_source(cfg)
    bad_fraction = len(raw.bad_files) / max(raw.files, 1)
    summary = {"source": cfg.source, "files": raw.files, "bad_files": len(raw.bad_files),
               "bad_fraction": round(bad_fraction, 6), "classes": len(raw.classes)}
    if bad_fraction > cfg.max_bad_fraction:
        write_json(report, {**summary, "status": "failed", "bad_file_list": raw.bad_files})
        raise CnnpipeError(f"ingest: {len(raw.bad_files)} of {raw.files} files are unusable ({bad_fraction:.1%}), more "
                           f"than ingest.max_bad_fraction={cfg.max_bad_fraction}; the list is in '{report}'")
    if len(raw.pool.labels) == 0:
        raise CnnpipeError(f"ingest.source {cfg.source!r}: no usable images found")
    splits = split_dataset(raw, cfg)
    for name, s in splits.items():
        if len(s.labels) == 0:
            raise CnnpipeError(f"ingest: the {name} split is empty (check ingest.val_fraction / ingest.test_fraction)")
    duplicates = cross_split_duplicates(splits)
    train = splits["train"].images
    sharded = cfg.shards == "always" or (cfg.shards == "auto" and train.nbytes / 2**20 > cfg.shard_threshold_mb)
    manifest = write_dataset(data, raw.classes, splits, {
        "source": {"name": cfg.source, "path": cfg.path, "test_path": cfg.test_path, "inputs": raw.inputs,
                   "dvc": origin},
        "split": {"seed": cfg.seed, "val_fraction": None if raw.val is not None else cfg.val_fraction,
                  "test_fraction": None if raw.test is not None else cfg.test_fraction,
                  "official": [s for s, im in (("val", raw.val), ("test", raw.test)) if im is not None],
                  "grouped_by": "track" if raw.groups is not None else None},
        "resize": cfg.resize,  # serving resizes requests the same way (ModelSpec.resize)
        "bad_files": raw.bad_files,
        "duplicates_across_splits": duplicates,
        # whole frames are what a server receives: evaluate's served protocol needs them
        "whole_frames": not raw.cropped,
    }, extra_files=_figures(splits, raw.classes), shard_images=cfg.shard_images if sharded else None)
    summary |= {"images": int(sum(c["total"] for c in manifest["counts"].values())),
                "splits": {name: c["total"] for name, c in manifest["counts"].items()},
                "duplicates_across_splits": duplicates, **({"dvc": origin} if origin else {})}
    write_json(report, {**summary, "status": "ok", "bad_file_list": raw.bad_files, "counts": manifest["counts"]})
    if raw.bad_files:
        print(f"ingest: skipped {len(raw.bad_files)} unusable file(s) of {raw.files}; listed in '{report}'",
              file=sys.stderr)
    return summary
