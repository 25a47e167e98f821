"""sweep: train + evaluate one model per grid point, each an MLflow child run of one parent run, and
a comparison table (Markdown, CSV) and an accuracy-vs-parameters plot logged to the parent.

The `study` preset reproduces the design of the published CIFAR-10 study on any dataset: the dense
baseline (mlp) against cnn3, and cnn3 at base widths 16 / 32 / 64 / 128 (shallow, baseline, deep,
very deep).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from cnnpipe.config import EvaluateConfig, TrackingConfig, TrainConfig
from cnnpipe.data.store import read_dataset
from cnnpipe.engine.device import resolve_device
from cnnpipe.engine.inference import predict_logits, to_nchw_uint8
from cnnpipe.engine.model_folder import MODEL_FILE, read_history
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluation import figures
from cnnpipe.fsio import atomic_dir, ensure_writable_parent
from cnnpipe.stages import evaluate, train

STUDY = [{"arch": "mlp", "width": 128}] + [{"arch": "cnn3", "width": w} for w in (16, 32, 64, 128)]
COLUMNS = ["run", "overrides", "parameters", "test_accuracy", "test_loss", "train_accuracy", "train_test_gap",
           "training_seconds", "run_id"]


def grid(axes: list[str]) -> list[dict[str, Any]]:
    """`["arch=mlp,cnn3", "epochs=2,4"]` -> the cartesian product as train-param overrides."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    names, values = [], []
    for axis in axes:
        key, sep, vals = axis.partition("=")
        key = key.removeprefix("train.").replace("-", "_")
        if not sep or not vals:
            raise CnnpipeError(f"--grid {axis!r}: expected train.NAME=V1,V2,...")
        if key not in fields:
            raise CnnpipeError(f"--grid {axis!r}: train.{key} is not a train param (expected one of: {', '.join(fields)})")
        names.append(key)
        values.append(vals.split(","))
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _configure(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    from cnnpipe.config import load_block

    return load_block(TrainConfig, "train", {"train": {**dataclasses.asdict(base), **overrides}}, {})


def _train_accuracy(model_dir: Path, data: Path, device: str) -> float:
    """Accuracy on the (unaugmented) training split: the train side of the train-test gap."""
    p = Predictor.from_file(model_dir / MODEL_FILE, str(resolve_device(device)))  # where evaluate runs
    split = read_dataset(data, splits=("train",)).splits["train"]
    logits = predict_logits(p.model, to_nchw_uint8(split.images, p.device), p.mean, p.std)
    return (logits.argmax(1).cpu() == torch.from_numpy(split.labels)).float().mean().item()


def run(base: TrainConfig, eval_cfg: EvaluateConfig, tracking: TrackingConfig, data: Path, augmented: Path,
        out: Path, points: list[dict[str, Any]], name: str) -> dict:
    from cnnpipe.tracking import Tracker

    ensure_writable_parent(out)
    configs = [_configure(base, p) for p in points]  # every point validated (by load_block) before anything runs
    parent = Tracker.start(tracking, run_name=name, tags={"cnnpipe.sweep": name})
    parent.log_params({"points": len(points), "grid": json.dumps(points)}, prefix="sweep.")
    eval_cfg = dataclasses.replace(eval_cfg, tsne_samples=0)  # per-run t-SNE would dominate a sweep's time
    rows = []
    try:
        with atomic_dir(out) as tmp:
            for i, (point, cfg) in enumerate(zip(points, configs)):
                label = ", ".join(f"{k}={v}" for k, v in point.items())
                print(f"[{i + 1}/{len(points)}] {label}", file=sys.stderr, flush=True)
                run_dir = tmp / f"run{i:02d}"
                result = train.run(cfg=cfg, data=data, augmented=augmented, model=run_dir / "model", tracking=tracking,
                                   run_tags={"mlflow.parentRunId": parent.run_id, "mlflow.runName": f"{name}-{label}"})
                metrics = evaluate.run(cfg=eval_cfg, model=run_dir / "model", data=data,
                                       evaluation=run_dir / "evaluation", tracking=tracking)
                history = read_history(run_dir / "model")
                train_acc = _train_accuracy(run_dir / "model", data, eval_cfg.device)
                rows.append({"run": i, "overrides": label, "parameters": result["parameters"],
                             "test_accuracy": metrics["test"]["accuracy"], "test_loss": metrics["test"]["loss"],
                             "train_accuracy": round(train_acc, 6),
                             "train_test_gap": round(train_acc - metrics["test"]["accuracy"], 6),
                             "training_seconds": round(sum(float(e["train/epoch_seconds"]) for e in history), 1),
                             "run_id": result["run_id"]})
            _write_outputs(tmp, rows, name)
            parent.log_artifact(tmp / "comparison.md", "sweep")
            parent.log_artifact(tmp / "comparison.csv", "sweep")
            parent.log_artifact(tmp / "accuracy_vs_parameters.png", "sweep")
            best = max(rows, key=lambda r: r["test_accuracy"])
            parent.log_metrics({"best/test_accuracy": best["test_accuracy"]})
            parent.set_tags({"sweep.best_run": best["run_id"], "sweep.best": best["overrides"]})
    except BaseException:
        parent.finish(ok=False)
        raise
    parent.finish(ok=True)
    print((out / "comparison.md").read_text(), file=sys.stderr)
    return {"parent_run_id": parent.run_id, "runs": len(rows), "best": best["overrides"],
            "best_test_accuracy": best["test_accuracy"], "table": str(out / "comparison.md")}


def _write_outputs(folder: Path, rows: list[dict], name: str) -> None:
    with open(folder / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = ["run", "params", "parameters", "test accuracy", "test loss", "train accuracy", "train-test gap",
              "training time (s)"]
    lines = [f"# Sweep {name}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        lines.append(f"| {r['run']} | {r['overrides']} | {r['parameters']:,} | {r['test_accuracy']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['train_accuracy']:.4f} | {r['train_test_gap']:+.4f} | "
                     f"{r['training_seconds']:.1f} |")
    (folder / "comparison.md").write_text("\n".join(lines) + "\n")
    figures.accuracy_vs_parameters_png([r["parameters"] for r in rows], [r["test_accuracy"] for r in rows],
                                       [r["overrides"] for r in rows], folder / "accuracy_vs_parameters.png")


