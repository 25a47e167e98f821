"""Benchmark: the default GTSRB recipe (configs/gtsrb.yaml) through the real CLI, on this machine.

ingest (real GTSRB training zip, track-held-out val and test) -> augment -> train -> evaluate, each a
`cnnpipe` child process. Records the validation and test accuracy, the training time (the train
stage's own epoch seconds and its wall time) and every stage's peak RSS.
Target (issue 4, 2-core CPU): >= 98.5 % validation accuracy within 10 minutes of training, <= 3 GB.

    .venv/bin/python -m benchmarks.train_gtsrb [--zip PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from benchmarks.harness import record, stage

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--params", type=Path, default=ROOT / "configs/gtsrb.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-gtsrb-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_gtsrb.json")
    args = parser.parse_args()
    w, p = args.work, ["--params", str(args.params)]
    walls, peaks = {}, {}
    walls["ingest"], peaks["ingest"] = stage(["ingest", *p, "--path", str(args.zip), "--out", f"{w}/processed",
                                              "--report", f"{w}/ingest_report.json"])
    walls["augment"], peaks["augment"] = stage(["augment", *p, "--data", f"{w}/processed", "--out", f"{w}/augmented"])
    walls["train"], peaks["train"] = stage(["train", *p, "--no-tracking", "--data", f"{w}/processed",
                                            "--augmented", f"{w}/augmented", "--out", f"{w}/model",
                                            "--checkpoint", f"{w}/checkpoint.pt"])
    walls["evaluate"], peaks["evaluate"] = stage(["evaluate", *p, "--no-tracking", "--model", f"{w}/model",
                                                  "--data", f"{w}/processed", "--out", f"{w}/evaluation"])
    with open(w / "model/history.csv") as f:
        history = list(csv.DictReader(f))
    metrics = json.loads((w / "evaluation/metrics.json").read_text())
    import yaml

    recipe = yaml.safe_load(args.params.read_text())
    result = {
        "benchmark": "GTSRB training set (39,209 images): recipe configs/gtsrb.yaml, val and test held out by track",
        "val_accuracy": metrics["val"]["accuracy"], "test_accuracy": metrics["test"]["accuracy"],
        "val_accuracy_per_epoch": [round(float(e["val/accuracy"]), 4) for e in history],
        "training_seconds": round(sum(float(e["train/epoch_seconds"]) for e in history), 1),
        "train_stage_wall_s": round(walls["train"], 1),
        "stage_wall_s": {k: round(v, 1) for k, v in walls.items()},
        "stage_peak_rss_mib": peaks,
        "train_images_per_s": round(sum(float(e["train/images_per_s"]) for e in history) / len(history)),
        "recipe": {k: recipe[k] for k in ("ingest", "augment", "train")},
        "targets": {"val_accuracy": 0.985, "training_seconds": 600, "peak_rss_mib": 3072},
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
