"""Benchmark: `cnnpipe evaluate` with every artifact on a GTSRB-sized test split (12,630 images).

Ingests the real GTSRB training zip with a test fraction that makes the test split as large as the
official GTSRB test set (12,630 images), then times the evaluate stage (metrics on val and test,
confusion matrix in every form, grids, calibration, filters, feature maps, t-SNE of a 2,000-image
sample, the report) through the real CLI. The model is the one benchmarks/train_gtsrb.py trained;
its accuracy here is not meaningful (this split overlaps its training data), only the time is.
Target (issue 5, 2-core CPU): under 60 s.

    .venv/bin/python -m benchmarks.evaluate_gtsrb [--model DIR] [--zip PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.harness import record, stage

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_TEST = 12630


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--model", type=Path, default=Path("/tmp/cnnpipe-gtsrb-benchmark/model"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-gtsrb-eval-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluate_gtsrb.json")
    args = parser.parse_args()
    p, w = ["--params", str(ROOT / "configs/gtsrb.yaml")], args.work
    stage(["ingest", *p, "--path", str(args.zip), "--test-fraction", str(OFFICIAL_TEST / 39209 + 1e-4),
           "--out", f"{w}/processed", "--report", f"{w}/report.json"])
    wall, peak = stage(["evaluate", *p, "--no-tracking", "--model", str(args.model), "--data", f"{w}/processed",
                        "--out", f"{w}/evaluation"])
    manifest = json.loads((w / "processed/manifest.json").read_text())
    artifacts = sorted(f.name for f in (w / "evaluation").iterdir())
    result = {
        "benchmark": "cnnpipe evaluate, every artifact, t-SNE on 2,000 test images",
        "test_images": manifest["counts"]["test"]["total"], "val_images": manifest["counts"]["val"]["total"],
        "wall_s": round(wall, 1), "peak_rss_mib": peak, "artifacts": artifacts, "target_wall_s": 60,
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
