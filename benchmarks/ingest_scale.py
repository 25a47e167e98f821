"""Benchmark: `cnnpipe ingest` of a photo-sized image folder at 1x and 2x, rate and peak memory.

The folder is built from the real GTSRB training images (39,209 PPMs, ~30-250 px) upscaled to 128x128 and
saved as JPEG (quality 90), replicated to `--images` (1x) and twice that (2x): the 2x folder's files are
hard links, so it costs no disk. It is kept in `--work` between runs. Ingest runs as the real CLI (source
imagefolder, 128 px RGB, shards always: a 100k-image training split is 3.3 GB decoded, over the default
1 GB threshold, so auto would write them too, and streaming is how such a set is trained) in its own process
group, sampled for the group's summed RSS (its decoding workers included). Outputs are deleted after each run.

Targets (issue 15): >= 1,000 images/s on 2 cores; peak RSS at 2x within 1.2x of 1x.

    flock /tmp/cnnpipe-bench.lock nice -n 5 .venv/bin/python -m benchmarks.ingest_scale [--images 100000]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import cnnpipe, record

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
MEMBER = "GTSRB/Final_Training/Images/"


def _jpeg(args: tuple[Path, list[tuple[str, Path]]]) -> None:
    """Upscale some of the zip's PPMs to SIZE x SIZE JPEGs (one worker's share)."""
    zip_path, jobs = args
    with zipfile.ZipFile(zip_path) as z:
        for member, dest in jobs:
            image = Image.open(io.BytesIO(z.read(member))).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
            image.save(dest, "JPEG", quality=90)


def originals(zip_path: Path, work: Path, processes: int) -> list[Path]:
    """The 39,209 upscaled JPEGs, made once (in parallel) and cached in `work`/originals."""
    folder = work / "originals"
    done = folder / ".complete"
    with zipfile.ZipFile(zip_path) as z:
        members = sorted(n for n in z.namelist() if n.startswith(MEMBER) and n.endswith(".ppm"))
    paths = [folder / m[len(MEMBER):].replace(".ppm", ".jpg") for m in members]
    if not done.exists():
        for p in {p.parent for p in paths}:
            p.mkdir(parents=True, exist_ok=True)
        jobs = list(zip(members, paths))
        shares = [(zip_path, jobs[i::processes]) for i in range(processes)]
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_jpeg, shares))
        done.touch()
    return paths


def image_folder(paths: list[Path], work: Path, n: int) -> Path:
    """An imagefolder of `n` images, `paths` replicated as hard links (<class>/<replica>_<name>.jpg)."""
    folder = work / f"folder-{n}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        for i in range(n):
            src = paths[i % len(paths)]
            dest = folder / src.parent.name / f"{i // len(paths):03d}_{src.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dest)
        done.touch()
    return folder


def profile(paths: list[Path], images: int = 1000) -> dict:
    """CPU ms per image of each step a decoding process takes, on `images` of the JPEGs, in this process."""
    from cnnpipe.data.chunks import summarize
    from cnnpipe.imaging import decode
    from cnnpipe.data.shards import encode_png

    files = paths[:: max(1, len(paths) // images)][:images]
    steps: dict[str, float] = {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202 - a step and its result
        start = time.process_time()
        out = fn()
        steps[name] = round((time.process_time() - start) * 1000 / len(files), 3)
        return out

    data = timed("read", lambda: [p.read_bytes() for p in files])
    timed("jpeg_decode", lambda: [Image.open(io.BytesIO(d)).load() for d in data])
    pixels = timed("decode_and_resize", lambda: [decode(d, "x", SIZE, 3) for d in data])
    steps["resize_and_convert"] = round(steps.pop("decode_and_resize") - steps["jpeg_decode"], 3)
    timed("png_encode", lambda: [encode_png(x) for x in pixels])
    batch = np.stack(pixels)
    with tempfile.TemporaryDirectory() as d:
        timed("write_and_summarize", lambda: summarize(batch, np.zeros(len(batch), np.int64), None, [], False,
                                                       Path(d) / "part"))
    return {"cpu_ms_per_image": steps, "images": len(files)}


def ingest(folder: Path, work: Path, workers: int) -> dict:
    """Run `cnnpipe ingest` in its own process group; its JSON line, wall time and the group's peak RSS."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    measured = cnnpipe("ingest", "--params", str(ROOT / "params.yaml"), "--source", "imagefolder", "--path", str(folder),
                       "--image-size", str(SIZE), "--channels", "3", "--shards", "always", "--workers", str(workers),
                       "--out", str(out / "processed"), "--report", str(out / "report.json"), cwd=out,
                       stderr_to_terminal=False)
    summary = measured.json_line()
    disk_gb = sum(p.stat().st_size for p in (out / "processed").rglob("*") if p.is_file()) / 1e9
    shutil.rmtree(out)
    return {"images": summary["images"], "workers": summary["workers"], "wall_s": round(measured.wall_s, 1),
            "images_per_s": round(summary["images"] / measured.wall_s), "stage_images_per_s": summary["images_per_s"],
            "peak_group_rss_mb": round(measured.peak_group_rss_mb), "peak_parent_rss_mb": round(measured.peak_rss_mb),
            "output_gb": round(disk_gb, 2), "load_average_before": measured.load_before,
            "load_average_after": measured.load_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zip", type=Path, default=ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
    parser.add_argument("--images", type=int, default=100_000, help="images at 1x (2x is twice that)")
    parser.add_argument("--workers", type=int, default=0, help="ingest.workers (0: the cores available)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-ingest-scale"), help="image folders, outputs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ingest_scale.json")
    args = parser.parse_args()
    if not args.zip.exists():
        sys.exit(f"GTSRB zip not found: {args.zip}")
    args.work.mkdir(parents=True, exist_ok=True)
    paths = originals(args.zip, args.work, os.cpu_count() or 1)
    cpu_profile = profile(paths)
    runs = {}
    for scale in (1, 2):
        runs[f"{scale}x"] = ingest(image_folder(paths, args.work, scale * args.images), args.work, args.workers)
    result = {
        "benchmark": f"cnnpipe ingest of an imagefolder of GTSRB images upscaled to {SIZE}x{SIZE} JPEG (q90), "
                     f"{SIZE} px RGB, shards always",
        "runs": runs,
        "rss_2x_over_1x": round(runs["2x"]["peak_group_rss_mb"] / runs["1x"]["peak_group_rss_mb"], 2),
        "profile": cpu_profile,
        "targets": {"images_per_s": 1000, "rss_2x_over_1x": 1.2},
    }
    record(args.out, result)


if __name__ == "__main__":
    main()
