"""Benchmark: `cnnpipe ingest` of an image-folder zip holding one member that inflates to 1 GiB (~1 MB packed).

Target (issue 13): the member is refused from its header, unread: peak memory stays far below its size.
Runs the real CLI in a child process and reads its wall time and peak RSS; other work on the machine
is recorded as the load average before and after.

    .venv/bin/python -m benchmarks.ingest_bomb   # writes benchmarks/results/ingest_bomb.json
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import cnnpipe, record

ROOT = Path(__file__).resolve().parents[1]
BOMB_MIB = 1024


def write_zip(path: Path) -> None:
    """root/{a,b}/N.png: 10 small images per class, plus root/a/bomb.png inflating to BOMB_MIB of zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for c in ("a", "b"):
            for i in range(10):
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(buf, "PNG")
                z.writestr(f"root/{c}/{i}.png", buf.getvalue())
        with z.open("root/a/bomb.png", "w", force_zip64=True) as f:
            for _ in range(BOMB_MIB // 16):
                f.write(bytes(16 * 2**20))


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    with tempfile.TemporaryDirectory() as d:
        archive = Path(d) / "bomb.zip"
        write_zip(archive)
        measured = cnnpipe("ingest", "--params", str(ROOT / "params.yaml"), "--source", "imagefolder",
                           "--path", str(archive), "--max-bad-fraction", "0.1", "--val-fraction", "0.2",
                           "--test-fraction", "0.2", "--out", f"{d}/processed", "--report", f"{d}/report.json")
        report = json.loads(Path(f"{d}/report.json").read_text())
        packed = archive.stat().st_size
    record(ROOT / "benchmarks/results/ingest_bomb.json", {
        "benchmark": f"ingest an image-folder zip with one member inflating to {BOMB_MIB} MiB",
        "archive_bytes": packed, "images": report["images"], "bad_file_list": report["bad_file_list"],
        "wall_s": measured.wall_s, "peak_rss_mib": round(measured.peak_rss_mb),
        "load_average_before": measured.load_before, "load_average_after": measured.load_after,
        "note": "other engineers' jobs share the 2 cores: wall time is disturbed by them, peak RSS is not",
    })


if __name__ == "__main__":
    main()
