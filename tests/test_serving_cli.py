"""`cnnpipe serve`, `export onnx` and `predict` as users run them, on a model registered here by the real
register stage in a SQLite store of its own; MLflow's scoring path on the same registered model."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnpipe.calibration import Calibration
from cnnpipe.config import RegisterConfig, TrackingConfig
from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.engine.predictor import Predictor
from cnnpipe.fsio import write_json
from cnnpipe.models import build_model
from cnnpipe.serving.onnx_runtime import OnnxPredictor
from cnnpipe.tracking import Tracker
from tests.helpers import REPO, cnnpipe, free_port, user_env, wait_for_http, write_tiny_dataset

pytestmark = pytest.mark.e2e
NAME = "tiny-signs"
TEMPERATURE = 2.5  # the registered model's calibration: every serving path must answer softmax(logits / T)
FLIPS = {"hflip": [1, 0, 2], "vflip": [-1, -1, -1]}  # as the policy would say: 0 <-> 1 swap, 2 keeps


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """params.yaml, a tiny dataset and model, and that model registered as champion of NAME."""
    from cnnpipe.stages import register

    ws = tmp_path_factory.mktemp("ws")
    tracking = TrackingConfig(uri=f"sqlite:///{ws / 'mlflow.db'}", experiment="serving")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {"uri": tracking.uri, "experiment": tracking.experiment}
    params["register"]["model_name"] = NAME
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    data = write_tiny_dataset(ws / "data/processed", classes=3, size=16, channels=3)
    spec = ModelSpec("cnn3", 8, 3, 3, 16, ["class0", "class1", "class2"], [0.4] * 3, [0.3] * 3)
    save_model(ws / "data/model/model.pt", build_model("cnn3", 3, 3, 16, 8), spec)
    Tracker.start(tracking, "serving-test", {}).write_run_file(ws / "data/model")
    # the untrained model stands in for a good one: its recorded scores pass register's quality gate
    write_json(ws / "data/evaluation/metrics.json", {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.9}})
    write_json(ws / "data/evaluation/calibration.json", {"temperature": TEMPERATURE, "flips": FLIPS})
    register.run(cfg=RegisterConfig(model_name=NAME), model=ws / "data/model", data=data,
                 evaluation=ws / "data/evaluation", record=ws / "data/registered.json", tracking=tracking)
    return ws


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12 + i, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_serve_without_a_registered_model_says_how_to_get_one(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = cnnpipe("serve", "--port", str(free_port()), cwd=tmp_path)
    assert proc.returncode == 2 and "dvc repro" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists() and not proc.stdout


def test_serve_help_names_the_limits(tmp_path):
    out = cnnpipe("serve", "--help", cwd=tmp_path).stdout
    for flag in ("--workers", "--backend", "--max-body-bytes", "--max-pixels", "--max-pending", "--header-timeout",
                 "--body-timeout"):
        assert flag in out


def serve(ws: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(["cnnpipe", "serve", "--port", str(port), *flags], cwd=ws, env=user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/ping", proc, seconds=180)
    return proc, port


def predictions(port: int, body: bytes) -> list[dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/invocations?top_k=3", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return json.loads(response.read())["predictions"]


def stop(proc: subprocess.Popen) -> dict:
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return json.loads(stdout)


def test_torch_and_onnxruntime_backends_answer_alike(workspace):
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in images(6)]}).encode()
    answers = {}
    for backend, workers in (("torch", "1"), ("onnxruntime", "2")):
        proc, port = serve(workspace, "--backend", backend, "--workers", workers)
        try:
            answers[backend] = predictions(port, body)
        finally:
            assert stop(proc) == {"served": f"models:/{NAME}@champion", "backend": backend, "workers": int(workers),
                                  "temperature": TEMPERATURE, "tta": False, "stopped": True}
    want = calibrated_probabilities(workspace, images(6), TEMPERATURE)
    for t, o, w in zip(answers["torch"], answers["onnxruntime"], want):
        assert t["predicted_class"] == o["predicted_class"]
        assert [c["index"] for c in t["top_k"]] == [c["index"] for c in o["top_k"]]
        assert np.allclose([c["probability"] for c in t["top_k"]], [c["probability"] for c in o["top_k"]], atol=1e-5)
        assert np.allclose([c["probability"] for c in t["top_k"]], w[[c["index"] for c in t["top_k"]]], atol=1e-5)


def test_serve_tta_averages_over_the_packaged_flips_on_both_backends(workspace):
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in images(5)]}).encode()
    local = Predictor.from_file(workspace / "data/model/model.pt", calibration=Calibration(TEMPERATURE, FLIPS), tta=True)
    want = local.predict(local.decode(images(5)), 3)
    for backend in ("torch", "onnxruntime"):
        proc, port = serve(workspace, "--backend", backend, "--tta")
        try:
            answers = predictions(port, body)
        finally:
            assert stop(proc)["tta"] is True
        for a, w in zip(answers, want):
            assert [c["index"] for c in a["top_k"]] == [c["index"] for c in w["top_k"]], backend
            assert np.allclose([c["probability"] for c in a["top_k"]], [c["probability"] for c in w["top_k"]],
                               atol=1e-5), backend


def calibrated_probabilities(ws: Path, encoded: list[bytes], t: float) -> np.ndarray:
    """softmax(logits / t) of the trained model file, computed here from its raw logits."""
    import torch

    from cnnpipe.engine.inference import predict_logits, to_nchw_uint8

    plain = Predictor.from_file(ws / "data/model/model.pt")
    x = to_nchw_uint8(plain.decode(encoded), plain.device)
    return torch.softmax(predict_logits(plain.model, x, plain.mean, plain.std).double() / t, 1).numpy()


def test_registered_version_packages_and_tags_its_temperature(workspace):
    import sqlite3

    from cnnpipe.serving.local import load_registered

    tracking = TrackingConfig(uri=f"sqlite:///{workspace / 'mlflow.db'}")
    predictor, _ = load_registered(tracking, f"models:/{NAME}@champion")
    assert predictor.calibration.temperature == TEMPERATURE
    record = json.loads((workspace / "data/registered.json").read_text())
    assert record["temperature"] == TEMPERATURE
    db = sqlite3.connect(workspace / "mlflow.db")
    tags = dict(db.execute("select key, value from model_version_tags where name=? and version=?",
                           (NAME, int(record["version"]))).fetchall())
    assert float(tags["cnnpipe.temperature"]) == TEMPERATURE and len(tags["cnnpipe.calibration_sha256"]) == 64


def test_predict_on_a_bare_train_folder_is_uncalibrated_unless_given_a_calibration(workspace, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, data in enumerate(images(4)):
        (folder / f"{i}.png").write_bytes(data)
    confidences = {}
    for name, flags in (("registered", []), ("bare", ["--model", "data/model"]),
                        ("bare+calibration", ["--model", "data/model", "--calibration",
                                              "data/evaluation/calibration.json"])):
        out = tmp_path / f"{name}.csv"
        proc = cnnpipe("predict", str(folder), *flags, "--output", str(out), cwd=workspace)
        assert proc.returncode == 0, proc.stderr
        rows = out.read_text().splitlines()[1:]
        confidences[name] = np.array([float(r.split(",")[3]) for r in rows])
    encoded = [(folder / f"{i}.png").read_bytes() for i in range(4)]
    assert np.allclose(confidences["bare"], calibrated_probabilities(workspace, encoded, 1.0).max(1), atol=1e-5)
    assert np.allclose(confidences["registered"], calibrated_probabilities(workspace, encoded, TEMPERATURE).max(1),
                       atol=1e-5)
    assert np.allclose(confidences["bare+calibration"], confidences["registered"], atol=1e-6)
    proc = cnnpipe("predict", str(folder), "--model", "data/model", "--calibration", str(tmp_path / "none.json"),
                   "--output", str(tmp_path / "x.csv"), cwd=workspace)
    assert proc.returncode == 2 and "calibration file" in proc.stderr and "not found" in proc.stderr


def test_export_onnx_equals_torch_within_tolerance(workspace, tmp_path):
    proc = cnnpipe("export", "onnx", "--output", str(tmp_path / "m.onnx"), cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["onnx"] == str(tmp_path / "m.onnx")
    onnx_predictor = OnnxPredictor(tmp_path / "m.onnx", threads=1)
    torch_predictor = Predictor.from_file(workspace / "data/model/model.pt",
                                          calibration=Calibration(TEMPERATURE, FLIPS))
    assert onnx_predictor.calibration == torch_predictor.calibration  # the registered version's, in the graph
    batch = torch_predictor.decode(images(9))
    for a, b in zip(torch_predictor.predict(batch, 3), onnx_predictor.predict(batch, 3)):
        assert a["predicted_class_index"] == b["predicted_class_index"]
        assert abs(a["confidence"] - b["confidence"]) < 1e-5
    assert onnx_predictor.top_k == 5 and onnx_predictor.spec == torch_predictor.spec


def test_predict_fails_when_no_file_could_be_predicted(workspace, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    proc = cnnpipe("predict", str(tmp_path), "--output", str(tmp_path / "out.csv"), cwd=workspace)
    assert proc.returncode == 2 and "none of the 1 file(s) could be predicted" in proc.stderr, proc.stderr
    (tmp_path / "good.png").write_bytes(images(1)[0])
    proc = cnnpipe("predict", str(tmp_path), "--output", str(tmp_path / "out.csv"), cwd=workspace)
    assert proc.returncode == 0 and json.loads(proc.stdout)["predicted"] == 1
    assert "(default: predictions.csv)" in cnnpipe("predict", "--help", cwd=workspace).stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "predictions.csv"], cwd=REPO, check=False)
    assert ignored.returncode == 0


def test_mlflow_scoring_takes_instances_and_inputs(workspace):
    """The body forms of `mlflow models serve`, through MLflow's own scoring function on the registered model;
    MLflow's own loading applies the packaged temperature too."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    mlflow.set_registry_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    b64 = [base64.b64encode(b).decode() for b in images(3)]

    def score(body: dict):  # noqa: ANN202
        return scoring_server.invocations(json.dumps(body), "application/json", model,
                                          model.metadata.get_input_schema())
    for body, n in (({"instances": b64}, 3), ({"inputs": {"image": b64[:2]}}, 2), ({"inputs": b64[:1]}, 1),
                    ({"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}}, 3)):
        response = score(body)
        assert response.status == 200 and len(json.loads(response.response)["predictions"]) == n, body
    answers = json.loads(score({"instances": b64}).response)["predictions"]
    want = calibrated_probabilities(workspace, images(3), TEMPERATURE)
    assert np.allclose([a["confidence"] for a in answers], want.max(1), atol=1e-5)
    with pytest.raises(MlflowException, match='Expected a column "image"'):
        score({"instances": [[1, "x"]]})
