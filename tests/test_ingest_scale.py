"""ingest at scale: decoding processes, bounded memory, resuming after a kill (cnnpipe/data/chunks.py,
store.DatasetWriter, fsio.staged_dir)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import IngestConfig
from cnnpipe.data.store import DatasetWriter, read_dataset
from cnnpipe.stages import ingest
from tests.helpers import user_env

ROOT = Path(__file__).resolve().parents[1]


def photos(root: Path, n: int, side: int = 24, fmt: str = "PNG", classes: int = 3) -> Path:
    """`n` distinct noise images in root/<class>/ (noise: no two alike, so nothing is a duplicate)."""
    rng = np.random.default_rng(n)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(folder / f"{i:05d}.{fmt.lower()}", fmt)
    return root


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_ingest(out: Path, **kw) -> dict:
    cfg = IngestConfig(**{"source": "imagefolder", "image_size": 16, "channels": 3, "shards": "always",
                          "shard_images": 7, "max_bad_fraction": 0.1, **kw})
    return ingest.run(cfg=cfg, data=out / "processed", report=out / "report.json")


@pytest.mark.parametrize("archive", [False, True])
def test_the_output_does_not_depend_on_the_workers(tmp_path, archive):
    root = photos(tmp_path / "photos", 60)
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = root
    if archive:  # a tar is held by the parent; the workers get each chunk's members
        path = tmp_path / "photos.tar"
        with tarfile.open(path, "w") as tar:
            tar.add(root, arcname="photos")
    one = run_ingest(tmp_path / "one", path=str(path), workers=1)
    two = run_ingest(tmp_path / "two", path=str(path), workers=2)
    assert one["workers"] == 1 and two["workers"] == 2 and one["chunks"] == two["chunks"] == 10
    assert hashes(tmp_path / "one") == hashes(tmp_path / "two")  # arrays, shards, manifest, figures, report
    report = json.loads((tmp_path / "two/report.json").read_text())
    assert report["bad_files"] == 1 and report["bad_file_list"][0]["path"].endswith("class1/broken.png")
    ds = read_dataset(tmp_path / "two/processed")
    assert sum(len(s.labels) for s in ds.splits.values()) == 60 == two["images"]
    assert len(set(ds.splits["train"].labels[:7].tolist())) == 3  # a chunk (a shard) holds every class


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak traced allocation (numpy arrays included) of ingesting 200 and 400 images: a few chunks either way."""
    run_ingest(tmp_path / "warm", path=str(photos(tmp_path / "few", 30)))  # imports and font caches: not traced
    peaks = []
    for n in (200, 400):
        root = photos(tmp_path / f"photos{n}", n, side=128)
        tracemalloc.start()
        run_ingest(tmp_path / f"out{n}", path=str(root), image_size=128, shards="never", shard_images=50, workers=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    more_pixels = 200 * 128 * 128 * 3  # what the larger set decodes more: 9.8 MB
    assert peaks[1] - peaks[0] < more_pixels / 4, peaks  # not even a quarter of it is held at once


def test_an_interrupted_ingest_resumes_from_its_intact_chunks(tmp_path, monkeypatch):
    root = photos(tmp_path / "photos", 50)
    whole = run_ingest(tmp_path / "whole", path=str(root), workers=1)

    def killed(self, manifest):  # noqa: ANN001 - interrupted after every chunk is journaled
        raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(DatasetWriter, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            run_ingest(out, path=str(root), workers=1)
    staging = out / ".processed.staging"
    assert not (out / "processed").exists() and (staging / "journal.jsonl").exists()
    assert journaled_chunks(staging) == whole["chunks"]
    part = sorted((staging / "parts").glob("val-*.images"))[0]
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with monkeypatch.context() as m:
        m.setattr(DatasetWriter, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            run_ingest(out, path=str(root), workers=1)
    assert journaled_chunks(staging) == whole["chunks"] + 1  # the damaged chunk, and only it, decoded again
    resumed = run_ingest(out, path=str(root), workers=1)
    assert resumed["chunks_reused"] == whole["chunks"]
    assert hashes(out / "processed") == hashes(tmp_path / "whole/processed") and not staging.exists()

    with monkeypatch.context() as m:
        m.setattr(DatasetWriter, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            run_ingest(out, path=str(root), workers=1)
    assert run_ingest(out, path=str(root), workers=1, seed=1)["chunks_reused"] == 0  # another config: afresh


def test_too_many_bad_files_leave_no_staging(tmp_path):
    root = photos(tmp_path / "photos", 20)
    for i in range(5):
        (root / "class0" / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.raises(Exception, match=r"5 of 25 files are unusable"):
        run_ingest(tmp_path, path=str(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "report.json"]


def journaled_chunks(staging: Path) -> int:
    journal = staging / "journal.jsonl"
    return max(0, len(journal.read_text().splitlines()) - 1) if journal.exists() else 0


@pytest.mark.e2e
def test_ingest_killed_mid_way_resumes_and_matches_an_uninterrupted_run(tmp_path):
    root = photos(tmp_path / "photos", 900, side=256, fmt="JPEG")
    args = ["ingest", "--params", str(ROOT / "params.yaml"), "--source", "imagefolder", "--path", str(root),
            "--image-size", "64", "--channels", "3", "--shards", "always", "--shard-images", "15", "--workers", "2"]

    def ingest_cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "cnnpipe", *args, "--out", str(out / "processed"), "--report", str(out / "r.json")]

    whole = subprocess.run(ingest_cmd(tmp_path / "whole"), capture_output=True, text=True, env=user_env(), timeout=600)
    assert whole.returncode == 0, whole.stderr
    chunks = json.loads(whole.stdout)["chunks"]

    out = tmp_path / "killed"
    proc = subprocess.Popen(ingest_cmd(out), env=user_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while journaled_chunks(out / ".processed.staging") < 8:
            assert proc.poll() is None and time.time() < deadline, "ingest ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = journaled_chunks(out / ".processed.staging")
    assert not (out / "processed").exists() and 8 <= done < chunks

    again = subprocess.run(ingest_cmd(out), capture_output=True, text=True, env=user_env(), timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["chunks_reused"] == done  # the finished chunks were not decoded again
    assert hashes(out / "processed") == hashes(tmp_path / "whole/processed")
    assert not (out / ".processed.staging").exists()
