"""What a source hands to the ingest stage, before splitting."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawDataset:
    classes: list[str]
    images: np.ndarray  # uint8 N x H x W x C, already at the configured image size and channels
    labels: np.ndarray  # int64 N
    inputs: list[dict] = field(default_factory=list)  # [{"path": ..., "sha256": ...}] of the files read
    bad_files: list[dict] = field(default_factory=list)  # [{"path": ..., "error": ...}]
