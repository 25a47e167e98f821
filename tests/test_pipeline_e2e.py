"""The whole pipeline as users run it: `dvc repro` in a fresh git + DVC workspace, a real SQLite MLflow
store, the Model Registry, `mlflow ui` answering on 127.0.0.1, and the registered model on real images."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.helpers import REPO, free_port, make_workspace, run, user_env, wait_for_http

pytestmark = pytest.mark.e2e
MODEL_NAME = "cnnpipe-digits"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def first_repro(workspace: Path) -> str:
    return run(["dvc", "repro"], workspace)


def client(ws: Path):  # noqa: ANN201
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_repro_runs_every_stage_and_registers_an_accurate_model(workspace, first_repro):
    for stage in ("ingest", "augment", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first_repro
    # MLflow's chatter stays off the terminal (tracking.quiet_mlflow)
    assert "Add type hints" not in first_repro and "database tables" not in first_repro, first_repro
    # and register says where the UI shows the runs: the model-training view, headline metrics as columns
    assert "/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=cnnpipe" in first_repro
    metrics = json.loads((workspace / "data/evaluation/metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.95, metrics
    manifest = json.loads((workspace / "data/processed/manifest.json").read_text())
    assert manifest["source"]["name"] == "digits" and len(manifest["source"]["inputs"][0]["sha256"]) == 64
    assert sum(c["total"] for c in manifest["counts"].values()) == 1797

    c = client(workspace)
    version = c.get_model_version(MODEL_NAME, "1")
    assert float(version.tags["test.accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
    assert version.tags["dataset.source"] == "digits"
    run_ = c.get_run(version.run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.arch"] == "cnn3"
    assert run_.data.metrics["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    epochs = yaml.safe_load((workspace / "params.yaml").read_text())["train"]["epochs"]
    assert len(c.get_metric_history(run_.info.run_id, "train/loss")) == epochs
    artifacts = {a.path for a in c.list_artifacts(run_.info.run_id, "evaluate")}
    for name in ("confusion_matrix.png", "metrics.json", "report.html", "report.md", "tsne.png", "misclassified.png",
                 "reliability_diagram.png", "confusion_matrix.json", "predictions.csv"):
        assert f"evaluate/{name}" in artifacts, name
    data_artifacts = {a.path for a in c.list_artifacts(run_.info.run_id, "data/figures")}
    assert "data/figures/class_distribution.png" in data_artifacts
    png = Path(c.download_artifacts(run_.info.run_id, "evaluate/confusion_matrix.png", str(workspace)))
    assert Image.open(png).size[0] > 300
    assert (workspace / "mlartifacts").is_dir() and not (workspace / "mlruns").exists()


def test_second_repro_is_a_noop(workspace, first_repro):
    out = run(["dvc", "repro"], workspace)
    assert "Running stage" not in out and "Data and pipelines are up to date." in out


def test_dvc_metrics_and_plots_read_the_outputs(workspace, first_repro):
    shown = run(["dvc", "metrics", "show"], workspace)
    header = shown.splitlines()[0].split()
    assert "test.accuracy" in header and len(header) <= 8, shown  # the headline, not every score
    assert json.loads((workspace / "data/evaluation/metrics.json").read_text())["test"]["ece_uncalibrated"] >= 0
    run(["dvc", "plots", "show", "-o", "plots"], workspace)
    assert (workspace / "plots" / "index.html").stat().st_size > 0


def test_registered_model_predicts_raw_images(workspace, first_repro):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{workspace / 'mlflow.db'}")  # whatever an earlier test set
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    images = np.load(workspace / "data/processed/test_images.npy")[:40]
    labels = np.load(workspace / "data/processed/test_labels.npy")[:40]

    def b64png(a: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0]).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    out = model.predict(pd.DataFrame({"image": [b64png(a) for a in images]}), params={"top_k": 3})
    assert list(out.columns) == ["predicted_class", "predicted_class_index", "confidence", "top_k"]
    assert (out["predicted_class_index"].to_numpy() == labels).mean() > 0.9
    assert len(out["top_k"][0]) == 3 and 0 < out["confidence"][0] <= 1


def test_mlflow_ui_shows_the_run_and_the_model(workspace, first_repro):
    port = free_port()
    server = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", f"sqlite:///{workspace / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=workspace,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server)
        got = json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/registered-models/get?name={MODEL_NAME}"))
        run_id = got["registered_model"]["latest_versions"][0]["run_id"]
        run_ = json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}"))["run"]
        assert any(m["key"] == "test/accuracy" for m in run_["data"]["metrics"])
        assert b"<html" in urllib.request.urlopen(base, timeout=10).read().lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow ui leaves a uvicorn child: stop the whole group
        server.wait(timeout=30)


def test_first_model_became_champion(workspace, first_repro):
    record = json.loads((workspace / "data/registered.json").read_text())
    assert record["promotion"]["decision"] == "promoted: first model"
    assert str(client(workspace).get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"


def gtsrb_sized_png() -> bytes:
    """A real GTSRB image when the shared zip is here, else a same-sized RGB image."""
    import zipfile

    zip_path = REPO.parent / "shared/data/GTSRB_Final_Training_Images.zip"
    if zip_path.exists():
        with zipfile.ZipFile(zip_path) as z:
            img = Image.open(io.BytesIO(z.read("GTSRB/Final_Training/Images/00014/00000_00000.ppm")))
    else:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_cnnpipe_serve_answers_the_champion(workspace, first_repro):
    port = free_port()
    proc = subprocess.Popen(["cnnpipe", "serve", "--port", str(port)], cwd=workspace, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=gtsrb_sized_png(),
                                     headers={"Content-Type": "image/png"}, method="POST")
        pred = json.load(urllib.request.urlopen(req, timeout=30))["predictions"][0]
        assert pred["predicted_class"] in [str(d) for d in range(10)] and len(pred["top_k"]) == 5
        assert 0 < pred["confidence"] <= 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # a clean stop


def test_cnnpipe_predict_writes_one_row_per_file(workspace, first_repro, tmp_path):
    images = np.load(workspace / "data/processed/test_images.npy")[:12]
    labels = np.load(workspace / "data/processed/test_labels.npy")[:12]
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(tmp_path / f"{i:02d}_{labels[i]}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    run(["cnnpipe", "predict", str(tmp_path), "--output", str(out)], workspace)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and rows[-1]["error"] and not rows[0]["error"]
    good = [r for r in rows if not r["error"]]
    assert sum(Path(r["path"]).stem.split("_")[1] == r["predicted_class"] for r in good) >= 11


def test_mlflow_models_serve_the_champion(workspace, first_repro):
    """The documented alternative: `mlflow models serve -m models:/<name>@champion --env-manager local`."""
    port = free_port()
    env = user_env({"MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"})
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion", "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], cwd=workspace, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, seconds=120)
        b64 = base64.b64encode(gtsrb_sized_png()).decode()
        for payload, n in (({"dataframe_split": {"columns": ["image"], "data": [[b64]]}}, 1),
                           ({"instances": [b64, b64]}, 2), ({"inputs": {"image": [b64]}}, 1)):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            preds = json.load(urllib.request.urlopen(req, timeout=60))["predictions"]
            assert len(preds) == n and {"predicted_class", "predicted_class_index", "confidence", "top_k"} <= set(preds[0])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=b'{"instances": [[1, "x"]]}',
                                     headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400 and 'Expected a column "image"' in json.loads(err.value.read())["message"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # mlflow leaves a uvicorn child: stop the whole group
        proc.wait(timeout=30)


def test_export_sagemaker_from_the_registry(workspace, first_repro, tmp_path):
    import tarfile

    run(["cnnpipe", "export", "sagemaker", "--output", str(tmp_path / "model.tar.gz")], workspace)
    with tarfile.open(tmp_path / "model.tar.gz") as tar:
        assert "code/inference.py" in tar.getnames()


def test_a_worse_run_leaves_the_champion_and_reruns_train_onwards_not_ingest(workspace, first_repro):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["train"].update(epochs=1, lr=0.01)  # a clearly worse config (~75 % val), above register.min_accuracy
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], workspace)
    assert "Running stage 'ingest'" not in out and "Running stage 'augment'" not in out
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    assert "kept champion: challenger worse by" in out
    c = client(workspace)
    assert str(c.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(MODEL_NAME, "challenger").version) == "2"
    tags = c.get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.decision"].startswith("kept champion")
    assert float(tags["promotion.champion_value"]) > float(tags["promotion.challenger_value"])

    run(["cnnpipe", "promote", "--version", "2", "--force"], workspace)
    assert str(c.get_model_version_by_alias(MODEL_NAME, "champion").version) == "2"
    run(["cnnpipe", "rollback"], workspace)
    assert str(c.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"


def test_mlflow_project_runs_the_pipeline_in_one_run(workspace, first_repro):
    out = run(["mlflow", "run", ".", "--env-manager", "local", "-P",
               "overrides=train.epochs=2 register.model_name=digits-mlproject", "-P", "workdir=mlproject"], workspace)
    assert "succeeded" in out
    c = client(workspace)
    version = c.get_model_version("digits-mlproject", "1")
    run_ = c.get_run(version.run_id)
    assert run_.data.params["train.epochs"] == "2" and "test/accuracy" in run_.data.metrics
    # `mlflow run` put its own run in the Default experiment; the pipeline's run is where params.yaml says
    assert c.get_experiment(run_.info.experiment_id).name == "cnnpipe"
    project_run = c.get_run(run_.data.tags["cnnpipe.mlflow_project_run"])
    assert project_run.data.tags["mlflow.project.entryPoint"] == "main"
    assert project_run.data.tags["cnnpipe.pipeline_run"] == run_.info.run_id
    assert not (workspace / "data/mlproject").exists() and (workspace / "mlproject/model/model.pt").is_file()


def test_dvc_push_and_pull_round_trip_the_data_on_a_fresh_clone(workspace, first_repro, tmp_path):
    from tests import formats

    formats.gtsrb_zip(workspace / "data/raw/signs.zip", classes=2, tracks=2, frames=2)
    run(["dvc", "add", "-q", "data/raw/signs.zip"], workspace)
    storage = tmp_path / "storage"
    run(["dvc", "remote", "add", "-d", "-f", "local", str(storage)], workspace)
    run(["git", "add", "-A"], workspace)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], workspace)
    run(["dvc", "push"], workspace)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    assert not (clone / "data/processed").exists() and not (clone / "data/raw/signs.zip").exists()
    run(["dvc", "pull"], clone)
    for rel in ("data/raw/signs.zip", "data/processed/train_images.npy", "data/model/model.pt",
                "data/evaluation/metrics.json"):
        assert (clone / rel).read_bytes() == (workspace / rel).read_bytes(), rel
    # the clone is exactly where the workspace is: the new raw file is ingest's only pending change
    assert run(["dvc", "status"], clone) == run(["dvc", "status"], workspace)
    assert "up to date" in run(["dvc", "status", "augment", "train", "evaluate"], clone)


def test_dvc_experiments_show_the_grid(workspace, first_repro, tmp_path):
    """After the round trip committed the workspace: a grid point as a DVC experiment, in `dvc exp show`."""
    run(["dvc", "exp", "run", "-n", "mlp-point", "-S", "train.arch=mlp", "-S", "train.width=64",
         "-S", "train.epochs=2", "-S", "register.auto_promote=false", "-S", "register.min_accuracy=0.2"], workspace)
    table = run(["dvc", "exp", "show", "--md"], workspace)
    assert "mlp-point" in table and "test.accuracy" in table and "train.arch" in table
    row = next(line for line in table.splitlines() if "mlp-point" in line)
    assert "mlp" in row.replace("mlp-point", "")


def test_mlflow_project_stage_entry_points(workspace, first_repro):
    """`mlflow run . -e <stage>` for every stage, in order, ends with a registered model."""
    register = "overrides=register.model_name=digits-stages register.min_accuracy=0.2"
    for stage, extra in (("ingest", []), ("augment", []), ("train", ["-P", "overrides=train.epochs=2"]),
                         ("evaluate", []), ("register", ["-P", register])):
        out = run(["mlflow", "run", ".", "-e", stage, "--env-manager", "local", "-P", "workdir=stages", *extra], workspace)
        assert "succeeded" in out, stage
    # every param comes from the workspace's params.yaml (where `dvc exp run` may have left another arch)
    arch = yaml.safe_load((workspace / "params.yaml").read_text())["train"]["arch"]
    assert client(workspace).get_model_version("digits-stages", "1").tags["arch"] == arch


def test_a_model_folder_restored_by_dvc_checkout_registers_again(workspace, first_repro):
    """data/model/mlflow_run.json is .dvcignore'd: `dvc checkout` restores the folder without it, and register
    finds the run that trained its model.pt instead of failing."""
    import hashlib
    import shutil

    shutil.rmtree(workspace / "data/model")
    (workspace / "data/registered.json").unlink()
    run(["dvc", "checkout", "--force"], workspace)
    assert not (workspace / "data/model/mlflow_run.json").exists()
    out = run(["dvc", "repro"], workspace)
    assert "Running stage 'register'" in out
    record = json.loads((workspace / "data/registered.json").read_text())
    digest = hashlib.sha256((workspace / "data/model/model.pt").read_bytes()).hexdigest()
    assert client(workspace).get_run(record["run_id"]).data.tags["cnnpipe.model_sha256"] == digest
