"""Shards (cnnpipe/data/shards.py) and the stream path of training (cnnpipe/engine/stream.py)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import multiprocessing
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnpipe.augment import AugmentPolicy, no_flips
from cnnpipe.config import AugmentConfig, TrainConfig
from cnnpipe.data.shards import read_shard, shard_list
from cnnpipe.data.store import MANIFEST_FILE, Split, read_dataset, write_dataset
from cnnpipe.engine.distributed import Dist
from cnnpipe.engine.inference import stats_tensors, to_nchw_uint8
from cnnpipe.engine.loop import TrainData, fit
from cnnpipe.engine.stream import StreamBatches
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import build_model
from cnnpipe.stages import augment as augment_stage
from cnnpipe.stages import train as train_stage
from tests.helpers import REPO, cnnpipe, make_images, user_env

CPU = torch.device("cpu")


def sharded_dataset(path: Path, n: int = 20, per_shard: int = 7, boxes: bool = False, size: int = 8) -> Path:
    splits = {}
    for i, name in enumerate(("train", "val", "test")):
        images, labels = make_images(n if name == "train" else 6, 3, size, 1, seed=i)
        box = np.tile(np.array([[1, 1, size - 1, size - 2]], np.float32), (len(labels), 1)) if boxes else None
        splits[name] = Split(images, labels, box)
    write_dataset(path, ["a", "b", "c"], splits, {"source": {"name": "tiny", "path": None, "inputs": []}},
                  shard_images=per_shard)
    return path


def decode_all(path: Path, split: str = "train"):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    shards = shard_list(manifest, split, str(path))
    return [read_shard(path, s, shape=(8, 8, 1), num_classes=3, boxes=bool(manifest["boxes"])) for s in shards]


def test_shards_round_trip_the_arrays_and_are_webdataset_readable(tmp_path):
    path = sharded_dataset(tmp_path / "ds", boxes=True)
    ds = read_dataset(path)
    for split in ("train", "val", "test"):
        parts = decode_all(path, split)
        indexes = np.concatenate([p.indexes for p in parts])
        assert sorted(indexes) == list(range(len(ds.splits[split].labels)))  # every image once
        if split == "train":  # in a fixed random order, not the split's (sorted by class)
            assert list(indexes) != sorted(indexes)
        np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), ds.splits[split].images[indexes])
        np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), ds.splits[split].labels[indexes])
        np.testing.assert_array_equal(np.concatenate([p.boxes for p in parts]), ds.splits[split].boxes[indexes])
    manifest = ds.manifest
    assert [s["count"] for s in manifest["shards"]["train"]] == [7] * 8 + [4] and manifest["shard_images"] == 7
    # the same data gives byte-identical shards (DVC sees no change on a re-run)
    again = sharded_dataset(tmp_path / "again", boxes=True)
    assert json.loads((again / MANIFEST_FILE).read_text())["shards"] == manifest["shards"]
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(path / manifest["shards"]["train"][0]["file"]), shardshuffle=False)
                      .decode("l")))
    at = int(first["__key__"])
    assert int(first["cls"]) == ds.splits["train"].labels[at] and first["box.json"] == [1, 1, 7, 6]
    np.testing.assert_array_equal(first["png"], (ds.splits["train"].images[at, ..., 0] / 255.0).astype(np.float32))


def test_tars_of_other_writers_give_the_same_samples(tmp_path):
    """Plain ustar members are read from their headers; anything else (pax headers, a directory) sends the
    archive through tarfile: the same samples either way."""
    from cnnpipe.data.shards import _samples, _tarfile_samples

    data = (sharded_dataset(tmp_path / "ds", boxes=True) / "shards" / "train-000000.tar").read_bytes()
    samples = _samples(data)
    assert samples == _tarfile_samples(data) and len(samples) == 7
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo("train")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for key, fields in samples:
            for ext, body in fields.items():
                info = tarfile.TarInfo(f"train/{key}.{ext}")
                info.size, info.pax_headers = len(body), {"comment": "written elsewhere"}
                tar.addfile(info, io.BytesIO(body))
    assert _samples(buf.getvalue()) == samples


def test_augment_of_a_sharded_dataset_writes_shards_of_the_balanced_split(tmp_path):
    path = sharded_dataset(tmp_path / "ds")
    out = augment_stage.run(cfg=AugmentConfig(balance_to=25), data=path, augmented=tmp_path / "aug")
    aug = read_dataset(tmp_path / "aug", splits=("train",))
    assert out["train_images"] == 75 == sum(s["count"] for s in aug.manifest["shards"]["train"])
    parts = decode_all(tmp_path / "aug")
    indexes = np.concatenate([p.indexes for p in parts])
    np.testing.assert_array_equal(np.concatenate([p.images for p in parts]), aug.splits["train"].images[indexes])


def _bad(tmp_path: Path, change) -> Path:  # noqa: ANN001 - a function editing the first training shard's samples
    path = sharded_dataset(tmp_path / "ds")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    entry = manifest["shards"]["train"][0]
    with tarfile.open(path / entry["file"]) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    files = change(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (path / entry["file"]).write_bytes(buf.getvalue())
    entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()  # a consistent manifest: the content is what is bad
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("case, message", [
    ("truncated", r"shard '.*train-000000.tar': sha256 does not match the manifest's"),
    ("missing", r"shard '.*train-000000.tar': not found .*listed in the dataset's manifest"),
    ("wrong_label", r"shard '.*train-000000.tar': sample \d{9} has label 7, outside 0..2"),
    ("no_label", r"shard '.*train-000000.tar': sample \d{9} has no .cls file"),
    ("not_png", r"shard '.*train-000000.tar': sample \d{9} cannot be decoded"),
])
def test_a_bad_shard_is_one_line_naming_it(tmp_path, case, message):
    if case in ("truncated", "missing"):
        path = sharded_dataset(tmp_path / "ds")
        shard = path / "shards" / "train-000000.tar"
        if case == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:1500])
    else:
        def key(files: dict, n: int) -> str:  # the shard's n-th sample (shards hold a random order of the split)
            return list(dict.fromkeys(name.split(".")[0] for name in files))[n]

        change = {"wrong_label": lambda f: {**f, f"{key(f, 1)}.cls": b"7"},
                  "no_label": lambda f: {k: v for k, v in f.items() if k != f"{key(f, 2)}.cls"},
                  "not_png": lambda f: {**f, f"{key(f, 0)}.png": b"not an image"}}[case]
        path = _bad(tmp_path, change)
    with pytest.raises(CnnpipeError, match=message) as e:
        decode_all(path)
    assert "\n" not in str(e.value)
    # the same line when a loader worker process meets it
    batches = StreamBatches(path, read_dataset(path, splits=()).manifest, batch_size=4, shuffle_buffer=0, workers=2,
                            seed=0, dist=Dist(), device=CPU)
    with pytest.raises(CnnpipeError, match=message) as e:
        for epoch in (1, 2, 3):  # the shard order changes per epoch: the bad one comes up
            list(batches.epoch(epoch))
    assert "\n" not in str(e.value)


def _batches(path: Path, epoch: int, workers: int, seed: int = 0, dist: Dist | None = None, buffer: int = 8,
             bs: int = 4):
    manifest = read_dataset(path, splits=()).manifest
    source = StreamBatches(path, manifest, batch_size=bs, shuffle_buffer=buffer, workers=workers, seed=seed, dist=dist or Dist(),
                           device=CPU)
    return source, [(x.clone(), y.clone()) for x, y, _ in source.epoch(epoch)]


def test_stream_order_is_a_function_of_seed_and_epoch_not_of_workers(tmp_path):
    path = sharded_dataset(tmp_path / "ds", n=30, per_shard=5)
    train = read_dataset(path).splits["train"]
    source, one = _batches(path, 1, workers=0)
    _, same = _batches(path, 1, workers=3)
    _, other_epoch = _batches(path, 2, workers=2)
    _, other_seed = _batches(path, 1, workers=0, seed=1)
    labels = lambda run: torch.cat([y for _, y in run]).tolist()  # noqa: E731
    images = lambda run: torch.cat([x for x, _ in run])  # noqa: E731
    assert len(one) == source.steps(1) == 23 and source.seen(1) == 90  # ceil(90 / 4); every image once
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, same)) and len(one) == len(same)
    assert labels(one) != labels(other_epoch) and labels(one) != labels(other_seed)
    # each epoch is a permutation of the training split (N x C x H x W, as the device path's batches)
    want = sorted(map(bytes, to_nchw_uint8(train.images, CPU).reshape(len(train.labels), -1).numpy()))
    assert sorted(map(bytes, images(other_epoch).reshape(len(train.labels), -1).numpy())) == want


def test_loader_workers_persist_across_epochs_and_keep_every_epochs_order(tmp_path):
    path = sharded_dataset(tmp_path / "ds", n=30, per_shard=7)
    dist = Dist(rank=1, world=2)
    expected = {epoch: _batches(path, epoch, workers=1, dist=dist)[1] for epoch in (1, 2)}  # each from new workers
    source = StreamBatches(path, read_dataset(path, splits=()).manifest, batch_size=4, shuffle_buffer=8, workers=2,
                           seed=0, dist=dist, device=CPU)
    before = set(multiprocessing.active_children())
    workers = []
    for epoch in (1, 2, 2, 1):
        if epoch == 2 and workers:  # an epoch left after one batch: the next one still starts at its own first shard
            next(iter(source.epoch(epoch)))
        got = [(x.clone(), y.clone()) for x, y, _ in source.epoch(epoch)]
        assert len(got) == len(expected[epoch]) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                                        for a, b in zip(got, expected[epoch]))
        workers.append(set(multiprocessing.active_children()) - before)
    assert len(workers[0]) == 2 and all(w == workers[0] for w in workers)  # started once, in the first epoch


def test_ranks_read_disjoint_shards_and_take_the_same_number_of_steps(tmp_path):
    path = sharded_dataset(tmp_path / "ds", n=30, per_shard=7)  # 13 shards of 7 images, the last of 6
    runs = [_batches(path, 1, workers=1, dist=Dist(rank=r, world=3)) for r in range(3)]
    plans = runs[0][0]._plans(1)
    assert sorted(i for plan in plans for i in plan) == list(range(13))
    steps = {len(batches) for _, batches in runs}
    assert steps == {runs[0][0].steps(1)}
    seen = sum(len(y) for _, batches in runs for _, y in batches)
    assert seen == runs[0][0].seen(1) <= 90
    with pytest.raises(CnnpipeError, match="13 shard\\(s\\) .* cannot feed 14 processes"):
        _batches(path, 1, workers=0, dist=Dist(rank=0, world=14))


def _stream_data(path: Path, cfg: TrainConfig) -> TrainData:
    ds = read_dataset(path, splits=("val",))
    mean, std = stats_tensors(ds.manifest["mean"], ds.manifest["std"], CPU)
    val = ds.splits["val"]
    return TrainData(None, None, to_nchw_uint8(val.images, CPU), torch.from_numpy(val.labels), mean, std,
                     train_stream=StreamBatches(path, ds.manifest, batch_size=cfg.batch_size,
                                                shuffle_buffer=cfg.shuffle_buffer, workers=1, seed=cfg.seed,
                                                dist=Dist(), device=CPU))


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_resume_of_a_streamed_run_repeats_the_uninterrupted_run(tmp_path):
    path = sharded_dataset(tmp_path / "ds", n=20, per_shard=8)
    cfg = TrainConfig(arch="cnn3", width=8, epochs=3, batch_size=16, lr=0.05, ema=0.9, shuffle_buffer=10)
    policy = AugmentPolicy(translate=0.1, rotate=10, scale=0.1, shear=0, brightness=0.2, contrast=0.2, saturation=0,
                           cutout=0.2, hflip=no_flips(3))
    torch.manual_seed(0)
    states = []
    full = fit(build_model("cnn3", 1, 3, 8, 8), _stream_data(path, cfg), cfg, policy,
               checkpoint=lambda st: states.append(copy.deepcopy(st)))
    resumed = fit(build_model("cnn3", 1, 3, 8, 8), _stream_data(path, cfg), cfg, policy, resume=states[0])
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k and "per_s" not in k} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_stream_and_device_paths_train_to_the_same_quality(tmp_path):
    size = 16
    splits = {}
    for i, name in enumerate(("train", "val", "test")):
        splits[name] = Split(*make_images(100 if name == "train" else 40, 3, size, 1, seed=i))
    write_dataset(tmp_path / "processed", ["a", "b", "c"], splits, {"source": {"name": "tiny", "path": None,
                                                                               "inputs": []}}, shard_images=64)
    augment_stage.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    results = {}
    for mode in ("device", "stream"):
        cfg = TrainConfig(arch="cnn3", width=8, epochs=4, batch_size=32, lr=0.05, data_mode=mode, loader_workers=1,
                          shuffle_buffer=128)
        results[mode] = train_stage.run(cfg=cfg, data=tmp_path / "processed", augmented=tmp_path / "augmented",
                                        model=tmp_path / mode, tracking=None)
    assert results["device"]["val_accuracy"] > 0.9
    assert abs(results["stream"]["val_accuracy"] - results["device"]["val_accuracy"]) <= 0.05
    # auto: the device path while the split fits the budget, the stream past it (here: a budget of 0)
    manifest = read_dataset(tmp_path / "augmented", splits=()).manifest
    assert train_stage.data_path(TrainConfig(), manifest) == "device"
    assert train_stage.data_path(TrainConfig(device_budget_mb=0.0), manifest) == "stream"
    # stream asked of a dataset written without shards
    write_dataset(tmp_path / "plain", ["a", "b", "c"], {"train": splits["train"]}, {"source": {"name": "tiny"}})
    (tmp_path / "plain" / "policy.json").write_text((tmp_path / "augmented" / "policy.json").read_text())
    (tmp_path / "plain" / "preview.png").write_bytes(b"")
    with pytest.raises(CnnpipeError, match="dataset '.*plain': no shards of the train split"):
        train_stage.run(cfg=TrainConfig(data_mode="stream", epochs=1), data=tmp_path / "processed",
                        augmented=tmp_path / "plain", model=tmp_path / "m", tracking=None)


def upload(folder: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")


@pytest.mark.e2e
def test_cnnpipe_train_streams_shards_from_s3(tmp_path, moto):
    import boto3

    sharded_dataset(tmp_path / "processed", n=60, per_shard=16, size=16)
    augment_stage.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    boto3.client("s3").create_bucket(Bucket="data")
    upload(tmp_path / "processed", "data", "gtsrb/processed")
    upload(tmp_path / "augmented", "data", "gtsrb/augmented")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    args = ["train", "--data", "s3://data/gtsrb/processed", "--augmented", "s3://data/gtsrb/augmented/",
            "--out", str(tmp_path / "model"), "--no-tracking", "--epochs", "3", "--width", "8", "--batch-size", "16",
            "--checkpoint", str(tmp_path / "ckpt.pt")]
    proc = cnnpipe(*args, "--data-mode", "stream", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from shards" in proc.stderr
    assert json.loads(proc.stdout)["epochs"] == 3 and (tmp_path / "model" / "model.pt").exists()
    # the device path reads the same remote dataset's arrays
    device = cnnpipe(*args[:6], str(tmp_path / "model2"), *args[7:], "--data-mode", "device", cwd=tmp_path)
    assert device.returncode == 0, device.stderr[-3000:]
    # a shard gone from the bucket: one line naming it, exit 2, no model
    boto3.client("s3").delete_object(Bucket="data", Key="gtsrb/augmented/shards/train-000001.tar")
    proc = cnnpipe(*args[:6], str(tmp_path / "model3"), *args[7:], "--data-mode", "stream", cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "model3").exists()
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "shard 's3://data/gtsrb/augmented/shards/train-000001.tar': not found (listed in the dataset's manifest)")


@pytest.mark.e2e
def test_ddp_ranks_stream_their_own_shards(tmp_path):
    """torchrun, 2 CPU processes (gloo), each reading its share of the shards."""
    sharded_dataset(tmp_path / "processed", n=24, per_shard=8)
    augment_stage.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "cnnpipe", "train", "--params",
         str(REPO / "params.yaml"), "--no-tracking", "--epochs", "2", "--width", "4", "--batch-size", "16",
         "--data-mode", "stream", "--loader-workers", "1",
         "--data", str(tmp_path / "processed"), "--augmented", str(tmp_path / "augmented"),
         "--out", str(tmp_path / "model"), "--checkpoint", str(tmp_path / "ckpt.pt")],
        capture_output=True, text=True, timeout=300, env={**user_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from shards" in proc.stderr and "2 processes" in proc.stderr
    assert proc.stderr.count("epoch 2/2") == 1 and (tmp_path / "model" / "model.pt").exists()


def test_a_dataset_over_plain_http_streams_the_same_batches(tmp_path):
    """http(s):// through fsspec: no listing needed, whole files only."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from cnnpipe.data.store import fetch_dataset

    sharded_dataset(tmp_path / "ds", n=10, per_shard=8)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/ds"
        local = fetch_dataset(url, tmp_path / "copy", ("val",))
        assert read_dataset(local, splits=("val",)).manifest == read_dataset(tmp_path / "ds", splits=()).manifest
        manifest = read_dataset(local, splits=()).manifest
        over_http = StreamBatches(url, manifest, batch_size=4, shuffle_buffer=8, workers=1, seed=0, dist=Dist(),
                                  device=CPU)
        _, on_disk = _batches(tmp_path / "ds", 1, workers=0)
        got = list(over_http.epoch(1))
        assert len(got) == len(on_disk) and all(torch.equal(a[0], b[0]) for a, b in zip(got, on_disk))
        with pytest.raises(CnnpipeError, match=f"'{url}/shards/nothing.tar': not found"):
            from cnnpipe.remote import read_bytes

            read_bytes(f"{url}/shards/nothing.tar")
    finally:
        server.shutdown()


@pytest.mark.parametrize("shards, threshold, written", [("auto", 1024.0, False), ("auto", 0.0, True),
                                                        ("always", 1024.0, True), ("never", 0.0, False)])
@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_ingest_writes_shards_as_ingest_shards_says(tmp_path, shards, threshold, written):
    from cnnpipe.config import IngestConfig
    from cnnpipe.stages import ingest
    from tests import formats

    z = formats.gtsrb_zip(tmp_path / "GTSRB_Final_Training_Images.zip")
    cfg = IngestConfig(source="gtsrb", path=str(z), image_size=16, channels=3, roi_crop=False, shards=shards,
                       shard_threshold_mb=threshold, shard_images=10)
    ingest.run(cfg=cfg, data=tmp_path / "processed", report=tmp_path / "report.json")
    ds = read_dataset(tmp_path / "processed")
    assert bool(ds.manifest.get("shards")) == written
    if written:  # whole frames with their boxes
        parts = [read_shard(tmp_path / "processed", s, shape=(16, 16, 3), num_classes=43, boxes=True)
                 for s in shard_list(ds.manifest, "val", "x")]
        np.testing.assert_array_equal(np.concatenate([p.boxes for p in parts]), ds.splits["val"].boxes)
        assert {e["count"] for e in ds.manifest["shards"]["train"]} <= set(range(1, 11))
