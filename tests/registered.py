"""A workspace with a tiny dataset, a small model and a registered version, made by the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import REPO, run, write_tiny_dataset

MODEL_NAME = "cnnpipe-digits"


def make_workspace(ws: Path) -> Path:
    """params.yaml (a SQLite store inside `ws`) and a tiny processed dataset; nothing trained yet."""
    ws.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{ws / 'mlflow.db'}"
    # enough steps to learn the bars (register refuses a model no better than chance): ~0.5 s of training
    params["train"] |= {"arch": "mlp", "epochs": 6, "batch_size": 8}
    params["evaluate"]["tsne_samples"] = 0
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    write_tiny_dataset(ws / "data/processed")
    return ws


def train_and_register(ws: Path) -> dict:
    """augment, train, evaluate, register: the registration record."""
    for stage in ("augment", "train", "evaluate", "register"):
        run(["cnnpipe", stage], ws)
    return json.loads((ws / "data/registered.json").read_text())
