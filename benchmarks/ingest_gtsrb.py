"""Benchmark: `cnnpipe ingest` of the real GTSRB training zip (39,209 images) to the processed format.

Target (issue 3): under 30 s wall and under 1.5 GB peak memory on the 2-core CPU machine.
Runs the real CLI in a child process and reads its wall time and peak RSS.

    .venv/bin/python benchmarks/ingest_gtsrb.py [--zip PATH]   # writes benchmarks/results/ingest_gtsrb.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ingest_gtsrb.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    cnnpipe = Path(sys.executable).parent / "cnnpipe"
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        proc = subprocess.run([str(cnnpipe), "ingest", "--params", str(ROOT / "params.yaml"), "--source", "gtsrb",
                               "--path", str(args.zip), "--image-size", "32", "--channels", "3",
                               "--out", f"{d}/processed", "--report", f"{d}/report.json"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        summary = json.loads(proc.stdout)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "benchmark": "ingest GTSRB_Final_Training_Images.zip -> processed dataset (32x32 RGB, ROI crop, track split)",
        "images": summary["images"], "splits": summary["splits"], "bad_files": summary["bad_files"],
        "wall_s": round(wall, 2), "images_per_s": round(summary["images"] / wall), "peak_rss_mib": round(peak_mib),
        "targets": {"wall_s": 30, "peak_rss_mib": 1536},
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
