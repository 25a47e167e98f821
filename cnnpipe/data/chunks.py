"""Ingest's unit of work: a chunk of one split's images, decoded and summarized in a worker process.

The worker writes the chunk's pixels to the part file the dataset writer (store.DatasetWriter) named, so
only a summary travels back; the writer takes chunks in order, and nothing ever holds a whole split. The
summary is what the manifest and the figures need, so no pass over the whole data follows: per-channel
pixel histograms (mean/std, the pixel histogram figure), one digest per image (duplicates across splits)
and, when shards are written, the images PNG-encoded (the costly part of writing shards, done in parallel).
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.data.archive import MemberRefused
from cnnpipe.imaging import BadImage, decode
from cnnpipe.data.raw import Entries, Images
from cnnpipe.data.shards import encode_png

DIGEST_BYTES = 16
HIST_IMAGES = 256  # images per np.bincount call: bounds its int64 copy of the pixels


@dataclass(frozen=True)
class DecodeSpec:
    image_size: int
    channels: int
    roi_crop: bool
    resize: str
    pngs: bool  # also encode every image as its shard's PNG


@dataclass
class Chunk:
    images_sha256: str  # of the part file holding the usable images' pixels (uint8 n x H x W x C), in order
    labels: np.ndarray  # int64 n
    boxes: np.ndarray | None  # float32 n x 4
    bad: list[dict]  # [{"path": ..., "error": ...}] of the chunk's unusable files
    hist: np.ndarray  # int64 C x 256: how many pixels of each channel have each value
    digests: bytes  # n x DIGEST_BYTES: blake2b of each image's bytes
    pngs: list[bytes] | None  # each image as PNG, when shards are written


@dataclass
class ChunkJob:
    split: str
    index: int  # the chunk's place in its split
    images: Images | Entries  # decoded already (in-memory sources) or files to decode
    spec: DecodeSpec
    part: Path  # where the chunk's pixels go (DatasetWriter.images_part)


def stored_box(roi: tuple[float, float, float, float, float, float], size: int) -> list[float]:
    """An inclusive (x1, y1, x2, y2, width, height) ROI -> its edges in a size x size copy of the image."""
    x1, y1, x2, y2, ref_w, ref_h = roi
    sx, sy = size / ref_w, size / ref_h
    return [max(0.0, x1 * sx), max(0.0, y1 * sy), min(size, (x2 + 1) * sx), min(size, (y2 + 1) * sy)]


def summarize(images: np.ndarray, labels: np.ndarray, boxes: np.ndarray | None, bad: list[dict],
              pngs: bool, part: Path) -> Chunk:
    """Write the images' pixels to `part` and sum them up."""
    images = np.ascontiguousarray(images)
    images.tofile(part)
    c = images.shape[-1]
    hist = np.zeros((c, 256), np.int64)
    for start in range(0, len(images), HIST_IMAGES):
        flat = images[start:start + HIST_IMAGES].reshape(-1, c)
        for ch in range(c):
            hist[ch] += np.bincount(flat[:, ch], minlength=256)
    digests = b"".join(hashlib.blake2b(image, digest_size=DIGEST_BYTES).digest() for image in images)
    return Chunk(hashlib.sha256(images).hexdigest(), labels.astype(np.int64), None if boxes is None else boxes.astype(np.float32), bad, hist,
                 digests, [encode_png(image) for image in images] if pngs else None)


def decode_entries(entries: Entries, spec: DecodeSpec, part: Path) -> Chunk:
    """Decode a chunk's files; unusable ones are listed in the chunk's `bad`, named by tree and member."""
    n, size = len(entries.items), spec.image_size
    images = np.empty((n, size, size, spec.channels), np.uint8)
    labels = np.empty(n, np.int64)
    boxes = np.empty((n, 4), np.float32) if entries.keep_boxes else None
    bad, kept = [], 0
    for e in entries.items:
        where = f"{entries.tree.path}:{e.name}"
        try:
            images[kept] = decode(entries.tree.read(e.name), where, size, spec.channels,
                                  e.roi if spec.roi_crop else None, spec.resize)
        except (BadImage, MemberRefused) as err:
            bad.append({"path": where, "error": str(err)})
            continue
        except OSError as err:
            bad.append({"path": where, "error": f"unreadable: {err}"})
            continue
        labels[kept] = e.label
        if boxes is not None:
            boxes[kept] = stored_box(e.roi, size)
        kept += 1
    return summarize(images[:kept], labels[:kept], None if boxes is None else boxes[:kept], bad, spec.pngs, part)


def run_job(job: ChunkJob) -> Chunk:
    if isinstance(job.images, Entries):
        return decode_entries(job.images, job.spec, job.part)
    return summarize(job.images.images, job.images.labels, job.images.boxes, [], job.spec.pngs, job.part)


def run_chunks(jobs: Iterable[ChunkJob], workers: int) -> Iterator[tuple[ChunkJob, Chunk]]:
    """Each job with its chunk, in the jobs' order (so the output never depends on `workers`). With more
    than one worker, that many processes run the jobs, at most 2 per process in flight: memory is a few
    chunks whatever the dataset's size. Jobs are made as they are needed (a tar's bytes are read then)."""
    if workers <= 1:
        for job in jobs:
            yield job, run_job(job)
        return
    # spawn: a forked copy of a parent with threads (tqdm's monitor) may deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        in_flight = deque()
        for job in jobs:
            in_flight.append((job, pool.submit(run_job, job)))
            if len(in_flight) >= 2 * workers:
                done, future = in_flight.popleft()
                yield done, future.result()
        while in_flight:
            done, future = in_flight.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(cancel_futures=True)
