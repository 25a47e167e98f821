"""ingest on every source, in the real file formats; splits, leakage, validation, safety."""

from __future__ import annotations

import http.server
import io
import json
import pickle
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import IngestConfig
from cnnpipe.data.download import fetch
from cnnpipe.data.sources import gtsrb as gtsrb_source
from cnnpipe.data.split import stratified_split
from cnnpipe.data.store import read_dataset
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import file_digest
from cnnpipe.stages import ingest
from tests import formats
from tests.helpers import run

GTSRB_ZIP = Path(__file__).resolve().parents[2] / "shared/data/GTSRB_Final_Training_Images.zip"


def run_ingest(tmp_path: Path, **kw) -> tuple[dict, Path]:
    cfg = IngestConfig(**{"image_size": 16, "channels": 3, **kw})
    out, report = tmp_path / "processed", tmp_path / "reports" / "ingest_report.json"
    return ingest.run(cfg=cfg, data=out, report=report), out


def nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "processed").exists() and not list(tmp_path.glob(".processed.tmp-*"))


# --- GTSRB -------------------------------------------------------------------------------------------

def test_gtsrb_zip_with_official_test_split(tmp_path):
    z = formats.gtsrb_zip(tmp_path / "GTSRB_Final_Training_Images.zip")
    test_zip, gt = formats.gtsrb_test(tmp_path)
    summary, out = run_ingest(tmp_path, source="gtsrb", path=str(z), test_path=str(test_zip), test_labels=str(gt),
                              val_fraction=0.25)
    ds = read_dataset(out)
    assert ds.classes[14] == "Stop" and len(ds.classes) == 43
    assert summary["splits"] == {"train": 45, "val": 15, "test": 6}  # val: 1 of 4 tracks per class, test: official
    assert ds.manifest["split"]["official"] == ["test"] and ds.manifest["split"]["grouped_by"] == "track"
    assert ds.splits["test"].labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert [i["sha256"] for i in ds.manifest["source"]["inputs"]] == [file_digest(p) for p in (z, test_zip, gt)]
    for name in ingest.FIGURES:
        assert Image.open(out / "figures" / name).size[0] > 100


def test_gtsrb_roi_crop_uses_the_csv_scaled_to_the_actual_image(tmp_path):
    z = formats.gtsrb_zip(tmp_path / "g.zip", classes=1, tracks=3, frames=2)
    _, out = run_ingest(tmp_path, source="gtsrb", path=str(z), val_fraction=0.3, test_fraction=0.3)
    img = read_dataset(out).splits["train"].images[0].astype(int)
    assert (np.abs(img - [0, 200, 255]).sum(-1) < 30).mean() > 0.95  # the sign fills the crop, no grey border
    _, out2 = run_ingest(tmp_path / "nocrop", source="gtsrb", path=str(z), roi_crop=False, val_fraction=0.3,
                         test_fraction=0.3)
    img2 = read_dataset(out2).splits["train"].images[0].astype(int)
    assert (np.abs(img2 - 90).sum(-1) < 10).mean() > 0.1  # the border is still there


def test_gtsrb_split_keeps_tracks_whole(tmp_path):
    z = formats.gtsrb_zip(tmp_path / "g.zip", classes=2, tracks=10, frames=3)
    raw = gtsrb_source.load(IngestConfig(source="gtsrb", path=str(z), image_size=8, channels=3))
    for seed in range(5):
        idx = stratified_split(raw.pool.labels, {"val": 0.2, "test": 0.2}, seed, raw.groups)
        tracks = {k: set(raw.groups[v]) for k, v in idx.items()}
        assert not (tracks["train"] & tracks["val"]) and not (tracks["train"] & tracks["test"])
        assert not (tracks["val"] & tracks["test"])
        assert len(idx["val"]) == 12 and len(idx["test"]) == 12  # 2 of 10 tracks per class, 3 frames each


@pytest.mark.skipif(not GTSRB_ZIP.exists(), reason="the real GTSRB training zip is not in ../shared/data")
@pytest.mark.e2e
def test_real_gtsrb_zip(tmp_path):
    summary, out = run_ingest(tmp_path, source="gtsrb", path=str(GTSRB_ZIP), image_size=32)
    assert summary["images"] == 39209 and summary["bad_files"] == 0
    ds = read_dataset(out)
    counts = [ds.manifest["counts"]["train"]["per_class"][c] + ds.manifest["counts"]["val"]["per_class"][c]
              + ds.manifest["counts"]["test"]["per_class"][c] for c in ds.classes]
    assert min(counts) == 210 and max(counts) == 2250
    raw = gtsrb_source.load(IngestConfig(source="gtsrb", path=str(GTSRB_ZIP), image_size=8, channels=3, roi_crop=False))
    idx = ingest.stratified_split(raw.pool.labels, {"val": 0.1, "test": 0.2}, 0, raw.groups)
    assert not set(raw.groups[idx["train"]]) & set(raw.groups[idx["val"]])


# --- CIFAR-10, image folders, tutorial pickles ------------------------------------------------------

@pytest.mark.parametrize("extracted", [False, True])
def test_cifar10_archive_and_folder(tmp_path, extracted):
    archive = formats.cifar_tar(tmp_path / "cifar-10-python.tar.gz")
    path = archive
    if extracted:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path / "x", filter="data")
        path = tmp_path / "x" / "cifar-10-batches-py"
    summary, out = run_ingest(tmp_path, source="cifar10", path=str(path), image_size=32)
    ds = read_dataset(out)
    assert ds.classes[0] == "airplane" and summary["splits"]["test"] == 20
    assert summary["splits"]["train"] + summary["splits"]["val"] == 100
    img, label = ds.splits["test"].images[3], ds.splits["test"].labels[3]
    assert label == 3 and (img[..., 0] == 60).all()  # planes were reassembled into H x W x C


def test_cifar10_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = pickle.dumps({b"label_names": [formats.Exploit(marker)]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CnnpipeError, match="batches.meta: not a plain data pickle .refused to load posix.system"):
        run_ingest(tmp_path, source="cifar10", path=str(archive))
    assert not marker.exists() and nothing_written(tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_converts_every_mode(tmp_path, channels):
    root = formats.imagefolder(tmp_path / "train")
    summary, out = run_ingest(tmp_path, source="imagefolder", path=str(root), channels=channels,
                              val_fraction=0.2, test_fraction=0.2)
    ds = read_dataset(out)
    assert ds.classes == ["cat", "dog"] and ds.channels == channels and summary["images"] == 12
    assert summary["bad_files"] == 0


def test_imagefolder_test_root_and_bad_files_are_reported(tmp_path):
    root = formats.imagefolder(tmp_path / "train", n=12)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dog" / "truncated.jpg").write_bytes(formats.encoded(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200])
    (root / "empty_class").mkdir()
    test_root = formats.imagefolder(tmp_path / "test", classes=("cat", "dog", "bird"), n=2)
    summary, out = run_ingest(tmp_path, source="imagefolder", path=str(root), test_path=str(test_root),
                              max_bad_fraction=0.3)
    report = json.loads((tmp_path / "reports/ingest_report.json").read_text())
    errors = {Path(b["path"].split(":")[-1]).name: b["error"] for b in report["bad_file_list"]}
    assert set(errors) == {"broken.png", "truncated.jpg", "empty_class", "0.png", "1.jpg"}
    assert "empty class folder" in errors["empty_class"] and "not a training class" in errors["0.png"]
    assert summary["splits"]["test"] == 4 and read_dataset(out).classes == ["cat", "dog"]


def test_too_many_bad_files_fail_with_the_list_and_no_dataset(tmp_path):
    root = formats.imagefolder(tmp_path / "train", n=6)
    (root / "cat" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(CnnpipeError, match=r"1 of 13 files are unusable \(7.7%\), more than ingest.max_bad_fraction=0.05"):
        run_ingest(tmp_path, source="imagefolder", path=str(root), max_bad_fraction=0.05)
    report = json.loads((tmp_path / "reports/ingest_report.json").read_text())
    assert report["status"] == "failed" and report["bad_file_list"][0]["path"].endswith("bad.png")
    assert nothing_written(tmp_path)


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_tutorial_pickles_use_their_official_splits(tmp_path):
    folder = formats.pickle_set(tmp_path / "signs")
    summary, out = run_ingest(tmp_path, source="pickle", path=str(folder / "train.p"), image_size=32)
    ds = read_dataset(out)
    assert summary["splits"] == {"train": 30, "val": 30, "test": 30}
    assert ds.classes[5] == "sign 5" and ds.manifest["split"]["official"] == ["val", "test"]
    with open(folder / "train.p", "rb") as f:
        assert np.array_equal(ds.splits["train"].images[0], pickle.load(f)["features"][0])


def test_pickle_without_signnames_gets_gtsrb_names(tmp_path):
    folder = formats.pickle_set(tmp_path / "signs", signnames=False)
    _, out = run_ingest(tmp_path, source="pickle", path=str(folder))
    assert read_dataset(out).classes[14] == "Stop"


# --- archive safety -----------------------------------------------------------------------------------

def test_archive_member_escaping_the_root_is_refused(tmp_path):
    z = formats.gtsrb_zip(tmp_path / "g.zip", extra={"../../evil.ppm": b"x"})
    with pytest.raises(CnnpipeError, match="member '../../evil.ppm' escapes the archive root"):
        run_ingest(tmp_path, source="gtsrb", path=str(z))
    assert nothing_written(tmp_path)


def test_tar_links_are_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(CnnpipeError, match="is a link or device"):
        run_ingest(tmp_path, source="cifar10", path=str(archive))


def test_decompression_bomb_is_refused(tmp_path):
    root = formats.imagefolder(tmp_path / "train", n=2)
    bomb = Image.new("1", (12000, 12000))  # 144 Mpixel: over PIL's limit, a few KB as PNG
    (root / "cat" / "bomb.png").write_bytes(formats.encoded(bomb, "PNG"))
    with pytest.raises(CnnpipeError, match="image '.*/train:cat/bomb.png' refused: 12000x12000 = .* pixels exceeds the budget"):
        run_ingest(tmp_path, source="imagefolder", path=str(root))
    assert nothing_written(tmp_path)


def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(CnnpipeError, match="ingest.path: required for source 'gtsrb'"):
        run_ingest(tmp_path, source="gtsrb")
    with pytest.raises(CnnpipeError, match="ingest.path: '.*nope.zip' not found"):
        run_ingest(tmp_path, source="gtsrb", path=str(tmp_path / "nope.zip"))
    formats.imagefolder(tmp_path / "notgtsrb")
    with pytest.raises(CnnpipeError, match="no GTSRB annotations"):
        run_ingest(tmp_path, source="gtsrb", path=str(tmp_path / "notgtsrb"))


# --- downloads ----------------------------------------------------------------------------------------

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (http.server has none), counting requests."""

    requests: list[str] = []

    def log_message(self, *args):  # noqa: ANN002
        pass

    def do_GET(self):  # noqa: N802
        RangeHandler.requests.append(self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: RangeHandler(*a, directory=str(served), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    RangeHandler.requests = []
    yield served, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_download_verifies_resumes_and_caches(tmp_path, server):
    served, base = server
    payload = np.random.default_rng(0).bytes(300_000)
    (served / "data.zip").write_bytes(payload)
    digest = __import__("hashlib").sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "data.zip.part").write_bytes(payload[:100_000])  # an interrupted earlier download
    got = fetch(f"{base}/data.zip", cache, digest)
    assert got.read_bytes() == payload and RangeHandler.requests == ["bytes=100000-"]
    assert fetch(f"{base}/data.zip", cache, digest) == got and len(RangeHandler.requests) == 1  # cached
    with pytest.raises(CnnpipeError, match="sha256 .* does not match the expected 00"):
        fetch(f"{base}/data.zip", tmp_path / "other", "00" * 32)
    assert not list((tmp_path / "other").iterdir())
    with pytest.raises(CnnpipeError, match="ingest.sha256: required to verify"):
        fetch(f"{base}/data.zip", tmp_path / "other", None)
    with pytest.raises(CnnpipeError, match="HTTP 404"):
        fetch(f"{base}/missing.zip", tmp_path / "other", "00" * 32)


def test_ingest_from_a_url(tmp_path, server):
    served, base = server
    z = formats.gtsrb_zip(served / "signs.zip")
    summary, _ = run_ingest(tmp_path, source="gtsrb", path=f"{base}/signs.zip", sha256=file_digest(z),
                            cache_dir=str(tmp_path / "dl"))
    assert summary["images"] == 60 and (tmp_path / "dl" / "signs.zip").exists()


def test_label_outside_the_class_list_is_reported(tmp_path):
    z = formats.gtsrb_zip(tmp_path / "g.zip", bad_row=True)
    summary, _ = run_ingest(tmp_path, source="gtsrb", path=str(z), max_bad_fraction=0.1)
    report = json.loads((tmp_path / "reports/ingest_report.json").read_text())
    assert summary["bad_files"] == 1 and "label '77' outside the 43 GTSRB classes" in report["bad_file_list"][0]["error"]
    with zipfile.ZipFile(z) as zf:
        assert any(n.endswith("00099_00000.ppm") for n in zf.namelist())


# --- a DVC-versioned dataset, by repo + revision + path ------------------------------------------------

@pytest.fixture
def dvc_repo(tmp_path):
    """A git + DVC repository whose data/images has 6 images per class at tag v1 and 9 at v2, pushed to a
    local DVC remote and gone from the repo's cache: fetching it must go through the remote."""
    repo = tmp_path / "datasets"
    repo.mkdir()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "remote", "add", "-d", "storage", str(tmp_path / "dvc-storage")]):
        run(cmd, repo)
    for tag, n in (("v1", 6), ("v2", 9)):
        formats.imagefolder(repo / "data" / "images", n=n)
        for cmd in (["dvc", "add", "data/images"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", f"images {tag}"],
                    ["git", "tag", tag], ["dvc", "push", "-q"]):
            run(cmd, repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    return repo


@pytest.mark.e2e  # the real CLI / git + DVC in subprocesses
def test_ingest_reads_an_exact_version_from_a_dvc_repository(tmp_path, dvc_repo):
    cache = str(tmp_path / "dl")
    summary, out = run_ingest(tmp_path, source="imagefolder", dvc_repo=str(dvc_repo), dvc_rev="v1",
                              path="data/images", cache_dir=cache)
    v1 = run(["git", "rev-parse", "v1"], dvc_repo).strip()
    assert summary["files"] == 12 and summary["dvc"] == {"repo": str(dvc_repo), "rev": "v1", "commit": v1}
    assert read_dataset(out).manifest["source"]["dvc"]["commit"] == v1
    shutil.rmtree(out)
    summary, _ = run_ingest(tmp_path, source="imagefolder", dvc_repo=f"file://{dvc_repo}", path="data/images",
                            cache_dir=cache)  # a git URL (cloned), default branch: v2
    assert summary["files"] == 18 and summary["dvc"]["commit"] == run(["git", "rev-parse", "v2"], dvc_repo).strip()


@pytest.mark.e2e  # the real CLI / git + DVC in subprocesses
def test_dvc_repository_errors_name_the_field(tmp_path, dvc_repo):
    with pytest.raises(CnnpipeError, match=r"^ingest.dvc_rev: 'v9' is not a revision of"):
        run_ingest(tmp_path, source="imagefolder", dvc_repo=str(dvc_repo), dvc_rev="v9", path="data/images")
    with pytest.raises(CnnpipeError, match=r"^ingest.path 'data/nothing': not in"):
        run_ingest(tmp_path, source="imagefolder", dvc_repo=str(dvc_repo), path="data/nothing",
                   cache_dir=str(tmp_path / "dl"))
    with pytest.raises(CnnpipeError, match=r"^ingest.path '../images': expected a path inside"):
        run_ingest(tmp_path, source="imagefolder", dvc_repo=str(dvc_repo), path="../images")
    with pytest.raises(CnnpipeError, match=r"^ingest.dvc_repo: cannot clone"):
        run_ingest(tmp_path, source="imagefolder", dvc_repo=str(tmp_path / "no-repo"), path="data/images")
    shutil.rmtree(tmp_path / "dvc-storage")  # the data is nowhere: neither in the repo's cache nor its remote
    with pytest.raises(CnnpipeError, match=r"^ingest.path .data/images.: cannot fetch from .* at [0-9a-f]{12}: "):
        run_ingest(tmp_path, source="imagefolder", dvc_repo=str(dvc_repo), path="data/images",
                   cache_dir=str(tmp_path / "dl2"))
    assert nothing_written(tmp_path)
