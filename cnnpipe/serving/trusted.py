"""Load a logged or registered model with cnnpipe's installed code: the model's folder is data, never code.

An MLflow pyfunc folder carries Python (the model code file, and a copy of cnnpipe under code/) that
`mlflow.pyfunc.load_model` imports. Here only two files are read from it: MLmodel (YAML: where the
weights are, the default top_k) and the weights (`torch.load(weights_only=True)`). `register` records
the sha256 of the weights and of the code files as version tags; a version whose files no longer
match them is refused.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import yaml

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest
from cnnpipe.serving.predictor import Predictor
from cnnpipe.tracking import Registry

WEIGHTS_TAG = "cnnpipe.weights_sha256"
CODE_TAG = "cnnpipe.code_sha256"  # over every code file the folder carries (what `mlflow models serve` runs)
CHECKPOINT = "checkpoint"  # the pyfunc's artifact key of the weights


def _mlmodel(folder: Path) -> dict:
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CnnpipeError(f"model folder '{folder}': no readable MLmodel file ({e})") from None
    return meta if isinstance(meta, dict) else {}


def weights_file(folder: Path) -> Path:
    """The weights the MLmodel file names, which must lie inside `folder`."""
    artifacts = (_mlmodel(folder).get("flavors") or {}).get("python_function", {}).get("artifacts") or {}
    rel = (artifacts.get(CHECKPOINT) or {}).get("path")
    path = (folder / str(rel)).resolve() if rel else None
    if path is None or not path.is_relative_to(folder.resolve()) or not path.is_file():
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
    return {WEIGHTS_TAG: file_digest(weights_file(folder)), CODE_TAG: code_digest(folder)}


def _verify(folder: Path, expected: dict[str, str], where: str) -> None:
    if WEIGHTS_TAG not in expected:  # registered before the tags existed: say so, still load safely
        print(f"warning: {where} has no recorded sha256 (registered by an older cnnpipe): not verified", file=sys.stderr)
        return
    got = digests(folder)
    for tag, what in ((WEIGHTS_TAG, "weights"), (CODE_TAG, "code files")):
        if tag in expected and got[tag] != expected[tag]:
            raise CnnpipeError(f"{where}: {what} sha256 {got[tag][:12]}... does not match the {expected[tag][:12]}... "
                               f"recorded at registration (tampered or corrupted artifact); refusing to load it")


def default_top_k(folder: Path) -> int:
    params = (_mlmodel(folder).get("signature") or {}).get("params")
    try:
        found = [p.get("default") for p in json.loads(params or "[]") if p.get("name") == "top_k"]
        return int(found[0]) if found else 5
    except (ValueError, TypeError, AttributeError):
        raise CnnpipeError(f"model folder '{folder}': MLmodel's signature params are not readable") from None


def load(registry: Registry, model_uri: str) -> tuple[Predictor, int]:
    """The predictor of `model_uri` (a model folder, models:/<name>/<version>, models:/<name>@<alias>, any
    model URI) and its default top_k; a registered version's files are verified against its tags."""
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        folder, expected, where = registry.model_files(model_uri, Path(tmp))
        if expected is not None:
            _verify(folder, expected, where)
        return Predictor.from_file(weights_file(folder)), default_top_k(folder)
