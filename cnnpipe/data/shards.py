"""The streaming form of a processed dataset: each split as WebDataset tar shards.

    <dir>/shards/<split>-000000.tar, <split>-000001.tar, ...   listed, with counts and sha256, in the manifest
    each sample: <index>.png       the stored image (image_size x image_size, 1 or 3 channels), lossless
                 <index>.cls       its label, a decimal integer
                 <index>.box.json  [x1, y1, x2, y2], only when the dataset has boxes
    <index> is the image's place in the split's arrays; the samples are in a fixed random order

Why WebDataset tar shards: a shard is a plain tar (any tool lists or extracts it, DVC tracks it as a file),
webdataset, torchdata and the FFCV/litdata converters read it as is, and a reader needs nothing but
sequential reads of whole objects: no index server, no random access, so s3:// and plain http(s) serve it.
Why PNG of the stored image rather than the source's original bytes: the pixels are exactly those of the
in-memory arrays (the device and stream paths train on the same data), and resizing happens once at ingest
instead of in every epoch's decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnpipe import remote
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest

SHARDS_DIR = "shards"
SHARD_NAME = "{split}-{index:06d}.tar"
IMAGE_EXT, LABEL_EXT, BOX_EXT = "png", "cls", "box.json"
SHARD_ORDER_SEED = 0
BLOCK = tarfile.BLOCKSIZE
EMPTY_BLOCK = bytes(BLOCK)
PNG_LEVEL = 1  # zlib level: encoding speed dominates ingest; decoding speed barely depends on it
# zlib's run-length strategy: "almost as fast as Huffman-only, better compression for PNG image data" (zlib
# manual); on photos faster and smaller than the default strategy, the same on digits
PNG_STRATEGY = zlib.Z_RLE


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the dataset directory
    count: int
    sha256: str


@dataclass
class DecodedShard:
    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N
    boxes: np.ndarray | None  # float32 N x 4
    indexes: np.ndarray  # int64 N: each image's place in the split's arrays (the sample's key)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=PNG_LEVEL, compress_type=PNG_STRATEGY)
    return buf.getvalue()


def write_shard(directory: Path, split: str, index: int, first: int, pngs: list[bytes], labels: np.ndarray,
                boxes: np.ndarray | None) -> dict[str, Any]:
    """Write shard `index` of a split, holding its images `first`, `first` + 1, ... (PNG-encoded), under
    `directory`/shards; its manifest entry. The tar is reproducible (fixed mtime and owner, fixed order):
    the same data gives the same sha256."""
    (directory / SHARDS_DIR).mkdir(exist_ok=True)
    name = f"{SHARDS_DIR}/{SHARD_NAME.format(split=split, index=index)}"
    # Samples in a fixed random order; ingest stores a split in a fixed random order too (not sorted by
    # class), so a shard holds every class and shard shuffling plus the shuffle buffer mix batches as the
    # device path's permutation does. Keys stay the array indexes.
    order = np.random.default_rng(SHARD_ORDER_SEED).permutation(len(labels))
    # the tar webdataset.TarWriter(mtime=0, user="", group="") writes, with the standard library: importing
    # webdataset imports torch (hundreds of MB of resident memory), which ingest otherwise never needs
    with tarfile.open(directory / name, "w") as tar:
        for i in order:
            sample = {IMAGE_EXT: pngs[i], LABEL_EXT: str(int(labels[i])).encode()}
            if boxes is not None:
                sample[BOX_EXT] = json.dumps([float(v) for v in boxes[i]]).encode()
            for ext in sorted(sample):
                info = tarfile.TarInfo(f"{first + i:09d}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[ext]), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(sample[ext]))
    return {"file": name, "count": len(labels), "sha256": file_digest(directory / name)}


def shard_list(manifest: dict[str, Any], split: str, where: str) -> list[Shard]:
    """The shards of `split` the manifest lists; one line naming `where` when it lists none."""
    entries = (manifest.get("shards") or {}).get(split)
    if not entries:
        raise CnnpipeError(f"dataset '{where}': no shards of the {split} split (ingest with ingest.shards: always, "
                           f"then augment, writes them)")
    return [Shard(e["file"], int(e["count"]), e["sha256"]) for e in entries]


def read_shard(base: remote.Location, shard: Shard, *, shape: tuple[int, int, int], num_classes: int,
               boxes: bool) -> DecodedShard:
    """Fetch, verify (sha256 from the manifest) and decode one shard; every problem is one line naming it."""
    import torch  # here, not at the top: ingest and the dataset store load without torch (seconds of start-up)
    from torchvision.io import decode_png

    where = remote.join(base, shard.file)
    try:
        data = remote.read_bytes(where)
    except CnnpipeError as e:
        raise CnnpipeError(f"shard {e} (listed in the dataset's manifest)") from None
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise CnnpipeError(f"shard '{where}': sha256 does not match the manifest's (truncated or changed; "
                           f"re-run ingest)")
    try:
        samples = _samples(data)
    except (tarfile.TarError, EOFError, ValueError) as e:
        raise CnnpipeError(f"shard '{where}': not a readable tar of samples: {e}") from None
    if len(samples) != shard.count:
        raise CnnpipeError(f"shard '{where}': {len(samples)} samples, the manifest says {shard.count}")
    out_images = np.empty((len(samples), *shape), np.uint8)
    out_labels = np.empty(len(samples), np.int64)
    out_boxes = np.empty((len(samples), 4), np.float32) if boxes else None
    out_indexes = np.empty(len(samples), np.int64)
    for i, (key, fields) in enumerate(samples):
        missing = [ext for ext in (IMAGE_EXT, LABEL_EXT) + ((BOX_EXT,) if boxes else ()) if ext not in fields]
        if missing:
            raise CnnpipeError(f"shard '{where}': sample {key} has no {', '.join('.' + m for m in missing)} file")
        try:
            # torchvision's libpng call: a fifth less time per image than PIL's (bytearray: a writable buffer)
            image = decode_png(torch.frombuffer(bytearray(fields[IMAGE_EXT]), dtype=torch.uint8)).permute(1, 2, 0).numpy()
            label = int(fields[LABEL_EXT])
            out_indexes[i] = int(key)
            if boxes:
                out_boxes[i] = json.loads(fields[BOX_EXT])
        except (RuntimeError, ValueError, TypeError) as e:
            raise CnnpipeError(f"shard '{where}': sample {key} cannot be decoded: {e}") from None
        if image.shape != shape:
            raise CnnpipeError(f"shard '{where}': sample {key} is {image.shape}, expected {shape}")
        if not 0 <= label < num_classes:
            raise CnnpipeError(f"shard '{where}': sample {key} has label {label}, outside 0..{num_classes - 1}")
        out_images[i], out_labels[i] = image, label
    return DecodedShard(out_images, out_labels, out_boxes, out_indexes)


def _samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """The tar's files grouped by key (the name up to its first dot), in order, as WebDataset groups them.
    Plain ustar members, all write_shards writes, are read here: tarfile takes longer per sample than decoding
    its PNG does. Header checksums are not summed (read_shard has checked the shard's sha256). Anything else
    (pax or GNU headers, links, a cut member) sends the whole archive through tarfile, which reads or
    rejects it."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    at = 0
    while at + BLOCK <= len(data):
        header = data[at:at + BLOCK]
        if header == EMPTY_BLOCK:  # the end-of-archive marker
            return samples
        size_field = header[124:136].strip(b" \0")
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0" \
                or not size_field.isdigit():
            break
        size = int(size_field, 8)
        if at + BLOCK + size > len(data):
            break
        _add(samples, header[:100].split(b"\0", 1)[0].decode(), data[at + BLOCK:at + BLOCK + size])
        at += BLOCK + -(-size // BLOCK) * BLOCK
    return _tarfile_samples(data)


def _tarfile_samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isreg():
                _add(samples, member.name, tar.extractfile(member).read())
    return samples


def _add(samples: list[tuple[str, dict[str, bytes]]], name: str, body: bytes) -> None:
    key, _, ext = name.rpartition("/")[2].partition(".")
    if not samples or samples[-1][0] != key:
        samples.append((key, {}))
    samples[-1][1][ext] = body
