import json

import numpy as np
import pytest

from cnnpipe.data.split import stratified_split
from cnnpipe.data.store import Split, read_dataset, write_dataset
from cnnpipe.errors import CnnpipeError
from tests.helpers import make_images, write_tiny_dataset


def test_roundtrip_and_manifest(tmp_path):
    path = write_tiny_dataset(tmp_path / "ds", classes=3, size=8, channels=3)
    ds = read_dataset(path)
    assert ds.classes == ["class0", "class1", "class2"]
    assert ds.splits["train"].images.shape == (36, 8, 8, 3) and ds.splits["train"].images.dtype == np.uint8
    assert isinstance(ds.splits["train"].images, np.memmap)  # memory-mapped, not loaded
    m = ds.manifest
    assert m["counts"]["train"]["per_class"] == {"class0": 12, "class1": 12, "class2": 12}
    assert m["image_size"] == 8 and m["channels"] == 3 and len(m["mean"]) == 3
    expected_mean = ds.splits["train"].images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(m["mean"], expected_mean, atol=1e-5)


def test_failed_write_leaves_nothing(tmp_path):
    images, labels = make_images(4, 2, 8, 1)
    bad = {"train": Split(images, labels), "val": Split(images.astype(np.float32), labels)}
    with pytest.raises(ValueError):
        write_dataset(tmp_path / "ds", ["a", "b"], bad, {"source": {"name": "x"}})
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_atomically(tmp_path):
    write_tiny_dataset(tmp_path / "ds", classes=3)
    write_tiny_dataset(tmp_path / "ds", classes=2)
    assert read_dataset(tmp_path / "ds").classes == ["class0", "class1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(CnnpipeError, match="not found"):
        read_dataset(tmp_path / "missing")
    path = write_tiny_dataset(tmp_path / "ds")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(CnnpipeError, match="manifest.json.*expected format"):
        read_dataset(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "image_size": 16}))
    with pytest.raises(CnnpipeError, match="train_images.npy.*expected uint8 N x 16 x 16 x 1"):
        read_dataset(path)


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), [50, 30, 10, 3])
    a = stratified_split(labels, {"val": 0.2, "test": 0.2}, seed=1)
    b = stratified_split(labels, {"val": 0.2, "test": 0.2}, seed=1)
    c = stratified_split(labels, {"val": 0.2, "test": 0.2}, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    everything = np.concatenate(list(a.values()))
    assert sorted(everything) == list(range(len(labels)))  # disjoint and complete
    assert np.bincount(labels[a["val"]]).tolist() == [10, 6, 2, 1]  # the 3-image class still reaches val
