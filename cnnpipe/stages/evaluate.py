"""evaluate: a model + the processed dataset -> metrics.json, confusion matrix (PNG, CSV, per-sample CSV)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cnnpipe.config import EvaluateConfig, TrackingConfig
from cnnpipe.data.store import read_dataset
from cnnpipe.engine.checkpoint import load_model
from cnnpipe.engine.device import resolve_device
from cnnpipe.engine.inference import predict_logits, stats_tensors, to_nchw_uint8
from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluation.figures import confusion_matrix_png
from cnnpipe.evaluation.metrics import classification_metrics
from cnnpipe.fsio import atomic_dir, ensure_writable_parent
from cnnpipe.stages.train import HISTORY_FILE, MODEL_FILE

SPLITS = ("val", "test")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def run(cfg: EvaluateConfig, model_dir: Path, data: Path, out: Path, tracking: TrackingConfig | None) -> dict:
    ensure_writable_parent(out)
    device = resolve_device(cfg.device)
    model, spec = load_model(model_dir / MODEL_FILE, device)
    ds = read_dataset(data, splits=SPLITS)
    if (ds.classes, ds.image_size, ds.channels) != (spec.classes, spec.image_size, spec.in_channels):
        raise CnnpipeError(
            f"model '{model_dir / MODEL_FILE}' does not match dataset '{data}': model takes {spec.num_classes} classes, "
            f"{spec.image_size}x{spec.image_size}x{spec.in_channels}; dataset has {len(ds.classes)} classes, "
            f"{ds.image_size}x{ds.image_size}x{ds.channels}")
    mean, std = stats_tensors(spec.mean, spec.std, device)
    results = {}
    for name in SPLITS:
        split = ds.splits[name]
        if len(split.labels) == 0:
            raise CnnpipeError(f"dataset '{data}': the '{name}' split is empty")
        logits = predict_logits(model, to_nchw_uint8(split.images, device), mean, std, cfg.batch_size)
        results[name] = classification_metrics(logits, torch.from_numpy(split.labels).to(device), ds.classes)

    metrics = {name: {k: round(v, 6) for k, v in r["scalars"].items()} for name, r in results.items()}
    test = results["test"]
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        confusion_matrix_png(test["confusion"], ds.classes, tmp / "confusion_matrix.png", "test")
        _write_csv(tmp / "confusion_matrix.csv", ["true \\ predicted", *ds.classes],
                   [[c, *row] for c, row in zip(ds.classes, test["confusion"].tolist())])
        # one row per test image, the layout DVC's `confusion` plot template reads
        names = np.asarray(ds.classes)
        _write_csv(tmp / "predictions.csv", ["actual", "predicted"],
                   np.stack([names[test["y_true"]], names[test["y_pred"]]], 1).tolist())
        _write_csv(tmp / "per_class.csv", ["class", "precision", "recall", "f1", "support"],
                   [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in test["per_class"]])
        if tracking is not None:
            from cnnpipe.tracking import Tracker

            tracker = Tracker.resume(tracking, model_dir)
            # at the last epoch's step, so val/* continues train's curves instead of restarting at 0
            epochs = sum(1 for _ in open(model_dir / HISTORY_FILE)) - 1
            tracker.log_metrics({f"{split}/{k}": v for split, m in metrics.items() for k, v in m.items()}, step=epochs)
            tracker.log_artifact(tmp, "evaluate")
    for name, m in metrics.items():
        print(f"{name}: accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}  f1_macro {m['f1_macro']:.4f}", file=sys.stderr)
    return metrics
