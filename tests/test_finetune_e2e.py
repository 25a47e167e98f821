"""Bring your own photos, end to end through `dvc repro`: a folder of JPEG/PNG photos of every size, a
torchvision backbone started from a weights file, registered, predicted and explained; then a second
task with other classes fine-tuned from the first one's champion (`models:/...@champion`), its lineage
recorded on the run and the registered version."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cnnpipe.models import build_model
from tests.helpers import REPO, cnnpipe, run

pytestmark = pytest.mark.e2e
ARCH = "torchvision/resnet18"  # learns the coloured squares in 3 epochs at 32 px (mobilenet_v3_small stays at chance)
COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 210, 40)]


def write_photos(root: Path, classes: int, per_class: int, seed: int) -> None:
    """Class k: a coloured square on a noisy background, photos of assorted sizes and formats."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            a = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
            y, x = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
            a[y:y + h // 2, x:x + w // 2] = COLORS[k]
            img = Image.fromarray(a)
            if i % 3 == 0:
                img.convert("RGBA").save(root / f"class{k}/{i}.png")
            else:
                img.save(root / f"class{k}/{i}.jpg", quality=90)


def client(ws: Path):  # noqa: ANN201
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def set_params(ws: Path, **blocks: dict) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for block, values in blocks.items():
        params[block] |= values
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("photos")
    shutil.copytree(REPO / "cnnpipe", ws / "cnnpipe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, ws / name)
    write_photos(ws / "data/raw/task_a", classes=3, per_class=16, seed=0)
    write_photos(ws / "data/raw/task_b", classes=4, per_class=16, seed=1)
    # "weights from elsewhere": a state dict of the ImageNet-shaped network, saved by torch
    torch.manual_seed(0)
    torch.save(build_model(ARCH, 3, 1000, 224, 16).state_dict(), ws / "imagenet_shaped.pt")
    set_params(ws, ingest={"source": "imagefolder", "path": "data/raw/task_a", "image_size": 32, "channels": 3,
                           "resize": "center_crop", "val_fraction": 0.2, "test_fraction": 0.2},
               augment={"rotate": 0.0, "scale": 0.0, "translate": 0.05},
               train={"arch": ARCH, "pretrained": "imagenet_shaped.pt", "epochs": 3, "batch_size": 16,
                      "optimizer": "adamw", "lr": 0.003, "freeze_epochs": 1},
               evaluate={"tsne_samples": 100}, register={"model_name": "photos-a", "min_accuracy": 0.0})
    run(["git", "init", "-q"], ws)
    run(["dvc", "init", "-q"], ws)
    run(["dvc", "config", "core.analytics", "false"], ws)
    return ws


@pytest.fixture(scope="module")
def task_a(workspace: Path) -> str:
    return run(["dvc", "repro"], workspace)


@pytest.fixture(scope="module")
def task_b(workspace: Path, task_a: str) -> str:
    set_params(workspace, ingest={"path": "data/raw/task_b"},
               train={"pretrained": "models:/photos-a@champion", "backbone_lr": 0.3},
               register={"model_name": "photos-b"})
    return run(["dvc", "repro"], workspace)


def test_weights_file_through_the_whole_pipeline(workspace, task_a):
    for stage in ("ingest", "augment", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in task_a
    assert "pretrained: " in task_a and "new head" in task_a
    manifest = json.loads((workspace / "data/processed/manifest.json").read_text())
    assert manifest["resize"] == "center_crop"
    evaluation = workspace / "data/evaluation"
    for figure in ("first_layer_filters.png", "feature_maps.png", "tsne.png", "misclassified.png"):
        assert (evaluation / figure).stat().st_size > 0, figure
    version = client(workspace).get_model_version_by_alias("photos-a", "champion")
    assert version.tags["cnnpipe.pretrained"] == "imagenet_shaped.pt" and version.tags["arch"] == ARCH


def test_the_champion_predicts_and_explains_raw_photos(workspace, task_a, tmp_path):
    out = tmp_path / "predictions.csv"
    run(["cnnpipe", "predict", "data/raw/task_a/class1", "--model-name", "photos-a", "--output", str(out)], workspace)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 16 and all(r["error"] == "" and r["predicted_class"].startswith("class") for r in rows)
    proc = cnnpipe("explain", "data/raw/task_a/class2/1.jpg", "--model", "models:/photos-a@champion",
                   "--output", str(tmp_path / "cam.png"), cwd=workspace)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["output"] == str(tmp_path / "cam.png") and result["predicted_class"].startswith("class")
    assert Image.open(tmp_path / "cam.png").size[0] > Image.open(tmp_path / "cam.png").size[1]  # image | overlay


def test_fine_tuned_from_the_champion_with_other_classes(workspace, task_b):
    assert "Running stage 'train'" in task_b and "head kept" not in task_b
    c = client(workspace)
    parent = c.get_model_version_by_alias("photos-a", "champion")
    version = c.get_model_version_by_alias("photos-b", "champion")
    lineage = {"cnnpipe.parent.model": "photos-a", "cnnpipe.parent.version": str(parent.version),
               "cnnpipe.parent.run_id": parent.run_id, "cnnpipe.pretrained": "models:/photos-a@champion"}
    assert lineage.items() <= version.tags.items()
    assert lineage.items() <= c.get_run(version.run_id).data.tags.items()
    spec = torch.load(workspace / "data/model/model.pt", weights_only=True)["spec"]
    assert spec["classes"] == [f"class{k}" for k in range(4)]
    assert json.loads((workspace / "data/registered.json").read_text())["name"] == "photos-b"
