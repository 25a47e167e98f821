"""What a source hands to the ingest stage, before splitting: decoded arrays (small in-memory sources) or
image files enumerated but not decoded yet (ingest decodes them chunk by chunk, in parallel)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cnnpipe.data.archive import ChunkMembers, FileTree


@dataclass
class Images:
    images: np.ndarray  # uint8 N x H x W x C, at the configured image size and channels
    labels: np.ndarray  # int64 N
    boxes: np.ndarray | None = None  # float32 N x 4 (x1, y1, x2, y2): the object's box in the stored image's pixels

    def take(self, index: np.ndarray) -> Images:
        return Images(self.images[index], self.labels[index], None if self.boxes is None else self.boxes[index])


@dataclass
class Entry:
    name: str  # path inside the tree
    label: int
    roi: tuple[float, float, float, float, float, float] | None = None  # see cnnpipe.imaging.decode


@dataclass
class Entries:
    """Image files of a tree, not decoded yet. With `keep_boxes`, every entry's ROI becomes its stored box
    (whole frames); otherwise an entry with a ROI is cropped to it (ingest.roi_crop)."""

    tree: FileTree | ChunkMembers
    items: list[Entry]
    keep_boxes: bool = False

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((e.label for e in self.items), np.int64, len(self.items))

    def take(self, index: np.ndarray) -> Entries:
        items = [self.items[i] for i in index]
        return Entries(self.tree.for_chunk([e.name for e in items]), items, self.keep_boxes)


@dataclass
class RawDataset:
    classes: list[str]
    pool: Images | Entries  # what the split carves val (and test) out of
    groups: np.ndarray | None = None  # images sharing a group stay in one split (GTSRB: one physical sign)
    val: Images | Entries | None = None  # an official validation split, used as is
    test: Images | Entries | None = None  # an official test split, used as is
    inputs: list[dict] = field(default_factory=list)  # [{"path": ..., "sha256": ...}] of the files read
    files: int = 0  # image files (or records) seen, good and bad
    bad_files: list[dict] = field(default_factory=list)  # [{"path": ..., "error": ...}]
    cropped: bool = False  # the images are fixed crops to their boxes, not the whole frames a server gets
    skipped_files: list[dict] = field(default_factory=list)  # [{"path": ..., "reason": ...}]: files not images
    warnings: list[str] = field(default_factory=list)  # for the user, in the report and on stderr
    layout: str | None = None  # how the source's folders were read (imagefolder: class or split folders)
