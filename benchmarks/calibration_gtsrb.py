"""Benchmark: temperature scaling and test-time augmentation on GTSRB, through the real CLI.

ingest (real GTSRB training zip, track-held-out val and test) -> augment -> train (configs/gtsrb.yaml,
`--epochs` to shorten it) -> evaluate with evaluate.calibrate and evaluate.tta on. Records, for every
protocol, the ECE and NLL before and after the temperature fitted on val, the accuracy (unchanged by the
temperature), and the accuracy, ECE (at TTA's own temperature) and batched ms per image with and without TTA.
Target (issue 16): test ECE <= 0.02 with accuracy unchanged.

    .venv/bin/python -m benchmarks.calibration_gtsrb [--zip PATH] [--work DIR] [--epochs N] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.harness import record, stage

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--params", type=Path, default=ROOT / "configs/gtsrb.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-gtsrb-calibration"))
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the recipe's)")
    parser.add_argument("--reuse", action="store_true", help="keep the processed, augmented and model folders "
                                                             "already in --work (evaluate always runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/calibration_gtsrb.json")
    args = parser.parse_args()
    w, p = args.work, ["--params", str(args.params)]
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    if not (args.reuse and (w / "processed").is_dir()):
        stage(["ingest", *p, "--path", str(args.zip), "--out", f"{w}/processed", "--report", f"{w}/ingest_report.json"])
    if not (args.reuse and (w / "augmented").is_dir()):
        stage(["augment", *p, "--data", f"{w}/processed", "--out", f"{w}/augmented"])
    if not (args.reuse and (w / "model").is_dir()):
        stage(["train", *p, *epochs, "--no-tracking", "--data", f"{w}/processed", "--augmented", f"{w}/augmented",
               "--out", f"{w}/model", "--checkpoint", f"{w}/checkpoint.pt"])
    wall, _ = stage(["evaluate", *p, "--calibrate", "--tta", "--no-tracking", "--model", f"{w}/model",
                     "--data", f"{w}/processed", "--out", f"{w}/evaluation"])
    metrics = json.loads((w / "evaluation/metrics.json").read_text())
    calibration = json.loads((w / "evaluation/calibration.json").read_text())
    train = json.loads((w / "model/train_config.json").read_text())["train"]
    keys = ("accuracy", "ece_uncalibrated", "ece", "loss_uncalibrated", "loss", "accuracy_tta", "ece_tta",
            "ms_per_image", "ms_per_image_tta")
    result = {
        "benchmark": "GTSRB training set (39,209 images), val and test held out by track: temperature scaling "
                     "(fitted on val) and test-time augmentation over the policy's class-aware flips",
        "temperature": calibration["temperature"],
        "tta_temperature": calibration.get("tta_temperature"),  # fitted on val's TTA-averaged views
        "tta_views": ["original", *(k for k, t in (calibration["flips"] or {}).items() if any(c >= 0 for c in t))],
        "scores": {split: {k: m.get(k) for k in keys} for split, m in metrics.items()},
        "evaluate_wall_s": round(wall, 1),
        "recipe": {"params": str(args.params.relative_to(ROOT)), "epochs": train["epochs"],
                   "label_smoothing": train["label_smoothing"], "arch": train["arch"]},
        # --reuse: a model trained before this run (by this script or another benchmark), named with its date
        "model": {"folder": str(w / "model"), "reused": args.reuse,
                  "trained": time.strftime("%Y-%m-%d %H:%M", time.gmtime((w / "model/model.pt").stat().st_mtime)),
                  "flips_recorded": calibration["flips"] is not None},
        "targets": {"test_ece": 0.02},
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
