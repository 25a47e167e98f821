"""The server under hostile input: a real `serve()` process on 127.0.0.1 with a tiny model built here,
fuzzed over bodies, headers, query strings and JSON (http.client) and over raw bytes (bad length
headers, truncated bodies, stalls). Every request must get an HTTP answer with a JSON body, and the
server's memory must stay bounded. Plus property tests of the image guards (pixel budget, declared-huge
headers, truncated images) on the contract itself. The server tests run a server process: e2e."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.errors import RequestError
from cnnpipe.imaging import to_array
from cnnpipe.models import build_model
from tests.helpers import REPO, user_env

CLASSES = ["stop", "yield", "left", "right"]
BUDGET = 1_000_000  # the fuzzed server's pixel budget: small, so that bombs are cheap to build here

SERVER = """
import sys
from cnnpipe.config import ServeConfig
from cnnpipe.serving.server import ModelInvoke, ServingApp, listen, serve
cfg = ServeConfig(workers=int(sys.argv[2]), max_body_bytes=256 * 1024, max_pixels=int(sys.argv[3]), max_pending=8,
                  header_timeout=1.0, body_timeout=1.0, keep_alive=1.0, shutdown_timeout=10.0)
app = ServingApp(ModelInvoke(sys.argv[1], "torch", 3, cfg.max_body_bytes, cfg.max_pixels, 1), cfg)
if cfg.workers == 1:
    app.preload()
serve(app, listen("127.0.0.1", 0), cfg, "a test model")
"""


def png(width: int = 40, height: int = 20, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color=(200, 30, 30) if mode == "RGB" else 120).save(buf, format="PNG")
    return buf.getvalue()


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header says width x height (8-bit gray) and whose data is `idat` (compressed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


class Server:
    """`serve()` in its own process (the real worker code, without a tracking store); its log in a file."""

    def __init__(self, model_file: Path, workers: int = 1, max_pixels: int = BUDGET):
        self.log = model_file.parent / f"server-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model_file), str(workers), str(max_pixels)],
                                         cwd=REPO, env=user_env({"OMP_NUM_THREADS": "1"}), stderr=log,
                                         start_new_session=True)
        deadline = time.time() + 60
        while "http://127.0.0.1:" not in self.log.read_text():
            assert time.time() < deadline and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        self.port = int(self.log.read_text().split("http://127.0.0.1:")[1].split()[0])
        while not self.ping():
            assert time.time() < deadline and self.proc.poll() is None, "server did not answer /ping"
            time.sleep(0.2)

    def ping(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/ping")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]
        return code


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    spec = ModelSpec("cnn3", 8, 3, len(CLASSES), 16, CLASSES, [0.5] * 3, [0.25] * 3)
    save_model(path, build_model("cnn3", 3, len(CLASSES), 16, 8), spec)
    return path


@pytest.fixture(scope="module")
def server(model_file):
    srv = Server(model_file)
    yield srv
    assert srv.stop() == 0


def request(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    assert response.getheader("Content-Type", "").startswith("application/json"), (response.status, data[:200])
    return response.status, json.loads(data)


def raw(port: int, data: bytes, half_close: bool = False, timeout: float = 10) -> tuple[int, dict]:
    """Send bytes as they are; the status and JSON body of what comes back (fail on a dropped connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer (and close) before all of it was sent
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
            head, sep, rest = got.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    break
    assert got.startswith(b"HTTP/1.1 "), f"no HTTP answer to {data[:120]!r}: {got[:200]!r}"
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the contract's image guards ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 100_000), height=st.integers(1, 100_000), budget=st.integers(64, 4_000_000))
def test_a_declared_size_past_the_budget_is_refused_before_decoding(width, height, budget):
    data = png_declaring(width, height, zlib.compress(b"\x00"))  # one row's filter byte, no pixels
    with pytest.raises(RequestError) as e:
        to_array(data, 16, 3, 0, budget)
    if width * height > budget:  # refused from the header: never decoded
        assert e.value.status == 413 and "exceeds the budget" in str(e.value)
    else:  # decoded, and the missing data found
        assert e.value.status == 400 and "not a readable image" in str(e.value)


@settings(max_examples=30, deadline=None)
@given(cut=st.floats(0.0, 0.95), fmt=st.sampled_from(["PNG", "JPEG", "BMP", "PPM", "WEBP"]))
def test_truncated_images_are_a_400(cut, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()[:int(len(buf.getvalue()) * cut)]
    with pytest.raises(RequestError) as e:
        to_array(data, 16, 3)
    assert e.value.status == 400 and "image 0" in str(e.value)


def test_a_compression_bomb_within_pillows_limit_costs_nothing():
    bomb = png_declaring(5000, 5000, zlib.compress(b"\x00" * (5001 * 5000), 9))  # 25 Mpx in ~25 kB
    assert len(bomb) < 100_000
    with pytest.raises(RequestError, match="25,000,000 pixels exceeds the budget") as e:
        to_array(bomb, 16, 3, 0, BUDGET)
    assert e.value.status == 413


def test_large_jpegs_decode_at_reduced_scale_and_agree():
    rng = np.random.default_rng(1)
    photo = Image.fromarray(np.kron(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), np.ones((40, 40, 1), np.uint8)))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)  # 1600 x 1200
    drafted = to_array(buf.getvalue(), 16, 3)
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 8


# --- the server ----------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_valid_requests_and_named_errors(server):
    port = server.port
    assert request(port, "POST", "/invocations", png(), {"Content-Type": "image/png"})[0] == 200
    assert request(port, "POST", "/invocations?top_k=abc", png(), {"Content-Type": "image/png"}) == (
        400, {"error": "top_k: expected an integer >= 1, got 'abc'"})
    assert request(port, "POST", "/invocations?top_k=5", png(), {"Content-Type": "image/png"}) == (
        400, {"error": "top_k: expected an integer from 1 to 4 (the number of classes), got 5"})
    for value in ("NaN", "Infinity", "1.5", "true", '"x"', "[1]"):
        status, out = request(port, "POST", "/invocations", f'{{"image": "{b64(png())}", "params": {{"top_k": {value}}}}}'
                              .encode(), {"Content-Type": "application/json"})
        assert status == 400 and out["error"].startswith("params.top_k: expected an integer"), (value, out)
    status, out = request(port, "POST", "/invocations", png_declaring(5000, 5000), {"Content-Type": "image/png"})
    assert status == 413 and "exceeds the budget of 1,000,000 pixels" in out["error"]
    status, out = request(port, "POST", "/invocations", b"x" * (300 * 1024), {"Content-Type": "image/png"})
    assert status == 413 and "262,144-byte limit" in out["error"]
    assert request(port, "GET", "/nowhere", None, {})[0] == 404
    assert request(port, "GET", "/invocations", None, {})[0] == 405


@pytest.mark.e2e
def test_bad_framing_and_stalls_get_json_answers(server):
    port = server.port
    head = "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    assert raw(port, f"{head}Content-Length: abc\r\n\r\n".encode())[0] == 400
    assert raw(port, f"{head}Content-Length: -5\r\n\r\n".encode())[0] == 400
    assert raw(port, f"{head}Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcd".encode())[0] == 400
    assert raw(port, f"{head}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n".encode())[0] == 400
    assert raw(port, f"{head}Content-Length: 99999999999999\r\n\r\n".encode())[0] == 413
    status, out = raw(port, f"{head}Content-Length: 1000\r\n\r\n".encode() + png()[:50])  # then stalls
    assert status == 408 and "not received within 1 s" in out["error"]
    status, out = raw(port, f"{head}Content-Length: 1000\r\n\r\n".encode() + png()[:50], half_close=True)
    assert status == 400 and "cut short" in out["error"]
    status, out = raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    assert status == 408 and "headers not received" in out["error"]
    status, out = raw(port, b"GARBAGE\r\n\r\n")
    assert status == 400 and "malformed HTTP request" in out["error"]
    chunked = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (b"x" * 65536,) * 5) + b"0\r\n\r\n"
    assert raw(port, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked)[0] == 413  # no length given
    body = png()
    assert raw(port, f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body, half_close=True)[0] == 200
    assert server.ping()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from([b64(png()), b64(png(8, 8, "L")), b64(b"not an image"), b64(png_declaring(9000, 9000))]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["image", "images", "instances", "inputs", "dataframe_split", "dataframe_records", "columns",
                         "data", "b64", "params", "top_k"]) | st.text(max_size=5), children, max_size=4),
    max_leaves=12)
bodies = st.one_of(
    st.binary(max_size=512),
    st.sampled_from([png(), png(3000, 1), png_declaring(70_000, 70_000), png()[:40]]),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["image", "images", "instances", "inputs", "params"]), json_values, min_size=1)
    .map(lambda v: json.dumps(v).encode()),
)
content_types = st.sampled_from(["image/png", "image/jpeg", "application/x-image", "application/json",
                                 "application/json; charset=utf-8", "text/csv", "", "image/png; x=\x7f"]) | st.text(
    st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
queries = st.sampled_from(["", "?top_k=2", "?top_k=abc", "?top_k=-1", "?top_k=1e9", "?top_k=99999999999999999999999",
                           "?top_k=%ff", "?top_k=&top_k=3", "?%%%", "?top_k=nan"]) | st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"), max_size=20).map(lambda q: "?" + q)


@pytest.mark.e2e
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
       path=st.sampled_from(["/invocations", "/ping", "/", "/invocations/", "//invocations"]),
       query=queries, body=bodies, content_type=content_types,
       extra=st.dictionaries(st.sampled_from(["Accept", "X-Junk", "Expect", "Connection"]),
                             st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20), max_size=2))
def test_fuzzed_requests_always_get_a_json_answer(server, method, path, query, body, content_type, extra):
    headers = {"Content-Type": content_type, **extra}
    if headers.get("Expect") and method == "POST":
        headers.pop("Expect")  # http.client does not implement 100-continue: it would wait for nothing
    status, out = request(server.port, method, path + query, body, headers)
    assert status < 500, (status, out)
    if status == 200:
        assert "predictions" in out or out == {"status": "ok"}
    else:
        assert isinstance(out.get("error"), str)


@pytest.mark.e2e
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.sampled_from(["", "0", "-1", "abc", "1e3", " 10", "10 ", "0x10", "99999999999999999999",
                               "10, 10", "4294967296"]),
       chunked=st.booleans(), sent=st.binary(max_size=64), half_close=st.booleans())
def test_fuzzed_framing_always_gets_a_json_answer(server, length, chunked, sent, half_close):
    head = "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    head += f"Content-Length: {length}\r\n" if length else ""
    head += "Transfer-Encoding: chunked\r\n" if chunked else ""
    status, out = raw(server.port, (head + "\r\n").encode() + sent, half_close=half_close)
    assert 400 <= status < 500 and isinstance(out["error"], str), (status, out)


@pytest.mark.e2e
def test_memory_stays_bounded_under_bombs_and_big_bodies(server):
    """Bombs within the body limit and bodies past it, many times: RSS grows by less than 60 MB."""
    bomb = png_declaring(900, 1000, zlib.compress(b"\x00" * (901 * 1000), 9))  # within the budget: decoded
    big = json.dumps({"images": [b64(bomb)] * 8}).encode()
    for _ in range(3):  # warm-up: allocator pools, lazy imports
        request(server.port, "POST", "/invocations", big, {"Content-Type": "application/json"})
    before = server.rss_mb()
    for _ in range(30):
        assert request(server.port, "POST", "/invocations", big, {"Content-Type": "application/json"})[0] == 200
        assert request(server.port, "POST", "/invocations", b"\0" * 400_000, {"Content-Type": "image/png"})[0] == 413
        assert request(server.port, "POST", "/invocations", png_declaring(50_000, 50_000),
                       {"Content-Type": "image/png"})[0] == 413
    assert server.rss_mb() - before < 60, (before, server.rss_mb())


@pytest.mark.e2e
def test_busy_server_answers_503_with_retry_after(server):
    """More stalled requests than max_pending (8): the next one is turned away at once, with Retry-After."""
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        for s in stalled:
            s.sendall(head)
        time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/invocations", body=png(), headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        assert response.status == 503 and response.getheader("Retry-After") == "1"
        assert "busy" in json.loads(response.read())["error"]
    finally:
        for s in stalled:
            s.close()


@pytest.mark.e2e
def test_sigterm_finishes_the_request_in_flight(model_file):
    srv = Server(model_file, workers=2)
    body = png()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}"
                  "\r\n\r\n".encode() + body[:10])
        time.sleep(0.3)
        os.killpg(srv.proc.pid, signal.SIGTERM)  # mid-request
        time.sleep(0.3)
        s.sendall(body[10:])
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert srv.proc.wait(timeout=60) == 0
    assert "Traceback" not in srv.log.read_text()


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.just(b64(png(4, 4))),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["image", "images", "instances", "inputs", "dataframe_split", "dataframe_records", "columns",
                         "data", "b64", "params", "top_k"]) | st.text(max_size=4), children, max_size=4),
    max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(body=any_json | st.builds(lambda c, d: {"dataframe_split": {"columns": c, "data": d}},
                                 st.just(["image"]) | any_json, any_json))
def test_parse_body_and_decode_raise_only_request_errors(body):
    """Whatever JSON arrives, the contract answers with images or a RequestError (never TypeError & co)."""
    from cnnpipe.serving.contract import parse_body

    try:
        images, _ = parse_body(json.dumps(body).encode(), "application/json")
        for i, image in enumerate(images):
            to_array(image, 16, 3, i)
    except RequestError as e:
        assert 400 <= e.status < 500 and str(e)
