"""ingest: a source's files -> the processed dataset (train/val/test, figures) + an ingest report.

Official splits are used as they come (a source's test set is `test`; a pickle set's valid.p is
`val`); whatever is missing is carved out of the training pool by a stratified, seeded split that
keeps groups (GTSRB tracks) whole. With shards, the carved splits are stored in a fixed random order
(so every shard holds every class); without, in the source's order.

Scale: a source only lists its images (names, labels, groups, ROIs); the split is made on those, then
chunks of `shard_images` images are decoded by `workers` processes, a few chunks in flight, and written
in order: memory does not grow with the dataset, and the output does not depend on `workers`. The work
happens in a staging directory beside the output with a journal of finished chunks, keyed by a
fingerprint of the config and inputs: a rerun after a kill keeps the chunks whose files are intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnpipe import __version__
from cnnpipe.config import IngestConfig
from cnnpipe.cores import available_cores
from cnnpipe.data import figures, versioned
from cnnpipe.data.chunks import ChunkJob, DecodeSpec, run_chunks
from cnnpipe.data.raw import Entries, Images, RawDataset
from cnnpipe.data.sources import load_source, resolve_source
from cnnpipe.data.split import stratified_split
from cnnpipe.data.store import FIGURES_DIR, FORMAT, IMAGES_FILE, LABELS_FILE, SPLITS, DatasetWriter, Split, write_files
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import ensure_writable_parent, staged_dir, write_json

FIGURES = ("class_distribution.png", "samples.png", "pixel_histogram.png")


def split_dataset(raw: RawDataset, cfg: IngestConfig, shuffled: bool) -> dict[str, tuple[Images | Entries, np.ndarray]]:
    """Each split as its images and the indices into them, in the order they are stored (`shuffled`: the
    carved splits in a fixed random order rather than sorted)."""
    fractions = {}
    if raw.val is None:
        fractions["val"] = cfg.val_fraction
    if raw.test is None:
        fractions["test"] = cfg.test_fraction
    idx = stratified_split(raw.pool.labels, fractions, cfg.seed, raw.groups)
    rng = np.random.default_rng(cfg.seed)
    carved = lambda name: (raw.pool, rng.permutation(idx[name]) if shuffled else idx[name])  # noqa: E731
    official = lambda im: (im, np.arange(len(im.labels)))  # noqa: E731
    return {
        "train": carved("train"),
        "val": official(raw.val) if raw.val is not None else carved("val"),
        "test": official(raw.test) if raw.test is not None else carved("test"),
    }


def fingerprint(cfg: IngestConfig, raw: RawDataset) -> str:
    """What the chunks depend on: the knobs that change the result, the inputs' hashes, the code's version."""
    knobs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata["affects_result"]}
    blob = json.dumps({"format": FORMAT, "version": __version__, "config": knobs, "inputs": raw.inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _figures(out: Path, classes: list[str], manifest: dict, train_hist: np.ndarray) -> dict[str, bytes]:
    """The figures, from the counts and histograms the chunks carried and a few memory-mapped samples."""
    train = Split(np.load(out / IMAGES_FILE.format(split="train"), mmap_mode="r"),
                  np.load(out / LABELS_FILE.format(split="train")))
    pngs = [io.BytesIO() for _ in FIGURES]
    figures.class_distribution_png({name: list(c["per_class"].values()) for name, c in manifest["counts"].items()},
                                   classes, pngs[0])
    figures.samples_png(train, classes, pngs[1])
    figures.pixel_histogram_png(train_hist, len(train.labels), pngs[2])
    return {f"{FIGURES_DIR}/{name}": png.getvalue() for name, png in zip(FIGURES, pngs)}


def run(*, cfg: IngestConfig, data: Path, report: Path) -> dict:
    """Read the source `cfg` names into the processed dataset `data`; the ingest report (counts, unusable
    files) goes to `report`, also when the stage fails on too many unusable files."""
    started = time.monotonic()
    ensure_writable_parent(data)
    ensure_writable_parent(report)
    origin = None
    if cfg.dvc_repo:  # every input from one commit, even if the named branch moves meanwhile
        commit = versioned.resolve_commit(cfg.dvc_repo, cfg.dvc_rev)
        origin = {"repo": cfg.dvc_repo, "rev": cfg.dvc_rev, "commit": commit}
        cfg = dataclasses.replace(cfg, dvc_rev=commit)
    cfg, detected = resolve_source(cfg)  # auto: the source the path holds, and why
    raw = load_source(cfg)
    for warning in raw.warnings:
        print(f"ingest: warning: {warning}", file=sys.stderr)
    if len(raw.pool.labels) == 0:
        raise CnnpipeError(f"ingest.source {cfg.source!r}: no usable images found")
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    pool_mb = len(raw.pool.labels) * int(np.prod(shape)) / 2**20  # decided on the files listed, before decoding
    train_fraction = 1 - (cfg.val_fraction if raw.val is None else 0) - (cfg.test_fraction if raw.test is None else 0)
    sharded = cfg.shards == "always" or (cfg.shards == "auto" and pool_mb * train_fraction > cfg.shard_threshold_mb)
    plan = split_dataset(raw, cfg, shuffled=sharded)
    for name, (_, order) in plan.items():
        if len(order) == 0:
            raise CnnpipeError(f"ingest: the {name} split is empty (check ingest.val_fraction / ingest.test_fraction)")
    spec = DecodeSpec(cfg.image_size, cfg.channels, cfg.roi_crop, cfg.resize, pngs=sharded)
    pool = raw.pool
    boxes = pool.keep_boxes if isinstance(pool, Entries) else pool.boxes is not None
    step = cfg.shard_images
    chunks = [(name, k, source, order[start:start + step]) for name, (source, order) in plan.items()
              for k, start in enumerate(range(0, len(order), step))]
    workers = cfg.workers or available_cores()

    with staged_dir(data, fingerprint(cfg, raw)) as staging:
        writer = DatasetWriter(staging.root, raw.classes, SPLITS, shape, boxes, step if sharded else None)
        latest = {(r["split"], r["index"]): r for r in staging.records}  # a chunk redone is journaled again
        reused = {key for key, r in latest.items() if writer.keep(r)}
        jobs = (ChunkJob(name, k, source.take(index), spec, writer.images_part(name, k))
                for name, k, source, index in chunks if (name, k) not in reused)
        total, done = sum(len(c[3]) for c in chunks), sum(len(c[3]) for c in chunks if c[:2] in reused)
        with tqdm(total=total, initial=done, desc="ingest", unit="img", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            for job, chunk in run_chunks(jobs, workers):
                staging.record(writer.add(job.split, job.index, chunk))
                bar.update(len(job.images.labels))

        bad_files = raw.bad_files + writer.bad_files()
        bad_fraction = len(bad_files) / max(raw.files, 1)
        summary = {"source": cfg.source, **({"source_detected_from": detected} if detected else {}),
                   **({"layout": raw.layout} if raw.layout else {}), "files": raw.files, "bad_files": len(bad_files),
                   "bad_fraction": round(bad_fraction, 6), "skipped_files": len(raw.skipped_files),
                   "classes": len(raw.classes), **({"warnings": raw.warnings} if raw.warnings else {})}
        lists = {"bad_file_list": bad_files, "skipped_file_list": raw.skipped_files}
        if bad_fraction > cfg.max_bad_fraction:
            staging.discard()
            write_json(report, {**summary, "status": "failed", **lists})
            raise CnnpipeError(f"ingest: {len(bad_files)} of {raw.files} files are unusable ({bad_fraction:.1%}), more "
                               f"than ingest.max_bad_fraction={cfg.max_bad_fraction}; the list is in '{report}'")
        duplicates = writer.duplicates()
        manifest = writer.finish({
            "source": {"name": cfg.source, "path": cfg.path, "test_path": cfg.test_path, "inputs": raw.inputs,
                       "dvc": origin},
            "split": {"seed": cfg.seed, "val_fraction": None if raw.val is not None else cfg.val_fraction,
                      "test_fraction": None if raw.test is not None else cfg.test_fraction,
                      "official": [s for s, im in (("val", raw.val), ("test", raw.test)) if im is not None],
                      "grouped_by": "track" if raw.groups is not None else None},
            "resize": cfg.resize,  # serving resizes requests the same way (ModelSpec.resize)
            "bad_files": bad_files,
            "duplicates_across_splits": duplicates,
            # whole frames are what a server receives: evaluate's served protocol needs them
            "whole_frames": not raw.cropped,
        })
        for name, c in manifest["counts"].items():
            if c["total"] == 0:
                staging.discard()
                raise CnnpipeError(f"ingest: the {name} split is empty: none of its files is usable (see '{report}')")
        train_hist = np.sum([r["hist"] for r in writer.records["train"]], axis=0)
        write_files(staging.out, _figures(staging.out, raw.classes, manifest, train_hist))

    images = int(sum(c["total"] for c in manifest["counts"].values()))
    summary |= {"images": images, "splits": {name: c["total"] for name, c in manifest["counts"].items()},
                "duplicates_across_splits": duplicates, **({"dvc": origin} if origin else {})}
    write_json(report, {**summary, "status": "ok", **lists, "counts": manifest["counts"]})
    if bad_files:
        print(f"ingest: skipped {len(bad_files)} unusable file(s) of {raw.files}; listed in '{report}'", file=sys.stderr)
    if raw.skipped_files:
        print(f"ingest: skipped {len(raw.skipped_files)} file(s) outside the dataset (not images, or images outside "
              f"class folders); listed in '{report}'", file=sys.stderr)
    seconds = time.monotonic() - started
    return {**summary, "workers": workers, "chunks": len(chunks), "chunks_reused": len(reused),
            "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)}
