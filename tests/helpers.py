"""Plain helpers the tests share: tiny generated datasets in the real processed format, workspaces, commands.

Fixtures live in conftest.py; these are imported (`from tests.helpers import ...`).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from cnnpipe.data.store import Split, write_dataset

REPO = Path(__file__).resolve().parent.parent


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment commands run in: this one without the settings that would redirect them (the
    tracking store, the components' image), plus `extra`."""
    # (MLflow's set_tracking_uri/set_registry_uri, called by in-process tests, also export these variables)
    redirects = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CNNPIPE_IMAGE")
    return {k: v for k, v in os.environ.items() if k not in redirects} | (extra or {})


def cnnpipe(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["cnnpipe", *args], cwd=cwd, capture_output=True, text=True, env=user_env(env), timeout=timeout)


def run(cmd: list[str], cwd: Path) -> str:
    """A command as users run it; its output, or fail."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=user_env(), timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make_workspace(ws: Path) -> Path:
    """A fresh clone's worth of the project in `ws`: code, dvc.yaml, params.yaml, MLproject; git and DVC
    initialized."""
    import shutil

    shutil.copytree(REPO / "cnnpipe", ws / "cnnpipe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "MLproject", "python_env.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, ws / name)
    shutil.copytree(REPO / "data" / "raw", ws / "data" / "raw")
    run(["git", "init", "-q"], ws)
    run(["dvc", "init", "-q"], ws)
    run(["dvc", "config", "core.analytics", "false"], ws)
    return ws


def make_images(n_per_class: int, classes: int, size: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class k is a bright bar at a class-specific row, plus noise: learnable, but not trivially identical."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.integers(0, 60, (len(labels), size, size, channels), dtype=np.uint8)
    band = max(1, size // classes)
    for i, k in enumerate(labels):
        images[i, k * band:(k + 1) * band] = 220
    return images, labels.astype(np.int64)


def write_tiny_dataset(path: Path, classes: int = 3, size: int = 8, channels: int = 1, n: int = 12,
                       names: list[str] | None = None) -> Path:
    """`names`: the class names (default class0, class1, ...); names the flip tables know (CIFAR-10's) give flips."""
    names = names or [f"class{k}" for k in range(classes)]
    splits = {}
    for i, split in enumerate(("train", "val", "test")):
        images, labels = make_images(n if split == "train" else max(2, n // 3), classes, size, channels, seed=i)
        splits[split] = Split(images, labels)
    write_dataset(path, names, splits, {"source": {"name": "tiny", "path": None, "inputs": []}})
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, seconds: float = 90) -> None:  # noqa: ANN001 - a subprocess.Popen
    """Poll `url` until it answers; fail if `proc` (the server) dies or time runs out."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            assert time.time() < deadline and proc.poll() is None, f"{url} did not answer"
            time.sleep(0.5)
