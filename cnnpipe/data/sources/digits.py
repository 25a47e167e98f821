"""scikit-learn's handwritten digits: 1,797 real 8x8 scans (16 gray levels), 10 classes, no download."""

from __future__ import annotations

from importlib import resources

import numpy as np

from cnnpipe.config import IngestConfig
from cnnpipe.data.images import resize_batch
from cnnpipe.data.raw import Images, RawDataset
from cnnpipe.fsio import file_digest


def load(cfg: IngestConfig) -> RawDataset:
    from sklearn.datasets import load_digits  # imported here: memory that other sources never need

    digits = load_digits()
    # 0..16 ink levels -> 0..255 gray, N x 8 x 8 x 1
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    data_file = resources.files("sklearn.datasets") / "data" / "digits.csv.gz"
    with resources.as_file(data_file) as p:
        inputs = [{"path": "sklearn/datasets/data/digits.csv.gz", "sha256": file_digest(p)}]
    return RawDataset(
        classes=[str(d) for d in range(10)],
        pool=Images(resize_batch(images, cfg.image_size, cfg.channels), digits.target.astype(np.int64)),
        inputs=inputs,
        files=len(images),
    )
