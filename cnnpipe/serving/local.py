"""Serve or batch-predict a registered model on this machine, with torch or, torch-free, with ONNX Runtime on the
ONNX graph `register` exported into the version."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm import tqdm

from cnnpipe.config import TrackingConfig, sqlite_path
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file, read_regular_file
from cnnpipe.imaging import IMAGE_SUFFIXES
from cnnpipe.serving.contract import RequestError, with_box
from cnnpipe.serving.onnx_runtime import ONNX_FILE

if TYPE_CHECKING:
    from cnnpipe.engine.predictor import Predictor
    from cnnpipe.serving.onnx_runtime import OnnxPredictor

Loaded = TypeVar("Loaded")

MAX_FILE_BYTES = 64 * 2**20  # an image file `predict` reads (a 4096 x 4096 RGB image uncompressed is 48 MiB)


def load_registered(tracking: TrackingConfig, model_uri: str, calibration_file: Path | None = None,
                    tta: bool = False, *, allow_unverified: bool = False) -> tuple[Predictor, int]:
    """The predictor of a model folder or registered model, loaded with cnnpipe's own code and verified (see
    cnnpipe.serving.trusted), and the top_k its signature declares as default; `calibration_file` (evaluate's)
    replaces the model's own calibration; `tta`: average over its flips."""
    from cnnpipe.serving import trusted

    return _from_registry(tracking, model_uri, lambda registry: trusted.load(registry, model_uri, calibration_file, tta,
                                                                       allow_unverified=allow_unverified))


def _from_registry(tracking: TrackingConfig, model_uri: str, load: Callable[[Any], Loaded]) -> Loaded:
    """load(Registry), with one clear line when nothing is registered."""
    from cnnpipe.tracking import NotRegistered, Registry

    hint = "run `dvc repro` to train and register one, or pass --model"
    db = sqlite_path(tracking.uri)
    if model_uri.startswith(("models:/", "runs:/")) and db is not None and not db.exists():  # MLflow would create an empty one
        raise CnnpipeError(f"no model registered yet (no MLflow store at '{db}'): {hint}")
    try:
        return load(Registry(tracking.uri))
    except NotRegistered as e:
        raise CnnpipeError(f"{e} ({hint})") from None


def load_model_file(tracking: TrackingConfig, model_uri: str, backend: str, folder: Path,
                    calibration_file: Path | None = None, tta: bool = False, *,
                    allow_unverified: bool = False) -> tuple[Predictor | OnnxPredictor, int, Path]:
    """(predictor of `backend`, default top_k, the file each server worker loads). onnxruntime: the ONNX graph the
    version carries (verified, copied into `folder`; torch is never imported), or, for a model without one or with
    another calibration, an export made now from torch. torch: a cnnpipe model file in `folder`."""
    graph = None
    if backend == "onnxruntime" and calibration_file is None:
        from cnnpipe.serving import trusted

        graph = _from_registry(tracking, model_uri, lambda registry: trusted.onnx_file(
            registry, model_uri, folder / ONNX_FILE, allow_unverified=allow_unverified))
        if graph is None:
            print(f"{model_uri} carries no ONNX graph (registered before export, or not exportable): exporting it "
                  "now with torch", file=sys.stderr)
    if graph is None:
        predictor, top_k = load_registered(tracking, model_uri, calibration_file, tta, allow_unverified=allow_unverified)
        if backend != "onnxruntime":
            from cnnpipe.engine.checkpoint import save_model

            save_model(folder / "model.pt", predictor.model, predictor.spec)
            return predictor, top_k, folder / "model.pt"
        from cnnpipe.serving.onnx_model import export_onnx

        graph = Path(export_onnx(predictor, top_k, folder / ONNX_FILE)["onnx"])
    from cnnpipe.serving.onnx_runtime import OnnxPredictor

    predictor = OnnxPredictor(graph, tta=tta)
    return predictor, predictor.top_k, graph


def _listed(csv_path: Path) -> list[tuple[Path, str | None]]:
    """The rows of a CSV of images: a `path` column (relative to the CSV's folder) and an optional `box`
    column ("x1 y1 x2 y2", pixel edges; empty = the whole image)."""
    with open(csv_path, newline="", errors="surrogateescape") as f:  # file names need not be UTF-8
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise CnnpipeError(f"'{csv_path}': expected a column 'path' (and optionally 'box'), got {reader.fieldnames}")
        return [(csv_path.parent / row["path"], (row.get("box") or "").strip() or None) for row in reader]


def _box(text: str | None, where: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.strip("[]").replace(",", " ").split()]
    except ValueError:
        raise CnnpipeError(f"{where}: box {text!r}: expected four numbers x1 y1 x2 y2") from None


def image_files(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """(image file, its box text or None) for every file, folder (searched recursively) and CSV of images."""
    files: list[tuple[Path, str | None]] = []
    for p in paths:
        if p.is_dir():
            files += [(q, None) for q in sorted(p.rglob("*")) if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file() and p.suffix.lower() == ".csv":
            files += _listed(p)
        elif p.is_file():
            files.append((p, None))
        else:
            raise CnnpipeError(f"'{p}' not found")
    if not files:
        raise CnnpipeError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def predict_files(predictor: Predictor | OnnxPredictor, paths: list[Path], output: Path, batch_size: int = 256) -> dict:
    """One CSV row per file: path, predicted class, index, confidence (or the error for an unreadable file or a
    bad box)."""
    files = image_files(paths)
    rows: list[list] = [[]] * len(files)  # in the order of `files` (a CSV may list one file twice)
    bad = 0
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", file=sys.stderr,
                      disable=not sys.stderr.isatty()):
        good, images = [], []
        for i in range(start, min(start + batch_size, len(files))):
            f, box = files[i]
            try:
                image = with_box(read_regular_file(f, MAX_FILE_BYTES), _box(box, str(f)), 0)
                images.append(predictor.decode([image])[0])
                good.append(i)
            except (CnnpipeError, RequestError, OSError) as e:
                rows[i] = [str(f), "", "", "", str(e).replace("image 0: ", "")]
                bad += 1
        if good:
            for i, p in zip(good, predictor.predict(np.stack(images), top_k=1)):
                rows[i] = [str(files[i][0]), p["predicted_class"], p["predicted_class_index"], f"{p['confidence']:.6f}", ""]
    # a file name that is not UTF-8 (its bytes decoded with surrogates) is written backslash-escaped
    with atomic_file(output) as tmp, open(tmp, "w", newline="", errors="backslashreplace") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "predicted_class", "predicted_class_index", "confidence", "error"])
        writer.writerows(rows)
    if bad == len(files):
        raise CnnpipeError(f"none of the {len(files)} file(s) could be predicted (the error column of '{output}' "
                           "says why)")
    if bad:
        print(f"predict: {bad} of {len(files)} file(s) could not be read (their rows carry the error)", file=sys.stderr)
    return {"files": len(files), "predicted": len(files) - bad, "unreadable": bad, "output": str(output)}
