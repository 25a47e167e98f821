"""Loading a registered model runs cnnpipe's installed code only, and checks the weights the registry recorded."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
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


@contextlib.contextmanager
def flipped_weights(ws: Path) -> Iterator[None]:
    """The registered version's weights in the store with one bit flipped, for the block."""
    weights = next(model_folder(ws).rglob("model.pt"))
    original = weights.read_bytes()
    tampered = bytearray(original)
    tampered[-10] ^= 0x01
    weights.write_bytes(bytes(tampered))
    try:
        yield
    finally:
        weights.write_bytes(original)


def test_tampered_weights_in_the_store_are_refused(workspace, tmp_path):
    ws, record = workspace
    with flipped_weights(ws):
        for args in (["predict", str(images(tmp_path)), "--model", f"models:/{MODEL_NAME}/{record['version']}",
                      "--output", str(tmp_path / "p.csv")],
                     ["promote", "--version", record["version"], "--force"]):
            proc = cnnpipe(*args, cwd=ws)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "sha256" in lines[0] and "weights" in lines[0], proc.stderr
        assert not (tmp_path / "p.csv").exists()
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


def every_address(ws: Path, record: dict) -> list[str]:
    """Each form a user (or `register`'s own output) may give for the registered version."""
    return [f"models:/{MODEL_NAME}/{record['version']}", f"models:/{MODEL_NAME}@champion",
            f"models:/{MODEL_NAME}/latest", f"models:/{MODEL_NAME}/None", record["logged_model_uri"],
            f"runs:/{record['run_id']}/model"]


def test_every_model_address_resolves_to_its_version_and_is_verified(workspace, tmp_path):
    """models:/ in every form and runs:/ load the version's files after checking them; flipped weights are refused
    whichever address names them, by serving and by `train.pretrained` alike."""
    from cnnpipe.config import TrackingConfig
    from cnnpipe.errors import CnnpipeError
    from cnnpipe.engine.pretrained import load_pretrained
    from cnnpipe.serving import trusted
    from cnnpipe.tracking import Registry

    ws, record = workspace
    registry = Registry(f"sqlite:///{ws / 'mlflow.db'}")
    for uri in every_address(ws, record):
        assert str(registry.resolve(uri).version) == record["version"], uri
        trusted.load(registry, uri)
    with flipped_weights(ws):
        for uri in every_address(ws, record):
            with pytest.raises(CnnpipeError, match="weights sha256 .* does not match"):
                trusted.load(registry, uri, allow_unverified=True)  # a mismatch is never allowed
            with pytest.raises(CnnpipeError, match="weights sha256"):
                load_pretrained(uri, "mlp", TrackingConfig(uri=registry.uri), allow_unverified=True)
        proc = cnnpipe("predict", str(images(tmp_path)), "--model", record["logged_model_uri"],
                       "--output", str(tmp_path / "p.csv"), cwd=ws)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "weights sha256" in proc.stderr


def test_a_version_missing_a_digest_tag_is_refused_unless_allowed(workspace, tmp_path):
    ws, record = workspace
    from cnnpipe.tracking import Registry

    registry = Registry(f"sqlite:///{ws / 'mlflow.db'}")
    saved = registry.client.get_model_version(MODEL_NAME, record["version"]).tags["cnnpipe.weights_sha256"]
    registry.client.delete_model_version_tag(MODEL_NAME, record["version"], "cnnpipe.weights_sha256")
    try:
        base = ["predict", str(images(tmp_path)), "--model", f"runs:/{record['run_id']}/model",
                "--output", str(tmp_path / "p.csv")]
        proc = cnnpipe(*base, cwd=ws)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "cnnpipe.weights_sha256 is missing" in lines[0] and "--allow-unverified" in lines[0]
        assert not (tmp_path / "p.csv").exists()
        proc = cnnpipe(*base, "--allow-unverified", cwd=ws)
        assert proc.returncode == 0, proc.stderr
        assert "not verified" in proc.stderr
    finally:
        registry.tag_version(MODEL_NAME, record["version"], {"cnnpipe.weights_sha256": saved})


def test_a_model_no_version_holds_is_unverifiable(workspace):
    """A run's path no version was registered from: nothing vouches for its files."""
    from cnnpipe.errors import CnnpipeError
    from cnnpipe.tracking import Registry
    from cnnpipe.verified_model import fetch

    ws, record = workspace
    registry = Registry(f"sqlite:///{ws / 'mlflow.db'}")
    assert registry.resolve(f"runs:/{record['run_id']}/evaluate") is None
    with pytest.raises(CnnpipeError, match="no registered version holds it.*--allow-unverified"):
        fetch(registry, f"runs:/{record['run_id']}/evaluate", Path(registry.uri[10:]).parent / "x")
    with pytest.raises(CnnpipeError, match="expected models:/<name>/<version>"):
        registry.resolve(f"models:/{MODEL_NAME}/1/extra")
