"""The image's build from nothing with podman (container/build.sh): the debootstrapped base, the whole
build, the image's size, and a rebuild with nothing changed. Runs in a podman store of its own (a
temporary graphroot), so the machine's images are neither used nor touched.

    python -m benchmarks.image_build                        # the components' image (EXTRAS=all); ~6 min
    python -m benchmarks.image_build --extras serve,mlflow  # a serving image -> image_build_serve.json

Needs root, podman, runc, debootstrap.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks.harness import record, run

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/cnnpipe:bench"


def build(env: dict) -> tuple[float, str]:
    measured = run(["bash", str(ROOT / "container" / "build.sh")], env=env)
    return measured.wall_s, measured.stdout


def size_mb(env: dict, image: str) -> int:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], env=env, check=True,
                         capture_output=True, text=True).stdout
    return round(int(out) / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extras", default="all", help="the image's extras (Dockerfile's EXTRAS)")
    args = parser.parse_args()
    name = "image_build" if args.extras == "all" else f"image_build_{args.extras.split(',')[0]}"
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="cnnpipe-podman-") as store:
        conf = Path(store) / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{store}/graph"\nrunroot = "{store}/run"\n')
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "CNNPIPE_IMAGE": IMAGE,
               "CONTAINERS_CONF": str(ROOT / "container" / "containers.conf"), "EXTRAS": args.extras}
        try:
            total, log = build(env)
            base_s = int(re.search(r"build.sh: base \S+ in (\d+) s", log).group(1))
            noop, _ = build(env)
            record(ROOT / "benchmarks" / "results" / f"{name}.json", {
                "what": "container/build.sh from an empty podman store: debootstrap base + Dockerfile",
                "extras": args.extras,
                "from_scratch_s": round(total, 1), "base_s": base_s, "image_mb": size_mb(env, IMAGE),
                "base_mb": size_mb(env, "localhost/debian-python:bookworm"), "rebuild_unchanged_s": round(noop, 1),
                "podman": subprocess.run(["podman", "--version"], capture_output=True, text=True).stdout.strip(),
            })
        finally:
            subprocess.run(["podman", "system", "reset", "--force"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
