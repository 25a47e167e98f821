"""Load a logged or registered model with cnnpipe's installed code: the model's folder is data, never code.

An MLflow pyfunc folder carries Python (the model code file, and a copy of cnnpipe under code/) that
`mlflow.pyfunc.load_model` imports. Here only these files are read from it: MLmodel (YAML: where the
weights, the calibration and the ONNX graph are, the default top_k), the weights (`torch.load(weights_only=True)`)
and the calibration (JSON: the temperature), or, for the torch-free ONNX Runtime path, the ONNX graph `register`
exported (its metadata holds the spec and calibration). `register` records the sha256 of the weights, the
calibration, the ONNX graph and the code files as version tags; a version whose files no longer match them is
refused. This module imports torch only to load the torch model.

A bare model folder from `cnnpipe train` (model.pt, no MLmodel) loads too, uncalibrated (T = 1): its
calibration is in the evaluation folder, which the caller may pass (`--calibration`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpipe import calibration
from cnnpipe.calibration import UNCALIBRATED, Calibration
from cnnpipe.engine.model_folder import MODEL_FILE
from cnnpipe.errors import CnnpipeError
from cnnpipe.tracking import Registry
from cnnpipe.verified_model import ONNX, ONNX_TAG, artifact_path, fetch, read_mlmodel, weights_file

if TYPE_CHECKING:
    from cnnpipe.engine.predictor import Predictor

DEFAULT_TOP_K = 5  # a model folder without a signature to say otherwise


def calibration_of(folder: Path) -> Calibration:
    """The calibration packaged with the model (a version registered before calibration existed: T = 1)."""
    path = artifact_path(folder, calibration.ARTIFACT)
    return Calibration.read(path) if path is not None else UNCALIBRATED


def default_top_k(folder: Path) -> int:
    params = (read_mlmodel(folder).get("signature") or {}).get("params")
    try:
        found = [p.get("default") for p in json.loads(params or "[]") if p.get("name") == "top_k"]
        return int(found[0]) if found else DEFAULT_TOP_K
    except (ValueError, TypeError, AttributeError):
        raise CnnpipeError(f"model folder '{folder}': MLmodel's signature params are not readable") from None


def load(registry: Registry, model_uri: str, calibration_file: Path | None = None, tta: bool = False, *,
         allow_unverified: bool = False) -> tuple[Predictor, int]:
    """The predictor of `model_uri` (an MLflow model folder, a train folder or any model URI, verified by `fetch`)
    and its default top_k. The model's own calibration applies unless `calibration_file` (evaluate's) is given;
    `tta`: average over its flips."""
    from cnnpipe.engine.predictor import Predictor  # torch

    override = Calibration.read(calibration_file) if calibration_file is not None else None
    if Path(model_uri).is_dir() and not (Path(model_uri) / "MLmodel").exists() \
            and (Path(model_uri) / MODEL_FILE).is_file():  # a bare train folder: no calibration of its own
        return (Predictor.from_file(Path(model_uri) / MODEL_FILE, calibration=override or UNCALIBRATED, tta=tta),
                DEFAULT_TOP_K)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        folder = fetch(registry, model_uri, Path(tmp), allow_unverified=allow_unverified).folder
        return (Predictor.from_file(weights_file(folder), calibration=override or calibration_of(folder), tta=tta),
                default_top_k(folder))


def onnx_file(registry: Registry, model_uri: str, dst: Path, *, allow_unverified: bool = False) -> Path | None:
    """The ONNX graph `register` exported into `model_uri` (an MLflow model folder or any model URI), verified
    by `fetch` and copied to `dst`; None when the model carries none (a bare train folder, a version registered
    before export or whose model could not be exported)."""
    if Path(model_uri).is_dir() and not (Path(model_uri) / "MLmodel").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        fetched = fetch(registry, model_uri, Path(tmp), allow_unverified=allow_unverified)
        found = artifact_path(fetched.folder, ONNX)
        if found is None or (fetched.version is not None and ONNX_TAG not in fetched.version.tags):
            return None  # never a graph its version does not vouch for
        shutil.copyfile(found, dst)
    return dst
