"""Dataset sources: each reads one layout users download and returns a `RawDataset`.

`ingest.source: auto` tells the source from `ingest.path`: digits when there is none; else what the path
holds (tutorial pickles, a CIFAR-10 archive, GTSRB's annotated layout, an image folder).
"""

from __future__ import annotations

import dataclasses
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from cnnpipe.config import IngestConfig
from cnnpipe.data.raw import RawDataset
from cnnpipe.data.sources import cifar10, digits, gtsrb, imagefolder, pickle_files
from cnnpipe.data.sources.common import resolve
from cnnpipe.errors import CnnpipeError
from cnnpipe.imaging import IMAGE_SUFFIXES

SOURCES: dict[str, Callable[[IngestConfig], RawDataset]] = {
    "digits": digits.load,
    "gtsrb": gtsrb.load,
    "cifar10": cifar10.load,
    "imagefolder": imagefolder.load,
    "pickle": pickle_files.load,
}
AUTO = "auto"
PATHLESS = ("digits",)  # sources that read no files: a path given with one is a mistake


def _names(path: Path) -> list[str]:
    """The files under a folder or in an archive (names only: nothing is read)."""
    if path.is_dir():
        return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [i.filename for i in z.infolist() if not i.is_dir()]
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            return [m.name for m in t if m.isfile()]
    return [path.name]


def detect(path: Path) -> tuple[str, str]:
    """(source, why) for the files at `path`, or a one-line CnnpipeError saying what was expected."""
    if path.is_file() and path.suffix.lower() in (".p", ".pkl", ".pickle"):
        return "pickle", f"'{path.name}' is a pickle file"
    names = _names(path)
    bases = {PurePosixPath(n).name: n for n in names}
    if "train.p" in bases:
        return "pickle", f"'{bases['train.p']}' (a tutorial's pickled traffic signs)"
    if "batches.meta" in bases and "data_batch_1" in bases:
        return "cifar10", f"'{bases['batches.meta']}' and data_batch_* (CIFAR-10, python version)"
    annotations = sorted(b for b in bases if b.startswith("GT-0") and b.endswith(".csv"))
    if annotations:
        return "gtsrb", f"GTSRB annotations ('{bases[annotations[0]]}', {len(annotations)} in all)"
    images = sum(n.lower().endswith(IMAGE_SUFFIXES) for n in names)
    if images:
        return "imagefolder", f"{images} image files"
    raise CnnpipeError(f"ingest.path '{path}': cannot tell the dataset: expected an image folder, a GTSRB layout "
                       "(GT-000NN.csv), a CIFAR-10 archive (batches.meta) or tutorial pickles (train.p); "
                       f"or set ingest.source ({', '.join(SOURCES)})")


def resolve_source(cfg: IngestConfig) -> tuple[IngestConfig, str | None]:
    """`cfg` with its source decided (auto: detected), and why it was chosen (None: set in params)."""
    if cfg.source in PATHLESS and (cfg.path or cfg.test_path):
        given = "ingest.path" if cfg.path else "ingest.test_path"
        raise CnnpipeError(f"{given} '{cfg.path or cfg.test_path}' given with ingest.source {cfg.source}, which "
                           f"reads no files; expected ingest.source auto (or the dataset's source) or no path")
    if cfg.source != AUTO:
        if cfg.source not in SOURCES:
            raise CnnpipeError(f"ingest.source: unknown dataset {cfg.source!r} (expected one of: "
                               f"{', '.join([AUTO, *SOURCES])})")
        return cfg, None
    if cfg.path is None:
        if cfg.test_path:
            raise CnnpipeError(f"ingest.test_path '{cfg.test_path}' given without ingest.path; expected both (or neither: "
                               "the embedded digits)")
        return dataclasses.replace(cfg, source="digits"), "no ingest.path: the embedded digits"
    source, why = detect(resolve(cfg.path, cfg, "path"))
    return dataclasses.replace(cfg, source=source), why


def load_source(cfg: IngestConfig) -> RawDataset:
    """The dataset `cfg.source` names (a decided source: see `resolve_source`)."""
    return SOURCES[cfg.source](cfg)
