"""Benchmark: `cnnpipe ingest` of the real GTSRB training zip (39,209 images) to the processed format.

Target (issue 3): under 30 s wall and under 1.5 GB peak memory on the 2-core CPU machine.
Runs the real CLI in a child process and reads its wall time and peak RSS.

    .venv/bin/python -m benchmarks.ingest_gtsrb [--zip PATH]   # writes benchmarks/results/ingest_gtsrb.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import cnnpipe, record

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ingest_gtsrb.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    with tempfile.TemporaryDirectory() as d:
        measured = cnnpipe("ingest", "--params", str(ROOT / "params.yaml"), "--source", "gtsrb",
                           "--path", str(args.zip), "--image-size", "32", "--channels", "3",
                           "--out", f"{d}/processed", "--report", f"{d}/report.json")
        summary = measured.json_line()
    result = {
        "benchmark": "ingest GTSRB_Final_Training_Images.zip -> processed dataset (32x32 RGB, ROI crop, track split)",
        "images": summary["images"], "splits": summary["splits"], "bad_files": summary["bad_files"],
        "wall_s": measured.wall_s, "images_per_s": round(summary["images"] / measured.wall_s),
        "peak_rss_mib": round(measured.peak_rss_mb), "load_average_before": measured.load_before,
        "targets": {"wall_s": 30, "peak_rss_mib": 1536},
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
