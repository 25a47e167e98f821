"""A logged or registered model's folder, fetched and verified: the digests `register` records, and their check.

`register` records the sha256 of the weights, the calibration and the code files of the folder it logged as
tags of the version. `fetch` resolves any model address (models:/ in any form, runs:/; see
tracking.Registry.resolve) to the version holding the files, downloads them and checks them against those
tags: files that differ are always refused; a version missing a tag, or a URI no version holds, only loads
when the caller allows unverified models (--allow-unverified), with a warning. Serving, predict, export,
deploy, explain and `train.pretrained` all load through here. Only MLmodel (YAML) is parsed; nothing in the
folder runs.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnnpipe import calibration
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest
from cnnpipe.tracking import Registry

WEIGHTS_TAG = "cnnpipe.weights_sha256"
CALIBRATION_TAG = "cnnpipe.calibration_sha256"
CODE_TAG = "cnnpipe.code_sha256"  # over every code file the folder carries (what `mlflow models serve` runs)
ONNX_TAG = "cnnpipe.onnx_sha256"  # the ONNX graph register exported (optional: a model may not export)
CHECKPOINT = "checkpoint"  # the pyfunc's artifact key of the weights
ONNX = "onnx"  # ... of the ONNX graph (serving/onnx_runtime.py); absent when the model could not be exported


def read_mlmodel(folder: Path) -> dict:
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CnnpipeError(f"model folder '{folder}': no readable MLmodel file ({e})") from None
    return meta if isinstance(meta, dict) else {}


def artifact_path(folder: Path, key: str) -> Path | None:
    """The file the MLmodel file names as artifact `key` (None: it names none), which must lie inside `folder`."""
    artifacts = (read_mlmodel(folder).get("flavors") or {}).get("python_function", {}).get("artifacts") or {}
    rel = (artifacts.get(key) or {}).get("path")
    if not rel:
        return None
    path = (folder / str(rel)).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        raise CnnpipeError(f"model folder '{folder}': MLmodel's artifact {key!r} is not a file inside it")
    return path


def weights_file(folder: Path) -> Path:
    """The weights the MLmodel file names."""
    path = artifact_path(folder, CHECKPOINT)
    if path is None:
        raise CnnpipeError(f"model folder '{folder}': MLmodel names no weights file (artifact {CHECKPOINT!r}) inside it")
    return path


def code_digest(folder: Path) -> str:
    """One sha256 over the code files (code/**, *.py beside MLmodel): their paths and contents."""
    files = sorted([*folder.glob("*.py"), *(p for p in (folder / "code").rglob("*") if p.is_file())])
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def digests(folder: Path) -> dict[str, str]:
    """The tags `register` records for a logged model folder."""
    optional = ((CALIBRATION_TAG, artifact_path(folder, calibration.ARTIFACT)), (ONNX_TAG, artifact_path(folder, ONNX)))
    return {WEIGHTS_TAG: file_digest(weights_file(folder)), CODE_TAG: code_digest(folder),
            **{tag: file_digest(path) for tag, path in optional if path is not None}}


REQUIRED_TAGS = {WEIGHTS_TAG: "weights", CALIBRATION_TAG: "calibration", CODE_TAG: "code files"}
UNVERIFIED_HINT = "pass --allow-unverified to load it anyway"


def _verify(folder: Path, version: Any | None, where: str, allow_unverified: bool) -> None:
    """Check the folder's files against the sha256 tags `register` recorded on `version`. Files that differ are
    always refused; a model nothing vouches for (no registered version, or a version missing a tag: registered by an
    older cnnpipe, or the tag deleted) only with `allow_unverified`, and a warning."""
    missing = [tag for tag in REQUIRED_TAGS if version is None or tag not in version.tags]
    if missing:
        why = "no registered version holds it" if version is None else f"its tag {missing[0]} is missing"
        if not allow_unverified:
            raise CnnpipeError(f"{where}: cannot be verified ({why}); refusing to load it ({UNVERIFIED_HINT})")
        print(f"warning: {where}: not verified ({why}): loading it as --allow-unverified asks", file=sys.stderr)
    got = digests(folder)
    for tag, what in {**REQUIRED_TAGS, ONNX_TAG: "ONNX graph"}.items():
        if version is not None and tag in version.tags and got.get(tag) != version.tags[tag]:
            found = f"{got[tag][:12]}..." if tag in got else "(file absent)"
            raise CnnpipeError(f"{where}: {what} sha256 {found} does not match the {version.tags[tag][:12]}... "
                               f"recorded at registration (tampered or corrupted artifact); refusing to load it")


@dataclass(frozen=True)
class Fetched:
    """A model's verified folder, the registered version holding it (None: unverified) and its name for messages."""

    folder: Path
    version: Any | None
    where: str


def fetch(registry: Registry, model_uri: str, dst: Path, *, allow_unverified: bool = False) -> Fetched:
    """The folder of `model_uri` (any model or run URI, or an MLflow model folder), downloaded into `dst` and
    verified against the version that holds it (see `_verify`). A local path (folder or file) is the caller's own
    and loads as it is."""
    folder, version, where = registry.model_files(model_uri, dst)
    if version is not None or not Path(model_uri).exists():
        _verify(folder, version, where, allow_unverified)
    return Fetched(folder, version, where)
