"""Benchmark: the whole fast GTSRB recipe trained from shards (train.data_mode stream) vs from the device path.

The real CLI on the real GTSRB training zip: ingest with configs/gtsrb-fast.yaml and `ingest.shards: always`
(the arrays and the WebDataset shards of every split), augment, then train twice from the same augmented
dataset, seed and recipe, once per `train.data_mode`, and evaluate each model on the track-held-out test split
(served protocol, whole frames). Recorded per path: test and kept-epoch validation accuracy, training wall
seconds. The two paths see the same images in different orders (the stream path shuffles shards and a buffer),
so their accuracies differ by about a seed's spread, not more (benchmarks/recipes.py gives that spread).

    .venv/bin/python -m benchmarks.stream_gtsrb [--zip PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.harness import load_average, record, stage

from cnnpipe.engine.model_folder import read_history

ROOT = Path(__file__).resolve().parents[1]
MODES = ("device", "stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--params", type=Path, default=ROOT / "configs/gtsrb-fast.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-stream-gtsrb"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stream_gtsrb.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    w, p = args.work, ["--params", str(args.params)]
    load_before = load_average()
    stage(["ingest", *p, "-S", "ingest.shards=always", "--path", str(args.zip), "--out", f"{w}/processed",
           "--report", f"{w}/ingest_report.json"])
    stage(["augment", *p, "--data", f"{w}/processed", "--out", f"{w}/augmented"])
    manifest = json.loads((w / "augmented/manifest.json").read_text())
    results = {}
    for mode in MODES:
        train_s, peak_mb = stage(["train", *p, "-S", f"train.data_mode={mode}", "--no-tracking",
                                  "--data", f"{w}/processed", "--augmented", f"{w}/augmented",
                                  "--out", f"{w}/model-{mode}", "--checkpoint", f"{w}/checkpoint-{mode}.pt"])
        stage(["evaluate", *p, "-S", "evaluate.tsne_samples=0", "-S", "evaluate.tta=false", "--no-tracking",
               "--model", f"{w}/model-{mode}", "--data", f"{w}/processed", "--out", f"{w}/evaluation-{mode}"])
        metrics = json.loads((w / f"evaluation-{mode}/metrics.json").read_text())
        history = read_history(w / f"model-{mode}")
        results[mode] = {"test_accuracy": metrics["test"]["accuracy"], "val_accuracy": metrics["val"]["accuracy"],
                         # the validated epochs' (train.val_every: the recipe validates its last epoch only)
                         "val_accuracy_per_epoch": [round(float(e["val/accuracy"]), 5) for e in history
                                                    if e["val/accuracy"]],
                         "train_wall_s": round(train_s, 1), "train_peak_rss_mb": peak_mb}
    record(args.out, {
        "benchmark": "configs/gtsrb-fast.yaml trained on GTSRB from WebDataset shards (train.data_mode stream) and from "
                     "the device path, same augmented dataset and seed; test = track-held-out whole frames",
        "shards": {split: len(files) for split, files in manifest.get("shards", {}).items()},
        "results": results,
        "test_accuracy_difference": round(results["stream"]["test_accuracy"] - results["device"]["test_accuracy"], 5),
        "load_average_before": load_before, "load_average_after": load_average(),
        "load_note": "run while a CI run used the machine: the accuracies are the figures, not the times",
    })


if __name__ == "__main__":
    main()
