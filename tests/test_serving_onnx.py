"""Serving without torch: `register` ships the ONNX graph (verified like the weights), and `cnnpipe serve`,
`cnnpipe predict` and the SageMaker handler run it in processes where importing torch fails, answering as the
torch path does (top-1 identical, probabilities within 1e-5) on generated photos and on real GTSRB images."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnpipe.config import RegisterConfig, TrackingConfig
from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.fsio import write_json
from cnnpipe.models import build_model
from cnnpipe import verified_model
from cnnpipe.serving import trusted
from cnnpipe.tracking import Registry, Tracker
from tests.helpers import REPO, free_port, user_env, wait_for_http, write_tiny_dataset
from tests.formats import encoded, sign_image

pytestmark = pytest.mark.e2e
NAME = "onnx-signs"
CLASSES = ["stop", "yield", "keep left", "keep right"]
TOLERANCE = 1e-5
# the real GTSRB training zip: CNNPIPE_GTSRB_ZIP, else ../shared/data beside the repository
GTSRB_ZIP = Path(os.environ.get("CNNPIPE_GTSRB_ZIP", REPO.parent / "shared/data/GTSRB_Final_Training_Images.zip"))
# Put first on sys.path of a child process (as sitecustomize): any import of torch or torchvision fails there
NO_TORCH = '''import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is not importable in this process (the torch-free serving test)")
        return None


sys.meta_path.insert(0, NoTorch())
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A 32 x 32 RGB model registered by the real register stage (so with its ONNX graph), calibrated (T = 1.7)."""
    from cnnpipe.stages import register

    ws = tmp_path_factory.mktemp("ws")
    tracking = TrackingConfig(uri=f"sqlite:///{ws / 'mlflow.db'}", experiment="serving-onnx")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {"uri": tracking.uri, "experiment": tracking.experiment}
    params["register"]["model_name"] = NAME
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    data = write_tiny_dataset(ws / "data/processed", classes=4, size=32, channels=3, names=CLASSES)
    spec = ModelSpec("cnn3", 8, 3, 4, 32, CLASSES, [0.45, 0.4, 0.42], [0.25, 0.24, 0.26], resize="letterbox")
    save_model(ws / "data/model/model.pt", build_model("cnn3", 3, 4, 32, 8), spec)
    Tracker.start(tracking, "serving-onnx-test", {}).write_run_file(ws / "data/model")
    # the untrained model stands in for a good one: its recorded scores pass register's quality gate
    write_json(ws / "data/evaluation/metrics.json", {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.9}})
    write_json(ws / "data/evaluation/calibration.json", {"temperature": 1.7})
    register.run(cfg=RegisterConfig(model_name=NAME), model=ws / "data/model", data=data,
                 evaluation=ws / "data/evaluation", record=ws / "data/registered.json", tracking=tracking)
    (ws / "no-torch").mkdir()
    (ws / "no-torch/sitecustomize.py").write_text(NO_TORCH)
    return ws


def torch_free_env(ws: Path) -> dict[str, str]:
    return user_env({"PYTHONPATH": os.pathsep.join([str(ws / "no-torch"), str(REPO)])})


def photos() -> list[bytes]:
    """Photos as users send them: JPEG and PNG, several sizes and aspect ratios, grey, with alpha."""
    rng = np.random.default_rng(7)
    out = [encoded(Image.fromarray(sign_image(i % 4, 40 + 37 * i, 38 + 23 * i)), fmt)
           for i, fmt in enumerate(("JPEG", "PNG", "JPEG", "PNG"))]
    out.append(encoded(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)), "JPEG"))
    out.append(encoded(Image.fromarray(sign_image(2, 64, 50)).convert("L"), "PNG"))
    out.append(encoded(Image.fromarray(sign_image(3, 33, 61)).convert("RGBA"), "PNG"))
    return out


def gtsrb_sample(n: int = 43) -> list[bytes]:
    """The first image of each of n GTSRB classes (PPM, as the zip holds them)."""
    with zipfile.ZipFile(GTSRB_ZIP) as z:
        names = sorted(name for name in z.namelist() if name.endswith(".ppm"))
        firsts = {}
        for name in names:
            firsts.setdefault(name.rsplit("/", 2)[-2], name)
        return [z.read(name) for name in sorted(firsts.values())[:n]]


def samples() -> list[bytes]:
    return photos() + (gtsrb_sample() if GTSRB_ZIP.exists() else [])


def torch_answers(ws: Path, images: list[bytes]) -> list[dict]:
    """The torch path's answers (every class in top_k), with the registered model's calibration."""
    predictor, _ = trusted.load(Registry(f"sqlite:///{ws / 'mlflow.db'}"), f"models:/{NAME}@champion")
    return predictor.predict(predictor.decode(images), top_k=len(CLASSES))


def assert_agree(torch_side: list[dict], onnx_side: list[dict]) -> None:
    assert len(torch_side) == len(onnx_side)
    for t, o in zip(torch_side, onnx_side):
        assert t["predicted_class_index"] == o["predicted_class_index"]
        want = {k["index"]: k["probability"] for k in t["top_k"]}
        got = {k["index"]: k["probability"] for k in o["top_k"]}
        assert want.keys() == got.keys()
        assert max(abs(want[i] - got[i]) for i in want) <= TOLERANCE


def test_register_ships_the_graph_with_its_sha256(workspace):
    version = Registry(f"sqlite:///{workspace / 'mlflow.db'}").version(NAME, "champion")
    assert len(version.tags[verified_model.ONNX_TAG]) == 64
    assert "cannot be exported" not in (workspace / "data/registered.json").read_text()


def test_the_prelude_blocks_torch(workspace):
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=torch_free_env(workspace), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "not importable in this process" in proc.stderr


def test_serve_answers_as_torch_in_a_process_without_torch(workspace):
    port = free_port()
    proc = subprocess.Popen(["cnnpipe", "serve", "--backend", "onnxruntime", "--port", str(port)], cwd=workspace,
                            env=torch_free_env(workspace), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, seconds=120)
        import http.client

        images = samples()
        body = json.dumps({"instances": [base64.b64encode(b).decode() for b in images],
                           "params": {"top_k": len(CLASSES)}})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert response.status == 200, payload
        conn.request("POST", "/invocations", body=b"not an image", headers={"Content-Type": "image/png"})
        bad = conn.getresponse()
        assert bad.status == 400 and "error" in json.loads(bad.read())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert json.loads(stdout)["backend"] == "onnxruntime"
    assert_agree(torch_answers(workspace, images), payload["predictions"])


def test_predict_a_folder_without_torch_as_torch_does(workspace, tmp_path):
    images = samples()
    for i, image in enumerate(images):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / f"in/{i:03d}.img.png").write_bytes(image)  # the suffix picks the files; Pillow reads the bytes
    rows = {}
    for backend, env in (("onnxruntime", torch_free_env(workspace)), ("torch", user_env())):
        proc = subprocess.run(["cnnpipe", "predict", str(tmp_path / "in"), "--backend", backend, "--output",
                               str(tmp_path / f"{backend}.csv")], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["predicted"] == len(images)
        with open(tmp_path / f"{backend}.csv", newline="") as f:
            rows[backend] = list(csv.DictReader(f))
    for t, o in zip(rows["torch"], rows["onnxruntime"], strict=True):
        assert (t["path"], t["predicted_class"]) == (o["path"], o["predicted_class"])
        assert abs(float(t["confidence"]) - float(o["confidence"])) <= TOLERANCE


def test_sagemaker_onnx_archive_runs_its_handler_without_torch(workspace, tmp_path):
    proc = subprocess.run(["cnnpipe", "export", "sagemaker", "--backend", "onnxruntime", "--output",
                           str(tmp_path / "model.tar.gz")], cwd=workspace, env=torch_free_env(workspace),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "onnxruntime"
    from cnnpipe.serving.sagemaker import extract

    model_dir = extract(tmp_path / "model.tar.gz", tmp_path / "model")
    assert "torch" not in (model_dir / "code/requirements.txt").read_text()
    images = samples()
    (tmp_path / "request.json").write_text(json.dumps({"instances": [base64.b64encode(b).decode() for b in images],
                                                       "params": {"top_k": len(CLASSES)}}))
    # as SageMaker's toolkit does: code/ on sys.path, then model_fn, input_fn, predict_fn, output_fn
    script = ("import sys, json; sys.path.insert(0, sys.argv[1] + '/code'); import inference as h; "
              "m = h.model_fn(sys.argv[1]); body = open(sys.argv[2], 'rb').read(); "
              "print(h.output_fn(h.predict_fn(h.input_fn(body, 'application/json'), m), 'application/json'))")
    run = subprocess.run([sys.executable, "-c", script, str(model_dir), str(tmp_path / "request.json")],
                         env={**os.environ, "PYTHONPATH": str(workspace / "no-torch")}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_agree(torch_answers(workspace, images), json.loads(run.stdout)["predictions"])


def test_a_tampered_graph_is_refused(workspace, tmp_path):
    registry = Registry(f"sqlite:///{workspace / 'mlflow.db'}")
    version = registry.version(NAME, "champion")
    graph = next(Path(registry.client.get_model_version_download_uri(NAME, version.version).removeprefix("file://"))
                 .rglob("model.onnx"))
    original = graph.read_bytes()
    try:
        graph.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        proc = subprocess.run(["cnnpipe", "serve", "--backend", "onnxruntime", "--port", str(free_port())],
                              cwd=workspace, env=torch_free_env(workspace), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "ONNX graph sha256" in proc.stderr, proc.stderr
    finally:
        graph.write_bytes(original)


PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "container" / "containers.conf")}
IMAGE = "localhost/cnnpipe-onnx:test"


@pytest.mark.skipif(not (shutil.which("podman") and shutil.which("runc")), reason="no container engine here (podman, runc)")
def test_the_lean_image_serves_the_registered_version(workspace, tmp_path):
    """`EXTRAS=serve-onnx container/build.sh`: no torch in the image; the version's folder copied in, served."""
    build = subprocess.run(["bash", str(REPO / "container/build.sh")], capture_output=True, text=True, timeout=1800,
                           env={**PODMAN_ENV, "EXTRAS": "serve-onnx", "CNNPIPE_IMAGE": IMAGE})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size_mb = int(re.search(r", (\d+) MB$", build.stdout.strip()).group(1))
    assert size_mb <= 600, build.stdout[-500:]
    folder, _, _ = Registry(f"sqlite:///{workspace / 'mlflow.db'}").model_files(f"models:/{NAME}@champion", tmp_path)
    port = free_port()
    started = subprocess.run(["podman", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8080", "-v",
                              f"{folder}:/opt/ml/model:ro", IMAGE, "sh", "-c",
                              "python3 -c 'import torch' 2>/dev/null && exit 9; exec cnnpipe serve --backend onnxruntime "
                              "--model /opt/ml/model --host 0.0.0.0 --port 8080"],
                             capture_output=True, text=True, env=PODMAN_ENV, timeout=120)
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200
                break
            except OSError:
                state = subprocess.run(["podman", "inspect", "-f", "{{.State.Running}}", container], capture_output=True,
                                       text=True, env=PODMAN_ENV).stdout.strip()
                assert state == "true" and time.time() < deadline, "the container stopped or never answered /ping"
                time.sleep(0.5)
        images = samples()
        body = json.dumps({"instances": [base64.b64encode(b).decode() for b in images], "params": {"top_k": len(CLASSES)}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        payload = json.load(urllib.request.urlopen(request, timeout=60))
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "5", container], capture_output=True, env=PODMAN_ENV, timeout=120)
    assert_agree(torch_answers(workspace, images), payload["predictions"])


def test_deploy_sagemaker_picks_the_onnx_archive_without_torch(workspace, moto, tmp_path):
    import boto3

    from cnnpipe.serving import onnx_handler

    deploy = ["cnnpipe", "deploy", "sagemaker", "--backend", "onnxruntime", "--role",
              "arn:aws:iam::123456789012:role/SageMakerRole", "--endpoint-name", "onnx-signs"]
    refused = subprocess.run(deploy, cwd=workspace, env=torch_free_env(workspace), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "--image-uri" in refused.stderr
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/cnnpipe-onnx:0.1.0"
    proc = subprocess.run([*deploy, "--image-uri", image], cwd=workspace, env=torch_free_env(workspace),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert boto3.client("sagemaker").describe_model(ModelName="onnx-signs")["PrimaryContainer"]["Image"] == image
    bucket, key = out["model_data"].removeprefix("s3://").split("/", 1)
    (tmp_path / "model.tar.gz").write_bytes(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    from cnnpipe.serving.sagemaker import extract

    model_dir = extract(tmp_path / "model.tar.gz", tmp_path / "model")
    assert (model_dir / "code/inference.py").read_text() == Path(onnx_handler.__file__).read_text()
    assert (model_dir / "model.onnx").is_file() and not (model_dir / "model.pt").exists()


def test_a_model_that_cannot_be_exported_is_one_line_and_no_graph(tmp_path, capsys):
    import torch

    from cnnpipe.engine.predictor import Predictor
    from cnnpipe.serving.onnx_model import registered_graph

    class Eigenvalues(torch.nn.Module):  # complex numbers inside: ONNX has no type for them
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x.mean(1)[:, :4, :4]).real

    spec = ModelSpec("custom", 1, 3, 4, 8, CLASSES, [0.5] * 3, [0.25] * 3)
    predictor = Predictor(Eigenvalues(), spec, torch.device("cpu"))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert registered_graph(predictor, 3, tmp_path / "model.onnx", images) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be exported to ONNX" in err[0] and "serves with torch only" in err[0], err
    assert not (tmp_path / "model.onnx").exists()
