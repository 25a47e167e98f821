"""Fixtures shared by the tests (plain helpers are in tests/helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for_http, write_tiny_dataset

# The tests run the real `cnnpipe`, `dvc` and `mlflow` executables: those of this interpreter's
# environment, also when pytest is started as `.venv/bin/python -m pytest` without activating it.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "processed")


@pytest.fixture
def moto(monkeypatch):
    """An AWS-compatible endpoint for real: moto's server on 127.0.0.1; boto3 in this process and in
    subprocesses (user_env) reach it through AWS_ENDPOINT_URL."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/moto-api/", proc, seconds=30)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
