"""Fixtures shared by the tests (plain helpers are in tests/helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnpipe.tracking import kept_mlflow_uris
from tests.helpers import free_port, wait_for_http, write_tiny_dataset

# The tests run the real `cnnpipe`, `dvc` and `mlflow` executables: those of this interpreter's
# environment, also when pytest is started as `.venv/bin/python -m pytest` without activating it.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the test command runs `-n 2`) each worker gets its own share of the CPUs: the processes
    it starts inherit the mask and size their torch threads to it (cnnpipe.cores), instead of every worker's
    training taking every core and the two spinning against each other."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
        os.sched_setaffinity(0, cores[index::count] or [cores[index % len(cores)]])


# The longest test modules, longest first. Seconds per module in a CI run (pytest --durations=0, 2-core AVX2 VM,
# 2026-12-05): containers 123 (+ ~300 when the image's dependency layer must be built: a fresh machine),
# pipeline_e2e 359, parity 172, registry_updates 154, budget 135, finetune_e2e 127, mlflow_ui 117, kills 103,
# served 88, artifact_trust 86, quickstart_e2e 75, tune 73; every other module under a minute. Under --dist
# loadscope, xdist hands whole modules to the workers in collection order (pyproject.toml: --no-loadscope-reorder;
# its own reorder puts the modules with the most tests first, so the longest one-test modules ran last and alone:
# ~140 s of an idle worker). Longest first, the short ones fill in at the end. A stale list costs minutes, no test.
LONGEST_MODULES_FIRST = ("test_containers", "test_pipeline_e2e", "test_parity", "test_registry_updates", "test_budget",
                         "test_finetune_e2e", "test_mlflow_ui", "test_kills", "test_served", "test_artifact_trust",
                         "test_quickstart_e2e", "test_tune")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(autouse=True)
def _mlflow_uris_per_test() -> Iterator[None]:
    """A test that points MLflow's process-wide URIs at its store must not redirect the tests after it in the same
    process (under pytest-xdist, which tests share a process changes from run to run)."""
    with kept_mlflow_uris():
        yield


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
