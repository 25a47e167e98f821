"""What a source hands to the ingest stage, before splitting."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Images:
    images: np.ndarray  # uint8 N x H x W x C, at the configured image size and channels
    labels: np.ndarray  # int64 N
    boxes: np.ndarray | None = None  # float32 N x 4 (x1, y1, x2, y2): the object's box in the stored image's pixels


@dataclass
class RawDataset:
    classes: list[str]
    pool: Images  # what the split carves val (and test) out of
    groups: np.ndarray | None = None  # images sharing a group stay in one split (GTSRB: one physical sign)
    val: Images | None = None  # an official validation split, used as is
    test: Images | None = None  # an official test split, used as is
    inputs: list[dict] = field(default_factory=list)  # [{"path": ..., "sha256": ...}] of the files read
    files: int = 0  # image files (or records) seen, good and bad
    bad_files: list[dict] = field(default_factory=list)  # [{"path": ..., "error": ...}]
    cropped: bool = False  # the images are fixed crops to their boxes, not the whole frames a server gets
