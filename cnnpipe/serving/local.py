"""Serve or batch-predict a registered model on this machine."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnpipe.config import TrackingConfig
from cnnpipe.data.decode import IMAGE_SUFFIXES
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file
from cnnpipe.serving.predictor import Predictor
from cnnpipe.serving.server import Backend


def load_registered(tracking: TrackingConfig, model_uri: str) -> tuple[Predictor, int]:
    """The predictor of a model folder or registered model, loaded with cnnpipe's own code (see
    cnnpipe.serving.trusted), and the top_k its signature declares as default."""
    from cnnpipe.serving import trusted
    from cnnpipe.tracking import Registry

    return trusted.load(Registry(tracking.uri), model_uri)


def predictor_backend(predictor: Predictor, default_top_k: int) -> Backend:
    return lambda images, top_k: predictor.predict(predictor.preprocess(images), top_k or default_top_k)


def image_files(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise CnnpipeError(f"'{p}' not found")
    if not files:
        raise CnnpipeError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def predict_files(predictor: Predictor, paths: list[Path], output: Path, batch_size: int = 256) -> dict:
    """One CSV row per file: path, predicted class, index, confidence (or the error for an unreadable file)."""
    files = image_files(paths)
    rows, bad = [], 0
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", file=sys.stderr,
                      disable=not sys.stderr.isatty()):
        chunk = files[start:start + batch_size]
        good, images = [], []
        for f in chunk:
            try:
                images.append(predictor.preprocess([f.read_bytes()])[0])
                good.append(f)
            except (CnnpipeError, OSError) as e:
                rows.append([str(f), "", "", "", str(e).replace("image 0: ", "")])
                bad += 1
        if good:
            for f, p in zip(good, predictor.predict(np.stack(images), top_k=1)):
                rows.append([str(f), p["predicted_class"], p["predicted_class_index"], f"{p['confidence']:.6f}", ""])
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[r[0]])
    with atomic_file(output) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "predicted_class", "predicted_class_index", "confidence", "error"])
        writer.writerows(rows)
    if bad:
        print(f"predict: {bad} of {len(files)} file(s) could not be read (their rows carry the error)", file=sys.stderr)
    return {"files": len(files), "predicted": len(files) - bad, "unreadable": bad, "output": str(output)}
