"""The pickled traffic-sign sets of the classic tutorials: train.p, valid.p, test.p.

Each is a dict with `features` (uint8 N x 32 x 32 x 3) and `labels` (N ints), read with the
restricted unpickler. valid.p and test.p, when present beside train.p, are the official splits.
Class names come from signnames.csv (ClassId,SignName) beside them, else GTSRB's when there are 43.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cnnpipe.config import IngestConfig
from cnnpipe.data.archive import MiB
from cnnpipe.data.images import resize_batch
from cnnpipe.data.raw import Images, RawDataset
from cnnpipe.data.safe_pickle import safe_load
from cnnpipe.data.sources import gtsrb
from cnnpipe.data.sources.common import input_record, resolve
from cnnpipe.errors import CnnpipeError


def _read(path: Path, cfg: IngestConfig) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    if size > cfg.max_member_mb * MiB:  # read whole into memory: the same budget as an archive member
        raise CnnpipeError(f"pickle '{path}': {size / MiB:.0f} MiB, over ingest.max_member_mb={cfg.max_member_mb:g}")
    d = safe_load(path.read_bytes(), str(path))
    features = d.get("features") if isinstance(d, dict) else None
    labels = d.get("labels") if isinstance(d, dict) else None
    if not isinstance(features, np.ndarray) or features.dtype != np.uint8 or features.ndim not in (3, 4) \
            or labels is None or len(labels) != len(features):
        raise CnnpipeError(f"pickle '{path}': expected a dict with 'features' (uint8 N x H x W [x C]) and N 'labels'")
    if features.ndim == 3:
        features = features[..., None]
    return features, np.asarray(labels, dtype=np.int64)


def _class_names(folder: Path, num_classes: int) -> list[str]:
    names_file = folder / "signnames.csv"
    if names_file.exists():
        rows = list(csv.DictReader(io.StringIO(names_file.read_text())))
        try:
            names = {int(r["ClassId"]): r["SignName"] for r in rows}
        except (KeyError, ValueError):
            raise CnnpipeError(f"'{names_file}': expected columns ClassId,SignName") from None
        return [names.get(i, str(i)) for i in range(max(num_classes, max(names, default=-1) + 1))]
    if num_classes <= len(gtsrb.CLASSES) and num_classes > 10:
        return list(gtsrb.CLASSES)
    return [str(i) for i in range(num_classes)]


def load(cfg: IngestConfig) -> RawDataset:
    path = resolve(cfg.path, cfg, "path")
    folder = path if path.is_dir() else path.parent
    train_file = path if path.is_file() else folder / "train.p"
    if not train_file.exists():
        raise CnnpipeError(f"ingest.path '{path}': no train.p")
    splits = {"train": _read(train_file, cfg)}
    for split, base in (("val", "valid.p"), ("test", "test.p")):
        if (folder / base).exists():
            splits[split] = _read(folder / base, cfg)
    max_label = max(int(lab.max(initial=-1)) for _, lab in splits.values())
    classes = _class_names(folder, max_label + 1)
    bad: list[dict] = []
    images: dict[str, Images] = {}
    for split, (x, y) in splits.items():
        ok = (y >= 0) & (y < len(classes))
        bad += [{"path": f"{folder}/{split}[{i}]", "error": f"label {y[i]} outside the {len(classes)} classes"}
                for i in np.flatnonzero(~ok)]
        images[split] = Images(resize_batch(x[ok], cfg.image_size, cfg.channels), y[ok])
    files = sum(len(y) for _, y in splits.values())
    inputs = [input_record(folder / f) for f in ("train.p", "valid.p", "test.p", "signnames.csv") if (folder / f).exists()]
    return RawDataset(classes=classes, pool=images["train"], val=images.get("val"), test=images.get("test"),
                      inputs=inputs, files=files, bad_files=bad)
