"""The model folder that train writes and evaluate, register and serving read: its file names and readers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

MODEL_FILE = "model.pt"  # weights + ModelSpec (engine.checkpoint), read with weights_only=True
HISTORY_FILE = "history.csv"  # one row per epoch: train/val loss and accuracy, lr, throughput
CONFIG_FILE = "train_config.json"  # the params the model was trained with, for the report and registry
RUN_FILE = "mlflow_run.json"  # which MLflow run the later stages log into (absent with --no-tracking)


def write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        # every row's fields, in order of appearance: an epoch train.val_every did not validate has no val/ fields
        # (its cells stay empty)
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)


def read_history(model_dir: Path) -> list[dict[str, str]]:
    """The per-epoch rows a trained model's folder holds (none for a model trained elsewhere)."""
    path = model_dir / HISTORY_FILE
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_train_config(model_dir: Path) -> dict[str, Any]:
    """What train recorded of its params ({} for a model trained elsewhere)."""
    path = model_dir / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}
