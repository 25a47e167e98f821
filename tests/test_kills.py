"""Nothing left dangling after a SIGKILL: of `cnnpipe register` mid-way, and of `dvc repro` during train.
The next start on the workspace, or `cnnpipe gc`, leaves no RUNNING run and no half-registered version."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.helpers import cnnpipe, run, user_env
from tests.helpers import make_workspace as make_dvc_workspace
from tests.registered import MODEL_NAME, make_workspace

pytestmark = pytest.mark.e2e


def statuses(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return dict(con.execute("select run_uuid, status from runs").fetchall())
    except sqlite3.OperationalError:  # the tables are not created yet
        return {}


def kill_when(cmd: list[str], ws: Path, ready: Callable[[], bool], seconds: float = 600) -> None:
    """Start `cmd` in its own process group; SIGKILL the whole group as soon as `ready()`."""
    proc = subprocess.Popen(cmd, cwd=ws, env=user_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + seconds
    try:
        while not ready():
            assert proc.poll() is None, f"{cmd} ended (exit {proc.returncode}) before the moment to kill it"
            assert time.time() < deadline, f"{cmd}: the moment to kill it never came"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def registry(ws: Path):  # noqa: ANN201 - an MlflowClient
    import mlflow

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def gc(ws: Path) -> dict:
    proc = cnnpipe("gc", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_killed_register_leaves_no_running_run_and_no_orphan_version(tmp_path):
    ws = make_workspace(tmp_path)
    for stage in ("augment", "train", "evaluate"):
        run(["cnnpipe", stage], ws)
    db = ws / "mlflow.db"
    (run_id,) = statuses(db)

    # killed while logging the model: the run is RUNNING again, its process gone
    kill_when(["cnnpipe", "register"], ws, lambda: statuses(db)[run_id] == "RUNNING")
    assert statuses(db)[run_id] == "RUNNING"
    found = gc(ws)
    assert found["killed_runs"] == [run_id] and statuses(db)[run_id] == "KILLED"

    # killed once its version exists: the next start (register again) deletes or finishes it, never a second one
    client = registry(ws)
    kill_when(["cnnpipe", "register"], ws, lambda: bool(client.search_model_versions(f"name = '{MODEL_NAME}'")))
    proc = cnnpipe("register", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1 and versions[0].run_id == run_id
    assert versions[0].tags["cnnpipe.state"] == "registered"
    assert "RUNNING" not in statuses(db).values()
    assert gc(ws) == {"killed_runs": [], "live_runs": [], "unjudged_runs": [], "deleted_versions": [],
                      "stale_checkpoint": None}


def test_killed_dvc_repro_during_train_is_marked_killed_and_its_checkpoint_reported(tmp_path):
    ws = make_dvc_workspace(tmp_path / "repo")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"] |= {"arch": "mlp", "epochs": 10000}  # still training when the kill comes
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    db, checkpoint = ws / "mlflow.db", ws / "data/checkpoints/train.pt"
    kill_when(["dvc", "repro"], ws, lambda: checkpoint.exists() and "RUNNING" in statuses(db).values())
    (run_id,) = statuses(db)
    assert statuses(db)[run_id] == "RUNNING"

    found = gc(ws)
    assert found["killed_runs"] == [run_id] and statuses(db)[run_id] == "KILLED"
    assert found["stale_checkpoint"]["run_id"] == run_id and found["stale_checkpoint"]["epoch"] >= 1

    # the next start on the workspace says what it replaces, and leaves nothing behind
    proc = cnnpipe("train", "--epochs", "1", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert "a checkpoint of an interrupted run is at 'data/checkpoints/train.pt'" in proc.stderr
    assert "RUNNING" not in statuses(db).values() and not checkpoint.exists()
    assert gc(ws)["stale_checkpoint"] is None
