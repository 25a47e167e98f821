"""Hostile inputs, round 3 (issue 24): the unpickler's one running total of allocations, archives' entry and name
budgets, locks on outputs, OS errors on writes, bounded remote reads. Property tests where input is untrusted."""

from __future__ import annotations

import contextlib
import pickle
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnpipe.data.safe_pickle import ALLOCATION_FACTOR, ALLOCATION_SLACK, safe_load
from cnnpipe.errors import CnnpipeError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- the restricted unpickler: one running total --------------------------------------------------------

def memoized_calls(callee: bytes, arg: bytes, calls: int) -> bytes:
    """A protocol-2 pickle of a list holding `calls` results of callee(arg), callee and arg each written once."""
    unit = b"h\x00h\x01\x85R"  # GET callee, GET arg, TUPLE1, REDUCE: 6 bytes per call
    return b"\x80\x02" + callee + b"q\x00" + arg + b"q\x01(" + unit * calls + b"l."


def binint(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little")


def a_list_of(n: int) -> bytes:
    return b"]" + b"(" + b"K\x01" * n + b"e"


@pytest.mark.parametrize("callee, arg, what", [
    (b"cbuiltins\nbytearray\n", binint(900_000), "a bytearray"),
    (b"cbuiltins\nbytes\n", binint(900_000), "a bytes"),
    (b"cbuiltins\nlist\n", a_list_of(20_000), "a list"),
    (b"cbuiltins\nfrozenset\n", a_list_of(20_000), "a frozenset"),
], ids=["bytearray", "bytes", "list-copies", "frozenset-copies"])
def test_many_objects_from_one_memoized_size_share_one_budget(callee, arg, what):
    """Each call alone fits the file's budget; together they would allocate gigabytes (2.7 GB before)."""
    data = memoized_calls(callee, arg, 1_000_000 // 6)
    assert len(data) < 1.1e6
    tracemalloc.start()
    try:
        with pytest.raises(CnnpipeError, match=f"{what} asks for .* bytes left of the file's allocation budget"):
            safe_load(data, "x.p")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_FACTOR * len(data) + 8 * 2**20


def test_bytes_new_with_a_huge_size_is_charged():
    """NEWOBJ on bytes: bytes.__new__(bytes, n) allocates n bytes."""
    data = b"\x80\x02cbuiltins\nbytes\n" + binint(2**31 - 1) + b"\x85\x81."
    with pytest.raises(CnnpipeError, match="a bytes asks for 2,147,483,647 bytes"):
        safe_load(data, "x.p")


@FAST
@given(program=st.lists(st.tuples(st.sampled_from([b"bytearray", b"bytes", b"list", b"tuple", b"set"]),
                                  st.integers(0, 5000), st.integers(1, 300)), min_size=1, max_size=6))
def test_no_pickle_allocates_more_than_its_budget(program):
    """Any mix of calls on memoized arguments: refused, or within the one running total (measured)."""
    body = b""
    for name, size, calls in program:
        arg = binint(size) if name in (b"bytearray", b"bytes") else a_list_of(min(size, 500))
        body += b"cbuiltins\n" + name + b"\nq\x00" + arg + b"q\x01(" + b"h\x00h\x01\x85R" * calls + b"l"
    data = b"\x80\x02(" + body + b"l."
    tracemalloc.start()
    try:
        with contextlib.suppress(CnnpipeError):
            safe_load(data, "x.p")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= ALLOCATION_FACTOR * len(data) + ALLOCATION_SLACK + 2 * 2**20  # + the unpickler's own stack


def test_a_real_dataset_pickle_fits_its_budget():
    import numpy as np

    for protocol in (2, 4, 5):
        images = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
        data = pickle.dumps({"features": images, "labels": list(range(50)), "sizes": [(32, 32)] * 50}, protocol)
        assert np.array_equal(safe_load(data, "x.p")["features"], images)


# --- archives: entries and names budgeted -----------------------------------------------------------------

def limits(max_members: int = 1000):  # noqa: ANN201 - ArchiveLimits
    from cnnpipe.data.archive import ArchiveLimits

    return ArchiveLimits(max_member_mb=2, max_ratio=50, max_total_mb=64, max_members=max_members)


def empty_members_tar_gz(path, n: int, name_chars: int = 10):  # noqa: ANN001, ANN201 - paths
    """A tar.gz of `n` empty members, written header by header (tarfile would keep them all)."""
    import gzip
    import tarfile

    info = tarfile.TarInfo("x")
    with gzip.open(path, "wb", compresslevel=1) as f:
        for i in range(n):
            info.name = f"d/{i:0{name_chars}d}.png"
            f.write(info.tobuf(tarfile.GNU_FORMAT))
        f.write(bytes(1024))
    return path


def test_a_tar_of_many_empty_members_is_refused_by_count(tmp_path):
    """1M empty members took 163 s and 1.5 GB (only member bytes were counted): now the count stops it."""
    from cnnpipe.data.archive import FileTree

    path = empty_members_tar_gz(tmp_path / "empty.tar.gz", 2001)
    with pytest.raises(CnnpipeError, match=r"more than ingest.max_members=2,000 entries \(at least 2,001\)"):
        FileTree(path, limits(2000))
    assert len(FileTree(path, limits(2001)).names()) == 2001


def test_a_zip_declaring_too_many_entries_is_refused_before_they_are_read(tmp_path):
    import zipfile

    from cnnpipe.data.archive import FileTree

    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(30):
            z.writestr(f"d/{i}.png", b"")
    with pytest.raises(CnnpipeError, match=r"more than ingest.max_members=29 entries \(30\)"):
        FileTree(path, limits(29))
    assert len(FileTree(path, limits(30)).names()) == 30


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_a_tar_header_too_long_is_refused_before_it_is_read_whole(tmp_path, fmt):
    """A GNU long name or a pax record is read in one piece by tarfile (8 MiB of name from a 9 KB tar.gz)."""
    import gzip
    import tarfile

    from cnnpipe.data.archive import FileTree

    path = tmp_path / f"{fmt}.tar.gz"
    info = tarfile.TarInfo("x" * (8 * 2**20))
    with gzip.open(path, "wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT if fmt == "gnu" else tarfile.PAX_FORMAT) + bytes(1024))
    assert path.stat().st_size < 50_000
    tracemalloc.start()
    try:
        with pytest.raises(CnnpipeError, match="a tar header of .* bytes"):
            FileTree(path, limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20  # the name alone: 8 MiB


@pytest.mark.parametrize("chars", [4096 - 6, 4096 - 5])
def test_member_names_are_budgeted(tmp_path, chars):
    from cnnpipe.data.archive import MAX_NAME_CHARS, FileTree

    path = empty_members_tar_gz(tmp_path / "long.tar.gz", 1, chars)
    if chars + 6 <= MAX_NAME_CHARS:
        assert len(FileTree(path, limits()).names()) == 1
    else:
        with pytest.raises(CnnpipeError, match="a member name of 4,097 characters"):
            FileTree(path, limits())


@FAST
@given(data=st.binary(max_size=2000), compress=st.booleans())
def test_arbitrary_tar_bytes_are_read_or_refused_with_one_error(tmp_path, data, compress):
    """Whatever the bytes after a valid first header: the tree reads them, or refuses the archive (CnnpipeError)."""
    import gzip
    import tarfile

    from cnnpipe.data.archive import FileTree

    path = tmp_path / "fuzz.tar"
    blob = tarfile.TarInfo("a.png").tobuf(tarfile.GNU_FORMAT) + data
    path.write_bytes(gzip.compress(blob) if compress else blob)
    with contextlib.suppress(CnnpipeError):
        FileTree(path, limits(5)).names()


# --- one writer per output; a full disk is one line -------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from cnnpipe.fsio import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_elsewhere(out):  # noqa: ANN001, ANN201 - a path; yields the holder's pid
    """Another process holding `out`'s lock until the block ends."""
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_second_writer_of_an_output_is_refused_naming_the_first(tmp_path):
    from cnnpipe.fsio import atomic_dir, staged_dir

    out = tmp_path / "processed"
    with lock_held_elsewhere(out) as pid:
        for make in (lambda: atomic_dir(out), lambda: staged_dir(out, "f")):
            with pytest.raises(CnnpipeError, match=rf"output '{out}' is being made by pid {pid} on "), make():
                pass
        assert not out.exists() and (tmp_path / ".processed.lock").exists()
    with atomic_dir(out) as tmp:  # released: the next writer goes ahead, and leaves no lock file behind
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_a_write_error_of_the_medium_is_one_line_naming_the_output(tmp_path):
    """EFBIG from a real file size limit (RLIMIT_FSIZE, in a child: no privileges needed) inside atomic outputs."""
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous output")
    script = f"""
import resource, signal
from pathlib import Path
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_dir, write_json
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
try:
    with atomic_dir(Path({str(out)!r})) as tmp:
        (tmp / "big").write_bytes(bytes(100_000))
except CnnpipeError as e:
    print(e)
try:
    write_json(Path({str(tmp_path / 'r.json')!r}), ["x" * 100_000])
except CnnpipeError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr
    assert lines[0] == f"cannot write '{out}': File too large; any previous '{out}' is unchanged"
    assert lines[1].startswith(f"cannot write '{tmp_path / 'r.json'}': File too large")
    assert (out / "old").read_text() == "previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- remote reads: inside their folder, within their size, before their deadline -------------------------

class HostileHandler:
    """What the test HTTP server sends for a path: /endless (fast, no length), /trickle (a byte every 0.2 s, no
    length), /liar (declares 1 TB), /trickle-ranges (as /trickle, but serves byte ranges)."""

    @staticmethod
    def make():  # noqa: ANN205 - a handler class
        import http.server
        import time

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                if self.path == "/liar":
                    self.send_header("Content-Length", str(10**12))
                if self.path == "/trickle-ranges":
                    self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                try:
                    for _ in range(100_000):
                        if self.path.startswith("/endless"):
                            self.wfile.write(b"[" * 65536)
                        else:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                except OSError:  # the client gave up: what the test wants
                    pass

        return Handler


@pytest.fixture
def hostile_server():  # noqa: ANN201 - yields the base URL
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler.make())
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_an_endless_remote_file_stops_at_its_budget(hostile_server):
    """An endless manifest grew `train --data http://...` to 20 GB: a read now stops one chunk past its budget."""
    import time

    from cnnpipe.remote import OverBudget, read_bytes

    start = time.monotonic()
    with pytest.raises(OverBudget, match=r"more than the 4,194,304 bytes expected"):
        read_bytes(f"{hostile_server}/endless", max_bytes=4 * 2**20)
    assert time.monotonic() - start < 5


def test_a_declared_size_over_the_budget_is_refused_before_reading(hostile_server):
    from cnnpipe.remote import OverBudget, read_bytes

    with pytest.raises(OverBudget, match=r"declares 1,000,000,000,000 bytes"):
        read_bytes(f"{hostile_server}/liar", max_bytes=2**20)


def test_a_trickling_server_trips_the_total_deadline(hostile_server):
    """One byte every 0.2 s never trips a per-read timeout; the total deadline trips."""
    import time

    from cnnpipe.remote import PastDeadline, read_bytes

    start = time.monotonic()
    with pytest.raises(PastDeadline, match="not read within 1 s"):
        read_bytes(f"{hostile_server}/trickle", max_bytes=2**20, deadline_s=0.6)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("path, kept", [("trickle", False), ("trickle-ranges", True)])
def test_a_partial_download_is_kept_only_when_resumable(tmp_path, hostile_server, path, kept):
    from cnnpipe.data.download import fetch

    with pytest.raises(CnnpipeError, match="not read within") as caught:
        fetch(f"{hostile_server}/{path}", tmp_path, "00" * 32, max_bytes=2**20, deadline_s=0.5)
    assert (tmp_path / f"{path}.part").exists() == kept
    assert ("partial file kept" in str(caught.value)) == kept


def test_an_endless_remote_manifest_is_refused(hostile_server, monkeypatch, tmp_path):
    from cnnpipe.data import store

    monkeypatch.setattr(store, "MAX_MANIFEST_BYTES", 2**20)
    with pytest.raises(CnnpipeError, match="manifest.json': more than the 1,048,576 bytes expected"):
        store.fetch_dataset(f"{hostile_server}/endless", tmp_path / "copy", ("val",))


@pytest.mark.e2e
def test_download_dir_never_writes_outside_its_folder(tmp_path, moto):
    """An S3 key with ../ under the model prefix (the PyTorchJob step downloads the model folder this way)."""
    import boto3

    from cnnpipe.remote import download_dir

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bkt")
    s3.put_object(Bucket="bkt", Key="model/model.pt", Body=b"weights")
    s3.put_object(Bucket="bkt", Key="model/../../escaped.txt", Body=b"pwned")
    target = tmp_path / "a" / "model"
    target.parent.mkdir()
    with pytest.raises(CnnpipeError, match=r"object '../../escaped.txt' would be written outside the folder"):
        download_dir("s3://bkt/model", target)
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()
    s3.delete_object(Bucket="bkt", Key="model/../../escaped.txt")
    download_dir("s3://bkt/model", target)
    assert (target / "model.pt").read_bytes() == b"weights"


@FAST
@given(relative=st.text(alphabet="ab./\\\\:", max_size=12))
def test_a_relative_path_is_inside_or_refused(tmp_path, relative):
    from cnnpipe.remote import inside

    try:
        name = inside(relative, "s3://b/x")
    except CnnpipeError:
        return
    assert (tmp_path / name).resolve().is_relative_to(tmp_path.resolve())


# --- decoders: allowed formats only, every failure a listed bad file, bounded work and memory ------------

def png_bytes(array, **save) -> bytes:  # noqa: ANN001 - a numpy array
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", **save)
    return buf.getvalue()


def test_an_eps_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    """A fake `gs` first on PATH: had Pillow's EPS plugin run, it would leave its marker."""
    import os

    from cnnpipe.imaging import BadImage, decode

    marker = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {marker}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(BadImage, match="not a readable image"):
        decode(eps, "x.png", 8, 1)
    assert not marker.exists()


def test_a_lab_tiff_is_a_bad_file():
    import io

    from PIL import Image

    from cnnpipe.imaging import BadImage, decode

    buf = io.BytesIO()
    Image.new("LAB", (8, 8)).save(buf, "TIFF")
    with pytest.raises(BadImage):
        decode(buf.getvalue(), "x.png", 8, 1)


@FAST
@given(exif=st.binary(max_size=200))
def test_any_exif_chunk_decodes_or_is_a_bad_file(exif):
    """A PNG's eXIf chunk is parsed for the orientation: whatever it holds, ingest lists the file or decodes it,
    and a server answers 4xx (RequestError), never a traceback."""
    import struct
    import warnings
    import zlib

    import numpy as np

    from cnnpipe.errors import RequestError
    from cnnpipe.imaging import BadImage, decode, to_array

    png = png_bytes(np.zeros((8, 8), np.uint8))
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    data = png[:33] + chunk + png[33:]  # after IHDR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(BadImage):
            assert decode(data, "x.png", 8, 1).shape == (8, 8, 1)
        with contextlib.suppress(RequestError):
            assert to_array(data, 8, 1).shape == (8, 8, 1)


def test_a_16_bit_image_converts_without_float64_copies():
    """9400^2 16-bit PNG took ingest from 94 MB to 1.8 GB: the conversion now costs its uint8 result."""
    import numpy as np
    from PIL import Image

    from cnnpipe.imaging import CONVERT_BAND_PIXELS, to_mode

    side = 3000
    values = (np.arange(side * side, dtype=np.uint32).reshape(side, side) % 65536).astype(np.uint16)
    img = Image.fromarray(values)
    tracemalloc.start()
    try:
        got = np.asarray(to_mode(img, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, (values // 257).astype(np.uint8))  # what values / 257, clipped, truncated gives
    # the uint8 result, the copy Image.fromarray takes of it, and a few bands (float64 copies: 8 bytes a pixel each)
    assert peak < 2 * side * side + 8 * CONVERT_BAND_PIXELS


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    import io

    import numpy as np
    from PIL import Image

    from cnnpipe.errors import CnnpipeError
    from cnnpipe.imaging import MAX_JPEG_SCANS, decode

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buf, "JPEG", progressive=True)
    progressive = buf.getvalue()
    assert decode(progressive, "ok.jpg", 8, 3).shape == (8, 8, 3)  # a real progressive JPEG: ~10 scans
    scans = b"\xff\xda\x00\x02" * (MAX_JPEG_SCANS + 1)  # empty scans after the image's own
    with pytest.raises(CnnpipeError, match=f"image 'x.jpg' refused: a progressive JPEG of more than {MAX_JPEG_SCANS} scans"):
        decode(progressive[:-2] + scans + b"\xff\xd9", "x.jpg", 8, 3)


def test_predict_reads_regular_files_only_within_a_budget(tmp_path):
    import os

    from cnnpipe.fsio import read_regular_file

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    big = tmp_path / "big.png"
    big.write_bytes(bytes(2000))
    for path, message in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"), (tmp_path, "not a "),
                          (big, "2,000 bytes, over the budget of 1,000")):
        with pytest.raises(CnnpipeError, match=message):
            read_regular_file(path, 1000)
    assert read_regular_file(big, 2000) == bytes(2000)


def test_predict_lists_files_whose_names_are_not_utf8(tmp_path):
    """Names decoded with surrogates (not UTF-8 on disk): predicted, and written escaped; the CSV is whole."""
    import os

    import numpy as np
    import torch

    from cnnpipe.engine.checkpoint import ModelSpec, save_model
    from cnnpipe.engine.predictor import Predictor
    from cnnpipe.models import build_model
    from cnnpipe.serving.local import predict_files

    save_model(tmp_path / "model.pt", build_model("mlp", 1, 2, 8, 4), ModelSpec("mlp", 4, 1, 2, 8, ["a", "b"], [0.5], [0.25]))
    torch.manual_seed(0)
    folder = tmp_path / "images"
    folder.mkdir()
    odd = os.fsdecode(b"\xff\xfe.png")
    (folder / odd).write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    (tmp_path / "list.csv").write_bytes(b"path\nimages/\xff\xfe.png\n/dev/zero\n")
    out = tmp_path / "p.csv"
    result = predict_files(Predictor.from_file(tmp_path / "model.pt"), [folder, tmp_path / "list.csv"], out)
    assert (result["predicted"], result["unreadable"]) == (2, 1)
    text = out.read_text(encoding="utf-8")  # valid UTF-8
    assert text.count("\\udcff\\udcfe.png,") == 2 and "/dev/zero,,,,'/dev/zero': not a regular file" in text
