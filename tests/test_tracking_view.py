"""What a user sees of tracking: the experiment's view in the MLflow UI, a quiet terminal, and a model folder
that DVC restored without its run file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnpipe.config import TrackingConfig
from cnnpipe.engine.model_folder import MODEL_FILE, RUN_FILE
from cnnpipe.tracking import EXPERIMENT_TAGS, HEADLINE_METRICS, MODEL_DIGEST_TAG, VIEW_KEY, Tracker
from tests.helpers import REPO, user_env

pytestmark = pytest.mark.e2e  # a real SQLite MLflow store: a few seconds to create


@pytest.fixture
def tracking(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="view")


def test_the_experiment_opens_in_the_training_view_with_the_headline_columns(tracking):
    tracker = Tracker.start(tracking, "first", {})
    tags = tracker.client.get_experiment_by_name("view").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI traces view
    view = json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert [c for c in view["selectedColumns"] if c.startswith("metrics.")] == [f"metrics.`{k}`" for k in HEADLINE_METRICS]
    # an experiment made before cnnpipe tagged it gets the tags on its next run
    exp_id = tracker.client.create_experiment("older")
    Tracker.start(TrackingConfig(uri=tracking.uri, experiment="older"), "second", {})
    assert {k: tracker.client.get_experiment(exp_id).tags.get(k) for k in EXPERIMENT_TAGS} == EXPERIMENT_TAGS


def test_a_model_folder_restored_without_its_run_file_finds_its_run(tracking, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / MODEL_FILE).write_bytes(b"the weights")
    trained = Tracker.start(tracking, "train", {})
    trained.write_run_file(folder)
    (folder / RUN_FILE).unlink()  # .dvcignore'd: `dvc checkout` restores the folder without it
    assert Tracker.resume(tracking, folder).run_id == trained.run_id
    (folder / MODEL_FILE).write_bytes(b"weights this store never saw")  # e.g. pulled into a fresh clone
    fresh = Tracker.resume(tracking, folder)
    assert fresh.run_id != trained.run_id
    assert fresh.client.get_run(fresh.run_id).data.tags[MODEL_DIGEST_TAG] == \
        __import__("hashlib").sha256(b"weights this store never saw").hexdigest()


def test_mlflow_chatter_stays_off_the_terminal(tmp_path):
    code = ("from cnnpipe.tracking import _connect, quiet_mlflow\n"
            f"_connect('sqlite:///{tmp_path / 'new.db'}')\n"
            "with quiet_mlflow():\n    from cnnpipe.serving import pyfunc_model\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=user_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "type hints" not in proc.stderr and "database tables" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("users_uri", [None, "sqlite:///users.db"])
def test_pointing_mlflow_at_a_store_for_a_call_leaves_the_callers_settings_as_they_were(tmp_path, monkeypatch, users_uri):
    """MLflow's fluent API works on process-wide URIs it also exports to the environment: the Tracker points them
    at its store for a call and puts them back, so a notebook's settings and the next store it tracks to are kept."""
    import mlflow

    from cnnpipe.tracking import fluent_store

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    mlflow.set_tracking_uri(users_uri)
    mlflow.set_registry_uri(users_uri)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with fluent_store(store):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == store
    assert os.environ.get("MLFLOW_TRACKING_URI") == users_uri and os.environ.get("MLFLOW_REGISTRY_URI") == users_uri
    if users_uri:
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == users_uri
    else:
        assert store not in (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
