"""Benchmark: what a photo job costs at 64, 128 and 224 px on CPU, so a user can size one before running it.

Generates `--photos` camera-sized JPEGs (1600x1200, 3 classes) as an imagefolder, then per image size:
`cnnpipe ingest` (center_crop; large JPEGs decoded reduced) and, per backbone (torchvision resnet18,
mobilenet_v3_small, both from scratch), `cnnpipe train` for `--epochs` epochs. Records ingest and
train images/s (train: the last epoch's, the first one warms up) and each child's peak RSS.

    .venv/bin/python -m benchmarks.photo_sizes [--photos 120] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import load_average, record, stage

from cnnpipe.engine.model_folder import read_history

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 128, 224)
ARCHS = ("torchvision/resnet18", "mobilenet_v3_small")


def write_photos(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    for i in range(n):
        k = i % 3
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
        a = np.roll(noise, i * 7, axis=1).copy()
        a[50 + k * 60:110 + k * 60, 100:300] = (255 * (k == 0), 255 * (k == 1), 255 * (k == 2))
        Image.fromarray(a).resize((1600, 1200), Image.Resampling.BILINEAR).save(root / f"class{k}/{i}.jpg", quality=88)


def write_table(result: dict, path: Path) -> None:
    """The README's table: one row per size, ingest and each arch's train throughput and peak RSS."""
    head = "| image size | ingest img/s (peak RSS) | " + " | ".join(f"`{a}` train img/s (peak RSS)" for a in ARCHS) + " |"
    lines = [head, "|" + " --- |" * (len(ARCHS) + 2)]
    for size in SIZES:
        rows = {r.get("arch", "ingest"): r for r in result["rows"] if r["image_size"] == size}
        cells = [f"{rows[k]['images_per_s']:,.1f} ({rows[k]['peak_rss_mib']:,} MiB)" for k in ("ingest", *ARCHS)]
        lines.append(f"| {size} px | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-photo-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/photo_sizes.json")
    args = parser.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    write_photos(w / "photos", args.photos)
    load_before = load_average()
    rows = []
    for size in SIZES:
        d = w / str(size)
        common = ["--image-size", str(size), "--channels", "3", "--resize", "center_crop"]
        wall, rss = stage(["ingest", "--source", "imagefolder", "--path", str(w / "photos"), *common,
                           "--out", f"{d}/processed", "--report", f"{d}/report.json"])
        rows.append({"stage": "ingest", "image_size": size, "images": args.photos,
                     "images_per_s": round(args.photos / wall, 1), "wall_s": round(wall, 1), "peak_rss_mib": rss})
        stage(["augment", "--data", f"{d}/processed", "--out", f"{d}/augmented"])
        for arch in ARCHS:
            wall, rss = stage(["train", "--arch", arch, "--epochs", str(args.epochs), "--batch-size", "32",
                               "--optimizer", "adamw", "--lr", "0.001", "--no-tracking", "--data", f"{d}/processed",
                               "--augmented", f"{d}/augmented", "--out", f"{d}/{arch.replace('/', '_')}",
                               "--checkpoint", f"{d}/ckpt.pt"])
            last = read_history(d / arch.replace("/", "_"))[-1]
            rows.append({"stage": "train", "arch": arch, "image_size": size,
                         "images_per_s": round(float(last["train/images_per_s"]), 1),
                         "epoch_seconds": round(float(last["train/epoch_seconds"]), 1),
                         "wall_s": round(wall, 1), "peak_rss_mib": rss})
    result = {
        "benchmark": f"{args.photos} generated 1600x1200 JPEG photos (imagefolder, 3 classes): ingest with center_crop "
                     f"and train {args.epochs} epochs (batch 32, AdamW, from scratch, augmentation on) per size and arch, "
                     "CPU only",
        "rows": rows,
        "note": "ingest images/s include the process start (~2-3 s of imports); train images/s are the last epoch's; "
                "shared 2-core machine: other jobs ran meanwhile (see the load averages)",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    record(args.out, result)
    write_table(result, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
