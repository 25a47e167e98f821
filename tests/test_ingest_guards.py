"""Ingest within a memory budget: archive members checked before reading, bad GTSRB rows skipped, and a
restricted unpickler that allocates no more than the file holds. Property tests where input is untrusted."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnpipe.data.archive import (
    RATIO_FLOOR,
    ArchiveLimits,
    FileTree,
    MemberRefused,
    MiB,
)
from cnnpipe.data.safe_pickle import safe_load
from cnnpipe.errors import CnnpipeError
from tests import formats
from tests.helpers import REPO, cnnpipe

LIMITS = ArchiveLimits(max_member_mb=2, max_ratio=50, max_total_mb=64)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def member_bytes(size: int, random_fraction: float, seed: int) -> bytes:
    """`size` bytes, the first `random_fraction` of them incompressible, the rest zeros."""
    k = int(size * random_fraction)
    return np.random.default_rng(seed).integers(0, 256, k, dtype=np.uint8).tobytes() + bytes(size - k)


def allowed(size: int, packed: int, limits: ArchiveLimits) -> bool:
    return size <= limits.max_member_mb * MiB and (size <= RATIO_FLOOR or size <= limits.max_ratio * max(packed, 1))


@FAST
@given(size=st.integers(0, 3 * MiB), random_fraction=st.sampled_from([0.0, 0.01, 0.05, 1.0]),
       max_ratio=st.sampled_from([2.0, 20.0, 200.0]))
def test_zip_member_is_read_only_within_its_declared_limits(tmp_path, size, random_fraction, max_ratio):
    limits = ArchiveLimits(max_member_mb=2, max_ratio=max_ratio, max_total_mb=64)
    path = tmp_path / "a.zip"
    data = member_bytes(size, random_fraction, size)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m.bin", data)
    info = zipfile.ZipFile(path).getinfo("m.bin")
    tree = FileTree(path, limits)
    if allowed(info.file_size, info.compress_size, limits):
        assert tree.read("m.bin") == data
    else:
        with pytest.raises(MemberRefused, match="max_member_mb|max_compression_ratio"):
            tree.read("m.bin")


def forge_declared_size(path: Path, declared: int) -> None:
    """Rewrite the uncompressed size in the local header and the central directory (the data stays)."""
    raw = bytearray(path.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 22:local + 26] = struct.pack("<I", declared)
    raw[central + 24:central + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(raw))


@FAST
@given(declared=st.integers(0, 2**32 - 1))
def test_a_zip_header_that_lies_about_the_size_never_yields_more(tmp_path, declared):
    path = tmp_path / "lie.zip"
    data = bytes(600_000)  # inflates 600 KB, under the ratio floor
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m.bin", data)
    forge_declared_size(path, declared)
    tree = FileTree(path, ArchiveLimits(max_member_mb=2, max_ratio=50, max_total_mb=2**20))
    try:
        got = tree.read("m.bin")
    except MemberRefused:
        return
    assert len(got) <= declared and got == data  # only the honest size passes the CRC


def test_a_zip_bomb_member_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", bytes(64 * MiB))  # ~64 KB packed
    with pytest.raises(MemberRefused, match=r"compression ratio \d+:1, over ingest.max_compression_ratio=50"):
        FileTree(path, ArchiveLimits(max_member_mb=100, max_ratio=50, max_total_mb=1024)).read("big.png")
    with pytest.raises(MemberRefused, match="over ingest.max_member_mb=2"):
        FileTree(path, ArchiveLimits(max_member_mb=2, max_ratio=10**6, max_total_mb=1024)).read("big.png")
    with pytest.raises(CnnpipeError, match="declare 64 MiB in all, over ingest.max_total_mb=32; refusing"):
        FileTree(path, ArchiveLimits(max_member_mb=100, max_ratio=10**6, max_total_mb=32))


def tar_with(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@FAST
@given(sizes=st.lists(st.integers(0, 3 * MiB), min_size=1, max_size=3), compress=st.booleans())
def test_tar_members_within_the_limits_are_kept_and_others_refused(tmp_path, sizes, compress):
    members = {f"m{i}.bin": member_bytes(s, 1.0, i) for i, s in enumerate(sizes)}  # incompressible
    path = tar_with(tmp_path / "a.tar", members, "w:gz" if compress else "w")
    tree = FileTree(path, LIMITS)
    assert tree.names() == sorted(members)
    for name, data in members.items():
        if len(data) <= LIMITS.max_member_mb * MiB:
            assert tree.read(name) == data
        else:
            with pytest.raises(MemberRefused, match="over ingest.max_member_mb=2"):
                tree.read(name)


def test_a_tar_gz_that_inflates_past_the_ratio_is_refused_while_reading(tmp_path):
    path = tar_with(tmp_path / "bomb.tar.gz", {"a.png": bytes(2 * MiB - 1), "b.png": bytes(2 * MiB - 1)})
    with pytest.raises(CnnpipeError, match=r"inflates \d+:1, over ingest.max_compression_ratio=50; refusing the archive"):
        FileTree(path, LIMITS)


# --- GTSRB annotations --------------------------------------------------------------------------------

BAD_ROWS = {  # file name -> the row's Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2 and what the report says
    "00090_00000.ppm": ("40;38;34;4;5;33", "inverted"),
    "00091_00000.ppm": ("40;38;5;4;45;33", "outside the 40 x 38 image"),
    "00092_00000.ppm": ("40;38;five;4;34;33", "not numbers"),
    "00093_00000.ppm": ("40;38;5;4;34;nan", "non-finite"),
    "00094_00000.ppm": ("0;38;5;4;34;33", "bad image size"),
}


def gtsrb_with_bad_rows(path: Path) -> Path:
    formats.gtsrb_zip(path)
    with zipfile.ZipFile(path) as z:
        csv_name = f"{formats.GTSRB_ROOT}/00000/GT-00000.csv"
        members = {n: z.read(n) for n in z.namelist()}
    rows = members[csv_name].decode().rstrip("\n").split("\n")
    for name, (numbers, _) in BAD_ROWS.items():
        rows.append(f"{name};{numbers};0")
        members[f"{formats.GTSRB_ROOT}/00000/{name}"] = formats.ppm(formats.sign_image(0))
    members[csv_name] = ("\n".join(rows) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return path


@pytest.mark.e2e
def test_bad_gtsrb_rows_are_skipped_and_listed(tmp_path):
    z = gtsrb_with_bad_rows(tmp_path / "GTSRB_Final_Training_Images.zip")
    report = tmp_path / "report.json"
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = cnnpipe("ingest", "--source", "gtsrb", "--path", str(z), "--val-fraction", "0.25", "--max-bad-fraction",
                   "0.2", "--out", str(tmp_path / "processed"), "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    bad = {Path(b["path"]).name: b["error"] for b in json.loads(report.read_text())["bad_file_list"]}
    assert set(bad) == set(BAD_ROWS)
    for name, (_, why) in BAD_ROWS.items():
        assert bad[name].startswith("annotation row:") and why in bad[name], bad[name]
    assert json.loads(proc.stdout)["images"] == 60  # every good row of the 3 classes


# --- the restricted unpickler -------------------------------------------------------------------------

HUGE = 10**12


def crafted(*body: bytes) -> bytes:
    return b"\x80\x02" + b"".join(body) + b"."


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def int_(n: int) -> bytes:
    return b"I" + str(n).encode() + b"\n"


@pytest.mark.parametrize("data, message", [
    (crafted(global_("builtins", "bytearray"), int_(HUGE), b"\x85R"), "a bytearray asks for"),
    (crafted(global_("numpy", "ndarray"), int_(HUGE), b"\x85\x85R"), "an array asks for"),
    (crafted(global_("numpy", "ndarray"), int_(HUGE), b"\x85\x85\x81"), "an array asks for"),  # NEWOBJ
    (crafted(global_("numpy._core.multiarray", "_reconstruct"), global_("numpy", "ndarray"), int_(HUGE),
             b"\x85", b"C\x01b", b"\x87R"), "an array asks for"),
    (pickle.dumps(np.array([1, "x"], dtype=object), protocol=2), "a dtype of Python objects"),
], ids=["bytearray", "ndarray", "newobj", "reconstruct", "object-array"])
def test_a_pickle_asking_for_a_huge_or_object_array_is_refused(data, message):
    with pytest.raises(CnnpipeError, match=f"x.p: not a plain data pickle .{message}"):
        safe_load(data, "x.p")


def test_a_huge_array_state_is_refused_before_numpy_sees_it():
    state = pickle.dumps(np.zeros(4, np.uint8), protocol=2).replace(b"K\x04\x85", int_(HUGE) + b"\x85")
    with pytest.raises(CnnpipeError, match="an array asks for 1,000,000,000,000 bytes"):
        safe_load(state, "x.p")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_another_error(data):
    with contextlib.suppress(CnnpipeError):  # any other exception fails the test
        safe_load(b"\x80\x02" + data, "x.p")


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["u1", "i8", "f4", "<f8", ">i2", "?"]),
       shape=st.lists(st.integers(0, 6), max_size=3), protocol=st.integers(2, 5))
def test_real_arrays_round_trip(dtype, shape, protocol):
    a = (np.arange(int(np.prod(shape)) if shape else 1) % 7).astype(dtype).reshape(shape)
    data = pickle.dumps({b"data": a, b"labels": [1, 2], b"names": {"x", "y"}}, protocol=protocol)
    got, want = safe_load(data, "x.p"), pickle.loads(data)  # noqa: S301 - our own bytes: the oracle
    assert got[b"data"].dtype == want[b"data"].dtype and np.array_equal(got[b"data"], a)
    assert got[b"labels"] == [1, 2] and got[b"names"] == {"x", "y"}


@pytest.mark.e2e
def test_cli_refuses_a_huge_pickle_with_one_line(tmp_path):
    folder = tmp_path / "signs"
    folder.mkdir()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (folder / "train.p").write_bytes(crafted(global_("numpy", "ndarray"), int_(HUGE), b"\x85\x85R"))
    proc = cnnpipe("ingest", "--source", "pickle", "--path", str(folder / "train.p"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a plain data pickle (an array asks for" in lines[0], proc.stderr


def test_a_pickle_file_over_the_member_budget_is_not_read(tmp_path):
    from cnnpipe.config import IngestConfig
    from cnnpipe.data.sources import pickle_files

    folder = formats.pickle_set(tmp_path / "signs", n=700)  # 700 x 32 x 32 x 3: ~2 MiB per file
    with pytest.raises(CnnpipeError, match=r"train.p': 2 MiB, over ingest.max_member_mb=1$"):
        pickle_files.load(IngestConfig(source="pickle", path=str(folder / "train.p"), max_member_mb=1))
