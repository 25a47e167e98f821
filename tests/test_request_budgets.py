"""The work one request may cost a server (issue 24): slow uploads, heads past the limit and half-closed
connections, against a real `serve()` process on 127.0.0.1 over raw sockets (e2e)."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_serving_guards import Server, model_file, png, raw, request  # noqa: F401 - model_file: a fixture

GRACE = 3.0  # the test server's serve.upload_grace: the honest requests must fit in it on a busy machine


@pytest.fixture(scope="module")
def server(model_file):  # noqa: F811
    srv = Server(model_file, upload_grace=GRACE, min_upload_rate=1024, body_timeout=5.0)
    yield srv
    assert srv.stop() == 0


def post_head(length: int, extra: str = "") -> bytes:
    return (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n{extra}"
            "\r\n").encode()


@pytest.mark.e2e
def test_trickled_bodies_hold_nothing_and_get_a_408(server):
    """Twice max_pending (8) clients trickle bodies: real requests keep getting answers at once, and each
    trickler gets a 408 naming the rate once the grace period is over."""
    tricklers = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(16)]
    try:
        for s in tricklers:
            s.sendall(post_head(1000) + b"\x89")
        time.sleep(0.1)
        for _ in range(3):
            assert request(server.port, "POST", "/invocations", png(), {"Content-Type": "image/png"})[0] == 200
        for s in tricklers:  # still held: nothing answered yet
            s.settimeout(0)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        for s in tricklers:
            s.settimeout(10)
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"arriving too slowly" in answer and b"serve.min_upload_rate" in answer
    finally:
        for s in tricklers:
            s.close()


@pytest.mark.e2e
def test_a_half_closed_connection_close_request_is_answered(server):
    body = png()
    status, out = raw(server.port, post_head(len(body), "Connection: close\r\n") + body, half_close=True)
    assert status == 200 and len(out["predictions"]) == 1


@pytest.mark.e2e
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([17_000, 60_000, 200_000, 1_000_000]) | st.integers(16_500, 400_000),
       pieces=st.integers(1, 8), keep_alive_first=st.booleans())
def test_heads_past_16_kib_get_a_json_431(server, size, pieces, keep_alive_first):
    """However a head past the limit arrives (at once or in pieces, first on its connection or after an
    answered request), the answer is a JSON 431, never a reset."""
    first = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n" if keep_alive_first else b""
    head = f"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * size}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        if first:
            s.sendall(first)
            answered = b""
            while not answered.endswith(b'{"status":"ok"}'):
                answered += s.recv(65536)
            assert answered.startswith(b"HTTP/1.1 200 ")
        step = -(-len(head) // pieces)
        for i in range(0, len(head), step):
            try:
                s.sendall(head[i:i + step])
            except OSError:  # answered and closed before all of it was sent: the answer is still readable
                break
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert b"application/json" in got and b"exceeds the 16,384-byte limit" in got


@pytest.mark.e2e
def test_a_head_within_the_limit_is_served(server):
    body = png()
    status, _ = raw(server.port, post_head(len(body), f"X-Ok: {'a' * 15_000}\r\n") + body)
    assert status == 200
