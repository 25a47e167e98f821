"""A folder of photos as users bring it: split or class folders (refused layouts: one line), every format
serving accepts, skipped files listed; `ingest.source: auto`; `cnnpipe init`."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnpipe.config import BLOCKS, IngestConfig, load_block, read_params
from cnnpipe.data.archive import ArchiveLimits, FileTree
from cnnpipe.data.sources import resolve_source
from cnnpipe.data.sources.imagefolder import read_layout
from cnnpipe.errors import CnnpipeError
from cnnpipe.init_params import model_name_for
from cnnpipe.init_params import run as init
from cnnpipe.imaging import IMAGE_FORMATS, IMAGE_SUFFIXES

COLORS = {"cat": (220, 40, 40), "dog": (40, 40, 220), "owl": (40, 200, 40)}


def photo(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 14), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 30, (size[1], size[0], 3))
    Image.fromarray(np.clip(noise + np.array(color), 0, 255).astype(np.uint8)).save(path)


def photo_folder(root: Path, layout: dict[str, dict[str, int]], size: tuple[int, int] = (20, 14)) -> Path:
    """`layout`: folder (a split, or "" for class folders at the root) -> class -> images."""
    for folder, classes in layout.items():
        for c, n in classes.items():
            for i in range(n):
                photo(root / folder / c / f"{i}.{('png', 'jpg', 'gif')[i % 3]}", COLORS[c], size, seed=i)
    return root


def tree(path: Path) -> FileTree:
    return FileTree(path, ArchiveLimits(256, 100, 8192))


def test_ingest_reads_every_format_serving_accepts(tmp_path):
    from cnnpipe.imaging import decode, to_array
    from cnnpipe.serving.contract import parse_body

    assert {".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm"} <= set(IMAGE_SUFFIXES)
    assert set(IMAGE_FORMATS) == {Image.registered_extensions()[s] for s in IMAGE_SUFFIXES}
    photo(tmp_path / "a.gif", (200, 30, 30))
    data = (tmp_path / "a.gif").read_bytes()
    assert parse_body(data, "image/gif")[0] == [data]  # a server takes it as ingest does
    assert np.array_equal(decode(data, "a.gif", 8, 3), to_array(data, 8, 3))


def test_split_folders_are_the_splits_and_a_missing_class_is_named(tmp_path):
    from cnnpipe.data.store import read_dataset
    from cnnpipe.stages import ingest

    root = photo_folder(tmp_path / "photos", {"train": {"cat": 6, "dog": 6}, "validation": {"cat": 3, "dog": 3},
                                              "test": {"cat": 2}})
    (root / "train/cat/notes.txt").write_text("not a photo")
    report = tmp_path / "report.json"
    cfg = IngestConfig(path=str(root), image_size=8, channels=3, workers=1)
    result = ingest.run(cfg=cfg, data=tmp_path / "processed", report=report)
    assert result["source"] == "imagefolder" and "image files" in result["source_detected_from"]
    assert result["layout"] == "split folders (train/, val/, test/)"
    assert result["splits"] == {"train": 12, "val": 6, "test": 2}  # nothing carved: the folders are the splits
    assert result["warnings"] == ["class dog missing from test/: its test metrics cannot score it"]
    written = json.loads(report.read_text())
    assert written["skipped_files"] == 1 and written["skipped_file_list"][0]["path"].endswith("train/cat/notes.txt")
    ds = read_dataset(tmp_path / "processed")
    assert ds.classes == ["cat", "dog"] and ds.manifest["split"]["official"] == ["val", "test"]
    assert ds.splits["val"].images[ds.splits["val"].labels == 1, ..., 2].mean() > 150  # dog's photos are blue


@pytest.mark.parametrize("val", ["val", "valid", "validation", "Val"])
def test_every_validation_folder_name(tmp_path, val):
    layout = read_layout(tree(photo_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, val: {"cat": 1, "dog": 1}})),
                         "p")
    assert layout.kind == "splits" and set(layout.files) == {"train", "val"}
    assert layout.files["val"]["dog"] == [f"{val}/dog/0.png"]


def test_class_folders_as_before_and_an_archive_of_split_folders(tmp_path):
    layout = read_layout(tree(photo_folder(tmp_path / "a", {"": {"cat": 2, "dog": 1}})), "a")
    assert layout.kind == "classes" and layout.files == {"train": {"cat": ["cat/0.png", "cat/1.jpg"],
                                                                   "dog": ["dog/0.png"]}}
    root = photo_folder(tmp_path / "b", {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as z:
        for p in sorted(root.rglob("*.png")):
            z.write(p, f"photos/{p.relative_to(root).as_posix()}")  # one top folder, looked through
        z.writestr("__MACOSX/photos/train/cat/._0.png", b"AppleDouble")  # a Mac's zip: no photo, no class
        z.writestr("photos/.DS_Store", b"Finder")
    layout = read_layout(tree(tmp_path / "b.zip"), "b.zip")
    assert [s["reason"] for s in layout.skipped] == ["a hidden file or macOS metadata"] * 2
    assert layout.kind == "splits" and layout.files["test"] == {"cat": ["photos/test/cat/0.png"],
                                                                "dog": ["photos/test/dog/0.png"]}


@pytest.mark.parametrize("layout, message", [
    ({"": {}}, "a flat folder of images, no class folders"),
    ({"train": {}, "val": {}}, "train/ holds images directly (class folders may not be named like splits"),
    ({"train": {"cat": 1}, "": {"dog": 1}}, "split folders (train) beside other folders (dog)"),
    ({"train": {"cat": 1}, "val": {"cat": 1}, "valid": {"cat": 1}}, "val, valid are the same split"),
    ({"val": {"cat": 1}, "test": {"cat": 1}}, "split folders (test, val) but no train/"),
])
def test_refused_layouts_say_what_was_expected(tmp_path, layout, message):
    root = photo_folder(tmp_path / "p", {k: v for k, v in layout.items() if v})
    for folder, classes in layout.items():
        if not classes:  # images directly in this folder
            photo(root / folder / "a.png", (0, 0, 0))
    with pytest.raises(CnnpipeError, match=re.escape(message)) as e:
        read_layout(tree(root), "p")
    assert "\n" not in str(e.value) and ("expected" in str(e.value))


def test_auto_source_is_told_from_the_path(tmp_path):
    def detected(path: Path | None) -> str:
        cfg, _ = resolve_source(IngestConfig(path=None if path is None else str(path)))
        return cfg.source

    assert detected(None) == "digits"
    assert detected(photo_folder(tmp_path / "photos", {"": {"cat": 1}})) == "imagefolder"
    gtsrb = tmp_path / "GTSRB/Final_Training/Images/00000"
    photo(gtsrb / "00000_00000.ppm", (0, 0, 0))
    (gtsrb / "GT-00000.csv").write_text("Filename;ClassId\n00000_00000.ppm;0\n")
    assert detected(tmp_path / "GTSRB") == "gtsrb"
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in ("batches.meta", "data_batch_1"):
        (cifar / name).write_bytes(pickle.dumps({}))
    assert detected(cifar) == "cifar10"
    (tmp_path / "signs").mkdir()
    (tmp_path / "signs/train.p").write_bytes(pickle.dumps({}))
    assert detected(tmp_path / "signs") == detected(tmp_path / "signs/train.p") == "pickle"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_text("x")
    with pytest.raises(CnnpipeError, match="cannot tell the dataset: expected an image folder"):
        detected(tmp_path / "docs")


def test_a_path_with_digits_is_an_error(tmp_path):
    with pytest.raises(CnnpipeError, match="ingest.path 'x' given with ingest.source digits, which reads no files"):
        resolve_source(IngestConfig(source="digits", path="x"))
    with pytest.raises(CnnpipeError, match="ingest.test_path 't' given without ingest.path"):
        resolve_source(IngestConfig(test_path="t"))


def test_init_writes_a_complete_commented_params_file_for_photos(tmp_path):
    root = photo_folder(tmp_path / "My Holiday Photos", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}},
                        size=(120, 90))
    params_file = tmp_path / "params.yaml"
    result = init(path=root, params_file=params_file, force=False, overrides={"train.epochs": 3})
    assert result["photos"] and result["model_name"] == "my-holiday-photos" and result["next"] == "dvc repro"
    params = read_params(params_file)
    for block, cls in BLOCKS.items():  # every knob, loadable
        load_block(cls, block, params, {}, params_file)
    assert params["ingest"] | {"source": "imagefolder", "path": "My Holiday Photos", "image_size": 224,
                               "channels": 3, "resize": "center_crop"} == params["ingest"]
    assert params["train"]["pretrained"] == "imagenet" and params["train"]["arch"].startswith("timm/")
    assert params["train"]["epochs"] == 3 and params["tracking"]["experiment"] == "my-holiday-photos"
    text = params_file.read_text()
    assert "# images are resized to image_size x image_size" in text and "next: dvc repro" in text
    import jsonschema

    from tests.helpers import REPO

    assert text.startswith("# yaml-language-server: $schema=params.schema.json\n")  # what editors check it against
    jsonschema.validate(params, json.loads((REPO / "params.schema.json").read_text()))
    with pytest.raises(CnnpipeError, match="exists with changes git does not hold; expected --force"):
        init(path=root, params_file=params_file, force=False, overrides={})
    init(path=root, params_file=params_file, force=True, overrides={})
    assert read_params(params_file)["train"]["epochs"] == BLOCKS["train"]().epochs


def test_init_small_images_train_from_scratch_at_their_size(tmp_path):
    root = photo_folder(tmp_path / "icons", {"": {"cat": 2, "owl": 2}}, size=(30, 34))
    init(path=root, params_file=tmp_path / "params.yaml", force=False, overrides={})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert (params["ingest"]["image_size"], params["ingest"]["channels"]) == (32, 3)
    assert params["train"]["pretrained"] is None and params["register"]["model_name"] == "icons"


def test_init_replaces_a_params_file_git_holds_unchanged(tmp_path):
    root = photo_folder(tmp_path / "photos", {"": {"cat": 1, "dog": 1}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text("ingest: {}\n")
    for cmd in (["init", "-q"], ["add", "params.yaml"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True)
    init(path=root, params_file=params_file, force=False, overrides={})  # git holds what it replaces
    assert read_params(params_file)["register"]["model_name"] == "photos"


def test_model_names_from_folder_and_archive_names():
    assert model_name_for(Path("/data/Flowers_102")) == "flowers-102"
    assert model_name_for(Path("pets.tar.gz")) == "pets"


def test_init_takes_the_photo_recipe_and_its_reasons_from_the_project(tmp_path):
    root = photo_folder(tmp_path / "pets", {"": {"cat": 2, "dog": 2}}, size=(100, 80))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/photos.yaml").write_text(
        "ingest:\n  source: imagefolder\n  path: data/raw/photos\n  image_size: 160  # measured: 160 px is enough\n"
        "  resize: center_crop\n  channels: 3\ntrain:\n  arch: timm/efficientnet_lite0\n  pretrained: imagenet\n"
        "  backbone_lr: 0.1     # the backbone fine-tunes at a tenth\n                        # of the head's rate\n")
    result = init(path=root, params_file=tmp_path / "params.yaml", force=False, overrides={})
    assert result["recipe"] == "configs/photos.yaml" and result["image_size"] == 160
    params = read_params(tmp_path / "params.yaml")
    assert params["train"]["backbone_lr"] == 0.1 and params["ingest"]["path"] == "pets"
    text = (tmp_path / "params.yaml").read_text()
    assert "backbone_lr: 0.1  # the backbone fine-tunes at a tenth of the head's rate" in text
    assert "image_size: 160  # init: photos (median 100x80): the photo recipe (configs/photos.yaml)" in text
