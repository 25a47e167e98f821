"""Loading a registered model runs cnnpipe's installed code only, and checks the weights the registry recorded."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cnnpipe
from tests.registered import MODEL_NAME, make_workspace, train_and_register

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict]:
    ws = make_workspace(tmp_path_factory.mktemp("trust"))
    return ws, train_and_register(ws)


def model_folder(ws: Path) -> Path:
    """The registered version's artifact folder in the store (mlartifacts/models/<id>/artifacts)."""
    (folder,) = (ws / "mlartifacts/models").glob("*/artifacts")
    return folder


def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def test_registered_version_records_its_hashes(workspace):
    ws, record = workspace
    db = sqlite3.connect(ws / "mlflow.db")
    tags = dict(db.execute("select key, value from model_version_tags where name=? and version=?",
                           (MODEL_NAME, int(record["version"]))).fetchall())
    weights = next(model_folder(ws).rglob("model.pt"))
    import hashlib

    assert tags["cnnpipe.weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert len(tags["cnnpipe.code_sha256"]) == 64


@pytest.mark.parametrize("target", ["pyfunc_model.py", "code/cnnpipe/serving/pyfunc.py",
                                    "code/cnnpipe/__init__.py"])
def test_code_added_to_a_copied_model_folder_never_runs(workspace, tmp_path, target):
    ws, _ = workspace
    copy = tmp_path / "model"
    shutil.copytree(model_folder(ws), copy)
    marker = tmp_path / "pwned"
    with open(copy / target, "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "predictions.csv"
    proc = cnnpipe("predict", str(images(tmp_path)), "--model", str(copy), "--output", str(out), cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["predicted"] == 2
    assert not marker.exists(), f"code from {target} ran on load"


def test_tampered_weights_in_the_store_are_refused(workspace, tmp_path):
    ws, record = workspace
    weights = next(model_folder(ws).rglob("model.pt"))
    original = weights.read_bytes()
    try:
        tampered = bytearray(original)
        tampered[-10] ^= 0x01
        weights.write_bytes(bytes(tampered))
        for args in (["predict", str(images(tmp_path)), "--model", f"models:/{MODEL_NAME}/{record['version']}",
                      "--output", str(tmp_path / "p.csv")],
                     ["promote", "--version", record["version"], "--force"]):
            proc = cnnpipe(*args, cwd=ws)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "sha256" in lines[0] and "weights" in lines[0], proc.stderr
        assert not (tmp_path / "p.csv").exists()
    finally:
        weights.write_bytes(original)
    proc = cnnpipe("predict", str(images(tmp_path)), "--output", str(tmp_path / "p.csv"), cwd=ws)
    assert proc.returncode == 0, proc.stderr


def test_tampered_calibration_in_the_store_is_refused(workspace, tmp_path):
    """The temperature changes every served confidence: its file is hashed at registration like the weights."""
    ws, record = workspace
    calibration = next(model_folder(ws).rglob("calibration.json"))
    original = calibration.read_text()
    try:
        calibration.write_text(json.dumps({**json.loads(original), "temperature": 0.05}))
        proc = cnnpipe("predict", str(images(tmp_path)), "--model", f"models:/{MODEL_NAME}/{record['version']}",
                       "--output", str(tmp_path / "p.csv"), cwd=ws)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "calibration sha256" in lines[0], proc.stderr
    finally:
        calibration.write_text(original)
