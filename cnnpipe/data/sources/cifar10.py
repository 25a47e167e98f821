"""CIFAR-10, python version: cifar-10-python.tar.gz or the extracted cifar-10-batches-py/.

Batches are pickles (read with the restricted unpickler): b"data" is uint8 N x 3072 in R, G, B planes
of 32 x 32, b"labels" a list of ints; batches.meta names the classes. test_batch is the official test.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from cnnpipe.config import IngestConfig
from cnnpipe.data.archive import FileTree
from cnnpipe.data.images import resize_batch
from cnnpipe.data.raw import Images, RawDataset
from cnnpipe.data.safe_pickle import safe_load
from cnnpipe.data.sources.common import input_record, open_tree, resolve
from cnnpipe.errors import CnnpipeError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def _member(tree: FileTree, base: str) -> str:
    found = [n for n in tree.names() if PurePosixPath(n).name == base]
    if not found:
        raise CnnpipeError(f"ingest.path '{tree.path}': no CIFAR-10 file '{base}' (expected cifar-10-batches-py/{base})")
    return found[0]


def _batch(tree: FileTree, base: str, num_classes: int, cfg: IngestConfig, bad: list[dict]) -> Images:
    name = _member(tree, base)
    d = safe_load(tree.read(name), f"{tree.path}:{name}")
    data, labels = (d.get(b"data"), d.get(b"labels")) if isinstance(d, dict) else (None, None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels is None or len(labels) != len(data):
        raise CnnpipeError(f"CIFAR-10 batch '{tree.path}:{name}': expected b'data' uint8 N x 3072 and N b'labels'")
    labels = np.asarray(labels, dtype=np.int64)
    ok = (labels >= 0) & (labels < num_classes)
    bad += [{"path": f"{tree.path}:{name}[{i}]", "error": f"label {labels[i]} outside the {num_classes} classes"}
            for i in np.flatnonzero(~ok)]
    images = data[ok].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Images(resize_batch(images, cfg.image_size, cfg.channels), labels[ok])


def load(cfg: IngestConfig) -> RawDataset:
    path = resolve(cfg.path, cfg, "path")
    tree = open_tree(path, cfg)
    meta_name = _member(tree, "batches.meta")
    meta = safe_load(tree.read(meta_name), f"{path}:{meta_name}")
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise CnnpipeError(f"CIFAR-10 metadata '{path}:{meta_name}': expected b'label_names'")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    bad: list[dict] = []
    parts = [_batch(tree, b, len(classes), cfg, bad) for b in TRAIN_BATCHES]
    test = _batch(tree, "test_batch", len(classes), cfg, bad)
    tree.close()
    pool = Images(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    return RawDataset(classes=classes, pool=pool, test=test, inputs=[input_record(path)],
                      files=len(pool.labels) + len(test.labels) + len(bad), bad_files=bad)
