"""docs/photos.md's quick start, as a user runs it on a folder of photos in the split layout:
`cnnpipe init` -> `dvc repro` -> `cnnpipe serve` + one request -> `cnnpipe predict` a folder -> `cnnpipe explain`;
then another dataset's model is refused under that name. init writes the photo recipe (checked below); the run
itself trains cnn3 from scratch on 32 px images for 4 epochs to stay short: the ImageNet backbone fine-tuned for
4 epochs on 36 such images stayed near chance (val accuracy <= 0.42 at 32 and 64 px, measured 2026-12-03), and
its accuracy on real photos is benchmarks/photos.py's to measure."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cnnpipe, free_port, make_workspace, run, user_env, wait_for_http

pytestmark = pytest.mark.e2e
COLORS = {"daisy": (230, 210, 40), "rose": (220, 40, 40), "violet": (90, 50, 200)}
# the photo recipe as init writes it, made quick: 32 px, few epochs, no t-SNE, a small net from scratch
FAST = ("ingest.image_size=32 train.epochs=4 train.batch_size=16 evaluate.tsne_samples=0 augment.rotate=0 "
        "train.arch=cnn3 train.pretrained=null")


def write_photos(root: Path, per_split: dict[str, int]) -> None:
    """Each class a coloured square on a noisy background; JPEG, PNG and GIF photos of assorted sizes."""
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for name, color in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(60, 140)), int(rng.integers(60, 140))
                a = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
                a[h // 4:3 * h // 4, w // 4:3 * w // 4] = color
                Image.fromarray(a).save(root / split / name / f"{i}.{('jpg', 'png', 'gif')[i % 3]}")


def test_quick_start_from_a_photo_folder_to_a_served_explained_model(tmp_path):
    ws = make_workspace(tmp_path / "clone")
    run(["git", "add", "-A"], ws)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], ws)
    photos = tmp_path / "flowers"
    write_photos(photos, {"train": 12, "val": 4, "test": 4})
    before = sorted(photos.rglob("*"))

    recipe = cnnpipe("init", str(photos), "--params", "photos.yaml", cwd=ws)  # as a user would run it
    assert recipe.returncode == 0 and json.loads(recipe.stdout)["arch"] == "timm/efficientnet_lite0", recipe.stderr
    init = cnnpipe("init", str(photos), "-S", FAST, cwd=ws)
    assert init.returncode == 0, init.stderr
    written = json.loads(init.stdout)
    assert written["photos"] and written["layout"] == "split folders (train/, val/, test/)"
    assert written["model_name"] == "flowers" and "next: dvc repro" in init.stderr

    repro = run(["dvc", "repro"], ws)
    assert all(f"Running stage '{s}'" in repro for s in ("ingest", "augment", "train", "evaluate", "register"))
    registered = json.loads((ws / "data/registered.json").read_text())
    assert registered["name"] == "flowers" and registered["promotion"]["champion"] == registered["version"]
    report = json.loads((ws / "data/reports/ingest_report.json").read_text())
    assert report["splits"] == {"train": 36, "val": 12, "test": 12} and report["bad_files"] == 0  # GIFs too

    port = free_port()
    server = subprocess.Popen(["cnnpipe", "serve", "--port", str(port)], cwd=ws, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=user_env())
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=(photos / "test/rose/0.jpg").read_bytes(),
                                         headers={"Content-Type": "image/jpeg"})
        answer = json.load(urllib.request.urlopen(request, timeout=60))["predictions"][0]
        assert answer["predicted_class"] in COLORS and 0 < answer["confidence"] <= 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0

    run(["cnnpipe", "predict", str(photos / "test"), "--output", "predictions.csv"], ws)
    rows = list(csv.DictReader((ws / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 12 and all(r["error"] == "" for r in rows)
    assert sum(Path(r["path"]).parent.name == r["predicted_class"] for r in rows) >= 8  # well above chance (4)

    explained = cnnpipe("explain", str(photos / "test/violet/1.png"), cwd=ws)
    assert explained.returncode == 0, explained.stderr
    picture = json.loads(explained.stdout)
    assert Path(picture["output"]) == Path("data/explain/1.gradcam.png") and (ws / picture["output"]).is_file()
    assert sorted(photos.rglob("*")) == before  # nothing written into the data folder

    # another dataset's registered model under this name: refused before a version is created
    from mlflow import MlflowClient

    from cnnpipe.stages.register import CLASSES_TAG, classes_digest

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("digits")
    client.create_model_version("digits", source=str(ws / "data/model"),
                                tags={CLASSES_TAG: classes_digest([str(d) for d in range(10)])})
    refused = cnnpipe("register", "-S", "register.model_name=digits", cwd=ws)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr  # one line, no warnings
    assert refused.stderr.startswith("cnnpipe register: error: register.model_name 'digits': its version 1 predicts "
                                     "other classes") and refused.stderr.endswith("no version created\n")
    assert len(client.search_model_versions("name = 'digits'")) == 1
