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

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cnnpipe import calibration
from cnnpipe.calibration import UNCALIBRATED, Calibration
from cnnpipe.engine.model_folder import MODEL_FILE
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest
from cnnpipe.tracking import Registry

if TYPE_CHECKING:
    from cnnpipe.engine.predictor import Predictor

WEIGHTS_TAG = "cnnpipe.weights_sha256"
CALIBRATION_TAG = "cnnpipe.calibration_sha256"
CODE_TAG = "cnnpipe.code_sha256"  # over every code file the folder carries (what `mlflow models serve` runs)
ONNX_TAG = "cnnpipe.onnx_sha256"
CHECKPOINT = "checkpoint"  # the pyfunc's artifact key of the weights
ONNX = "onnx"  # ... of the ONNX graph (serving/onnx_runtime.py); absent when the model could not be exported
DEFAULT_TOP_K = 5  # a model folder without a signature to say otherwise


def _mlmodel(folder: Path) -> dict:
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CnnpipeError(f"model folder '{folder}': no readable MLmodel file ({e})") from None
    return meta if isinstance(meta, dict) else {}


def _artifact(folder: Path, key: str) -> Path | None:
    """The file the MLmodel file names as artifact `key` (None: it names none), which must lie inside `folder`."""
    artifacts = (_mlmodel(folder).get("flavors") or {}).get("python_function", {}).get("artifacts") or {}
    rel = (artifacts.get(key) or {}).get("path")
    if not rel:
        return None
    path = (folder / str(rel)).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise CnnpipeError(f"model folder '{folder}': MLmodel's artifact {key!r} is not a file inside it")
    return path


def weights_file(folder: Path) -> Path:
    """The weights the MLmodel file names."""
    path = _artifact(folder, CHECKPOINT)
    if path is None:
        raise CnnpipeError(f"model folder '{folder}': MLmodel names no weights file (artifact {CHECKPOINT!r}) inside it")
    return path


def calibration_of(folder: Path) -> Calibration:
    """The calibration packaged with the model (a version registered before calibration existed: T = 1)."""
    path = _artifact(folder, calibration.ARTIFACT)
    return Calibration.read(path) if path is not None else UNCALIBRATED


def code_digest(folder: Path) -> str:
    """One sha256 over the code files (code/**, *.py beside MLmodel): their paths and contents."""
    files = sorted([*folder.glob("*.py"), *(p for p in (folder / "code").rglob("*") if p.is_file())])
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def digests(folder: Path) -> dict[str, str]:
    """The tags `register` records for a logged model folder."""
    optional = ((CALIBRATION_TAG, _artifact(folder, calibration.ARTIFACT)), (ONNX_TAG, _artifact(folder, ONNX)))
    return {WEIGHTS_TAG: file_digest(weights_file(folder)), CODE_TAG: code_digest(folder),
            **{tag: file_digest(path) for tag, path in optional if path is not None}}


def _verify(folder: Path, expected: dict[str, str], where: str) -> None:
    if WEIGHTS_TAG not in expected:  # registered before the tags existed: say so, still load safely
        print(f"warning: {where} has no recorded sha256 (registered by an older cnnpipe): not verified", file=sys.stderr)
        return
    got = digests(folder)
    for tag, what in ((WEIGHTS_TAG, "weights"), (CALIBRATION_TAG, "calibration"), (CODE_TAG, "code files"),
                      (ONNX_TAG, "ONNX graph")):
        if tag in expected and got.get(tag) != expected[tag]:
            found = f"{got[tag][:12]}..." if tag in got else "(file absent)"
            raise CnnpipeError(f"{where}: {what} sha256 {found} does not match the {expected[tag][:12]}... "
                               f"recorded at registration (tampered or corrupted artifact); refusing to load it")


def default_top_k(folder: Path) -> int:
    params = (_mlmodel(folder).get("signature") or {}).get("params")
    try:
        found = [p.get("default") for p in json.loads(params or "[]") if p.get("name") == "top_k"]
        return int(found[0]) if found else DEFAULT_TOP_K
    except (ValueError, TypeError, AttributeError):
        raise CnnpipeError(f"model folder '{folder}': MLmodel's signature params are not readable") from None


def load(registry: Registry, model_uri: str, calibration_file: Path | None = None,
         tta: bool = False) -> tuple[Predictor, int]:
    """The predictor of `model_uri` (an MLflow model folder, a train folder, models:/<name>/<version>,
    models:/<name>@<alias>, any model URI) and its default top_k; a registered version's files are verified
    against its tags. The model's own calibration applies unless `calibration_file` (evaluate's) is given;
    `tta`: average over its flips."""
    from cnnpipe.engine.predictor import Predictor  # torch

    override = Calibration.read(calibration_file) if calibration_file is not None else None
    if Path(model_uri).is_dir() and not (Path(model_uri) / "MLmodel").exists() \
            and (Path(model_uri) / MODEL_FILE).is_file():  # a bare train folder: no calibration of its own
        return (Predictor.from_file(Path(model_uri) / MODEL_FILE, calibration=override or UNCALIBRATED, tta=tta),
                DEFAULT_TOP_K)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        folder, expected, where = registry.model_files(model_uri, Path(tmp))
        if expected is not None:
            _verify(folder, expected, where)
        return (Predictor.from_file(weights_file(folder), calibration=override or calibration_of(folder), tta=tta),
                default_top_k(folder))


def onnx_file(registry: Registry, model_uri: str, dst: Path) -> Path | None:
    """The ONNX graph `register` exported into `model_uri` (an MLflow model folder or any model URI), verified
    against the version's tags and copied to `dst`; None when the model carries none (a bare train folder, a
    version registered before export or whose model could not be exported)."""
    if Path(model_uri).is_dir() and not (Path(model_uri) / "MLmodel").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        folder, expected, where = registry.model_files(model_uri, Path(tmp))
        if expected is not None:
            _verify(folder, expected, where)
        found = _artifact(folder, ONNX)
        if found is None or (expected is not None and ONNX_TAG not in expected):  # never an unverified graph
            return None
        shutil.copyfile(found, dst)
    return dst
