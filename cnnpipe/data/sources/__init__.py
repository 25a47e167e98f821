"""Dataset sources: each reads one layout users download and returns a `RawDataset`."""

from __future__ import annotations

from collections.abc import Callable

from cnnpipe.config import IngestConfig
from cnnpipe.data.raw import RawDataset
from cnnpipe.data.sources import cifar10, digits, gtsrb, imagefolder, pickle_files
from cnnpipe.errors import CnnpipeError

SOURCES: dict[str, Callable[[IngestConfig], RawDataset]] = {
    "digits": digits.load,
    "gtsrb": gtsrb.load,
    "cifar10": cifar10.load,
    "imagefolder": imagefolder.load,
    "pickle": pickle_files.load,
}


def load_source(cfg: IngestConfig) -> RawDataset:
    if cfg.source not in SOURCES:
        raise CnnpipeError(f"ingest.source: unknown dataset {cfg.source!r} (expected one of: {', '.join(SOURCES)})")
    return SOURCES[cfg.source](cfg)
