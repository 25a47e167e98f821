"""The real `cnnpipe` executable: --help, results, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, cnnpipe, free_port, user_env, write_tiny_dataset

pytestmark = pytest.mark.e2e  # every test runs the real executable
STAGES = ["ingest", "augment", "train", "evaluate", "register"]


def one_line_error(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cnnpipe ") and "error:" in lines[0] and text in lines[0], lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(stage, tmp_path):
    proc = cnnpipe(stage, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--params" in proc.stdout and "--out" in proc.stdout


def test_unknown_dataset(workdir):
    proc = cnnpipe("ingest", "--source", "mnist", cwd=workdir)
    one_line_error(proc, 2,
                   "ingest.source: unknown dataset 'mnist' (expected one of: auto, digits, gtsrb, cifar10, imagefolder, pickle)")
    assert not (workdir / "data" / "processed").exists() and not (workdir / "data" / "reports" / "ingest_report.json").exists()


def test_missing_params_block(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    del params["train"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    one_line_error(cnnpipe("train", cwd=workdir), 2, "missing block 'train'")


def test_output_path_not_writable(workdir):
    (workdir / "blocker").write_text("a file, not a directory")
    proc = cnnpipe("ingest", "--out", "blocker/processed", cwd=workdir)
    one_line_error(proc, 2, "output path 'blocker/processed' is not writable")
    assert (workdir / "blocker").read_text() == "a file, not a directory"


def test_bad_flag_value(workdir):
    proc = cnnpipe("ingest", "--image-size", "2", cwd=workdir)
    one_line_error(proc, 2, "ingest.image_size: expected >= 4, got 2")


def test_unreachable_tracking_uri_leaves_no_model(workdir):
    write_tiny_dataset(workdir / "data" / "processed")
    assert cnnpipe("augment", cwd=workdir).returncode == 0
    uri = f"http://127.0.0.1:{free_port()}"
    proc = cnnpipe("train", "--epochs", "1", cwd=workdir, env={"MLFLOW_TRACKING_URI": uri})
    one_line_error(proc, 3, f"tracking URI {uri} cannot be reached")
    assert not (workdir / "data" / "model").exists()
    assert not list((workdir / "data").glob(".model.tmp-*"))


def test_stages_chain_without_tracking_and_reject_mismatched_model(workdir):
    write_tiny_dataset(workdir / "data" / "processed", classes=3, size=8)
    assert cnnpipe("augment", cwd=workdir).returncode == 0
    proc = cnnpipe("train", "--epochs", "2", "--no-tracking", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs"] == 2
    proc = cnnpipe("evaluate", "--no-tracking", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((workdir / "data" / "evaluation" / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"} and 0 <= metrics["test"]["accuracy"] <= 1

    write_tiny_dataset(workdir / "other", classes=4, size=8)
    proc = cnnpipe("evaluate", "--no-tracking", "--data", "other", "--out", "eval2", cwd=workdir)
    one_line_error(proc, 2, "does not match dataset 'other': model takes 3 classes")
    assert not (workdir / "eval2").exists()


def test_killed_training_resumes_into_the_same_run(workdir):
    """SIGKILL a real `cnnpipe train` mid-run, then `--resume`: same epoch count, same MLflow run."""
    import signal
    import time

    import torch

    write_tiny_dataset(workdir / "data" / "processed", classes=3, size=16, n=300)
    assert cnnpipe("augment", cwd=workdir).returncode == 0
    args = ["train", "--epochs", "30", "--width", "16", "--batch-size", "32"]
    proc = subprocess.Popen(["cnnpipe", *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=user_env())
    ckpt = workdir / "data" / "checkpoints" / "train.pt"
    deadline = time.time() + 120
    epoch = 0
    while epoch < 2:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
        if ckpt.exists():
            epoch = torch.load(ckpt, weights_only=True)["epoch"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "data" / "model").exists()  # no partial model
    state = torch.load(ckpt, weights_only=True)  # the checkpoint on disk is whole
    assert 2 <= state["epoch"] < 30

    done = cnnpipe(*args, "--resume", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {state['epoch']}" in done.stderr
    result = json.loads(done.stdout)
    assert result["epochs"] == 30 and result["run_id"] == state["run_id"] and not ckpt.exists()
    assert result["val_accuracy"] > 0.9

    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(result["run_id"], "val/accuracy")}
    assert steps == set(range(1, 31))


def test_resume_with_a_corrupt_checkpoint_writes_nothing(workdir):
    write_tiny_dataset(workdir / "data" / "processed")
    assert cnnpipe("augment", cwd=workdir).returncode == 0
    (workdir / "data" / "checkpoints").mkdir(parents=True)
    (workdir / "data" / "checkpoints" / "train.pt").write_bytes(b"\x00" * 100)
    proc = cnnpipe("train", "--resume", cwd=workdir)
    one_line_error(proc, 2, "checkpoint 'data/checkpoints/train.pt' is corrupt")
    assert not (workdir / "data" / "model").exists() and not (workdir / "mlflow.db").exists()
