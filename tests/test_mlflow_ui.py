"""The MLflow UI, checked in a real browser: a sweep's runs, params and metrics on the compare page.

Headless Debian Chromium (Playwright's browser download cannot work here); skipped when it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, free_port, user_env, wait_for_http, write_tiny_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]
# flags measured to work on these machines: no sandbox as root, no network chatter, a fresh profile
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1200", "--virtual-time-budget=30000"]


def chromium(url: str, out: list[str], profile: Path) -> str:
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *out, url], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_mlflow_ui_shows_a_sweep(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_tiny_dataset(tmp_path / "data/processed", classes=3, size=16)
    env = user_env()
    for cmd in (["cnnpipe", "augment"], ["cnnpipe", "sweep", "--grid", "epochs=1,2", "--grid", "width=4,8", "--name", "ui"]):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    parent = json.loads(proc.stdout.strip().splitlines()[-1])["parent_run_id"]

    port = free_port()
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server)
        search = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                        headers={"Content-Type": "application/json"},
                                        data=json.dumps({"experiment_ids": ["1"],
                                                         "filter": f"tags.mlflow.parentRunId = '{parent}'"}).encode())
        children = json.load(urllib.request.urlopen(search, timeout=30))["runs"]
        assert len(children) == 4
        ids = urllib.parse.quote(json.dumps([r["info"]["run_id"] for r in children]))
        url = f"{base}/#/compare-runs?runs={ids}&experiments=%5B%221%22%5D"
        dom = chromium(url, ["--dump-dom"], tmp_path / "profile1")
        for name in ("ui-epochs=1, width=4", "ui-epochs=1, width=8", "ui-epochs=2, width=4", "ui-epochs=2, width=8"):
            assert name in dom, name
        for key in ("train.epochs", "train.width", "test/accuracy"):  # the metrics table renders what is in view
            assert key in dom, key
        runs_page = chromium(f"{base}/#/experiments/1/runs", ["--dump-dom"], tmp_path / "profile2")
        assert ">ui<" in runs_page  # the parent run, its children nested under it
        # the experiment's saved view: the model-training view, the headline metrics as columns (a wide window:
        # the table renders only the columns in view)
        from cnnpipe.tracking import Tracker

        view = chromium(base + Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", parent).view_page(),
                        ["--dump-dom", "--window-size=4000,1200"], tmp_path / "profile4")
        assert "Observability" not in view  # a tab of the GenAI view, where MLflow 3 opens by default
        assert "viewing a shared view" in view and ">test/accuracy<" in view and ">val/accuracy<" in view
        shot = Path(os.environ.get("CNNPIPE_UI_SCREENSHOT", tmp_path / "mlflow_compare.png"))
        chromium(url, [f"--screenshot={shot}"], tmp_path / "profile3")
        assert shot.stat().st_size > 20_000
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
