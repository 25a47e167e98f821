"""`cnnpipe serve`: SageMaker's container contract (`GET /ping`, `POST /invocations`) on uvicorn + Starlette.

Request bodies and answers are those of cnnpipe.serving.contract. Every request gets an HTTP answer
with a JSON body: a malformed one a 4xx naming what was wrong, a busy worker a 503 with Retry-After.
The guards (all per worker process, from the params.yaml `serve` block):
- the body limit is counted while reading (chunked or not, whatever Content-Length says);
- a request's headers and its body each have a deadline (408);
- at most `max_pending` requests are held; one at a time decodes and predicts, so the memory a worker
  spends on images is bounded by one request's pixel budget;
- image headers are checked against the pixel budget before decoding (in the contract).
"""

from __future__ import annotations

import asyncio
import http
import json
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from cnnpipe.calibration import UNCALIBRATED, Calibration
from cnnpipe.config import ServeConfig
from cnnpipe.errors import CnnpipeError
from cnnpipe.serving.contract import RequestError, check_top_k, parse_body, parse_top_k

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response

ROUTES_HINT = "use GET /ping or POST /invocations"
# Inference threads per worker process. One: a request holds a few images, too little work to share out,
# and intra-op threads waiting on each other cost most on a busy machine (measured here under load: a
# one-image request many times slower with two threads than with one). More cores: more --workers.
INFERENCE_THREADS = 1

Invoke = Callable[[bytes, str, Mapping[str, str]], tuple[int, dict]]  # (body, content type, query) -> status, JSON


def cnnpipe_invoke(predictor: Any, default_top_k: int, max_body_bytes: int, max_pixels: int) -> Invoke:
    """The request handling of `cnnpipe serve`: parse the body, predict, answer {"predictions": [...]}.
    `predictor` is a Predictor or an OnnxPredictor (decode + predict)."""
    num_classes = len(predictor.spec.classes)

    def invoke(body: bytes, content_type: str, query: Mapping[str, str]) -> tuple[int, dict]:
        try:
            images, top_k = parse_body(body, content_type, max_body_bytes)
            if "top_k" in query:
                top_k = parse_top_k(query["top_k"], "top_k")
            top_k = check_top_k(top_k, num_classes) if top_k is not None else min(default_top_k, num_classes)
            return 200, {"predictions": predictor.predict(predictor.decode(images, max_pixels), top_k)}
        except RequestError as e:
            return e.status, {"error": str(e)}
        except CnnpipeError as e:
            return 400, {"error": str(e)}
    return invoke


@dataclass(frozen=True)
class ModelInvoke:
    """Loads a model file in a worker process and returns its Invoke: picklable, so that `--workers N`
    processes (spawned) each build their own."""

    model_file: str  # a cnnpipe model file (torch) or an ONNX file from `cnnpipe export onnx`
    backend: str
    top_k: int
    max_body_bytes: int
    max_pixels: int
    threads: int
    calibration: Calibration = UNCALIBRATED  # torch backend (an ONNX file carries its own)
    tta: bool = False

    def __call__(self) -> Invoke:
        if self.backend == "onnxruntime":
            from cnnpipe.serving.onnx_runtime import OnnxPredictor

            predictor = OnnxPredictor(self.model_file, self.threads, self.tta)
        else:
            import torch

            from cnnpipe.engine.predictor import Predictor

            torch.set_num_threads(self.threads)
            predictor = Predictor.from_file(self.model_file, calibration=self.calibration, tta=self.tta)
        return cnnpipe_invoke(predictor, self.top_k, self.max_body_bytes, self.max_pixels)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status, headers)


class ServingApp:
    """The ASGI app. Picklable (it goes to spawned workers): the Starlette app and the model are built in
    each process, the model at startup (or handed in ready by `preload`, for a single process)."""

    def __init__(self, load: Callable[[], Invoke], cfg: ServeConfig):
        self.load, self.cfg = load, cfg
        self.invoke: Invoke | None = None
        self.app = None
        self.pending = 0

    def preload(self) -> None:
        self.invoke = self.load()

    def __getstate__(self) -> dict:
        return {"load": self.load, "cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["load"], state["cfg"])

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.app is None:
            self.app = self.build()
        await self.app(scope, receive, send)

    def build(self) -> Starlette:
        import contextlib

        import anyio
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        limiter = anyio.CapacityLimiter(1)  # one request decodes and predicts at a time per worker

        @contextlib.asynccontextmanager
        async def lifespan(_app: Any) -> AsyncIterator[None]:
            if self.invoke is None:
                self.invoke = await anyio.to_thread.run_sync(self.load)
            yield

        async def ping(_request: Any) -> Response:
            from starlette.responses import JSONResponse

            return JSONResponse({"status": "ok"})

        async def invocations(request: Any) -> Response:
            from starlette.requests import ClientDisconnect

            if self.pending >= self.cfg.max_pending:
                return error(503, f"server busy ({self.pending} requests in progress); retry shortly",
                             {"Retry-After": "1"})
            self.pending += 1
            try:
                body = await read_body(request, self.cfg.max_body_bytes, self.cfg.body_timeout)
                query = dict(request.query_params)
                status, payload = await anyio.to_thread.run_sync(
                    self.invoke, body, request.headers.get("content-type", ""), query, limiter=limiter)
            except RequestError as e:
                return error(e.status, str(e), {"Connection": "close"} if e.close else None)
            except ClientDisconnect:
                return error(400, "client disconnected")  # nobody reads it; uvicorn drops it
            except Exception as e:  # a bug: answer 500, log one line, keep serving
                print(f"cnnpipe serve: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return error(500, f"internal error: {type(e).__name__}")
            finally:
                self.pending -= 1
            from starlette.responses import JSONResponse

            return JSONResponse(payload, status)

        async def http_error(request: Any, exc: HTTPException) -> Response:
            what = "method" if exc.status_code == 405 else "route"
            return error(exc.status_code, f"no {what} {request.method} {request.url.path}; {ROUTES_HINT}")

        app = Starlette(routes=[Route("/ping", ping, methods=["GET"]), Route("/invocations", invocations, methods=["POST"])],
                        exception_handlers={HTTPException: http_error}, lifespan=lifespan)
        app.router.redirect_slashes = False  # a 404 naming the routes, not a redirect
        return app


async def read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The body, counted as it arrives: a 413 past `limit`, a 408 past `timeout` seconds. Past the limit,
    up to as much again is read and dropped (never kept), so that the client reads the 413 rather than a
    reset connection; a body declared larger than that is refused unread and the connection closed."""
    declared = request.headers.get("content-length", "")
    too_large = f"payload of {{:,}} bytes exceeds the {limit:,}-byte limit"
    if declared.isdigit() and int(declared) > 2 * limit:
        raise RequestError(too_large.format(int(declared)), 413, close=True)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > 2 * limit:
                    raise RequestError(f"payload exceeds the {limit:,}-byte limit", 413, close=True)
                if size <= limit:
                    chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"request body not received within {timeout:g} s ({size:,} bytes arrived)", 408,
                           close=True) from None
    if size > limit:
        raise RequestError(too_large.format(size), 413)
    return b"".join(chunks)


class _Connection(h11.Connection):
    """h11's connection, keeping the text of the last protocol error for the answer."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:  # an h11 event, or NEED_DATA / PAUSED
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers, and JSON for protocol errors
    (bad request line, Content-Length or Transfer-Encoding, oversized head: uvicorn answers those in text)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        self.header_timer: asyncio.TimerHandle | None = None

    def arm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        timeout = getattr(self.config, "header_timeout", 10.0)
        self.header_timer = self.loop.call_later(timeout, self.header_timeout_handler)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # head and body leave as two writes: with Nagle's algorithm the body waits for the client's
        # delayed-ACK timer on every request (asyncio sets TCP_NODELAY only on proto=IPPROTO_TCP sockets)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm_header_timer()

    def header_timeout_handler(self) -> None:
        if self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE:
            if self.cycle is not None and self.cycle.response_complete:
                self.transport.close()  # answered (a 413, say), and the rest of the body still trickles in
            return  # else the headers came: the body has its own deadline
        if self.conn.trailing_data[0]:  # part of a request came, then nothing: say so
            timeout = getattr(self.config, "header_timeout", 10.0)
            self.write_json(408, f"request headers not received within {timeout:g} s")
        self.transport.close()

    def eof_received(self) -> bool:
        """The client closed its sending side. A complete request still gets its answer (stock uvicorn
        would close at once); a request cut short gets a 400 saying so."""
        state = self.conn.their_state
        if state is h11.DONE and self.cycle is not None and not self.cycle.response_complete:
            return True  # keep the transport open for the answer on its way
        if state is h11.SEND_BODY and self.cycle is not None and not self.cycle.response_started:
            self.write_json(400, "request body cut short: the client stopped sending before its end")
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            self.write_json(400, "request head cut short: the client stopped sending before the blank line")
        self.transport.close()
        return False

    def send_400_response(self, msg: str) -> None:
        e = self.conn.last_error
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # an answer is on its way already: only close
            return
        self.write_json(getattr(e, "error_status_hint", 400), f"malformed HTTP request: {e or msg}")
        self.transport.close()

    def write_json(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CnnpipeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)  # the workers serve from it
    return sock


def uvicorn_config(app: ServingApp, sock: socket.socket, cfg: ServeConfig) -> uvicorn.Config:
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, workers=cfg.workers, http=GuardedH11Protocol, lifespan="on",
                            timeout_keep_alive=cfg.keep_alive, timeout_graceful_shutdown=cfg.shutdown_timeout,
                            log_level="warning", access_log=False, proxy_headers=False, server_header=False)
    config.header_timeout = cfg.header_timeout  # read by GuardedH11Protocol; travels with the pickled config
    return config


def serve(app: ServingApp, sock: socket.socket, cfg: ServeConfig, what: str) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish (up to cfg.shutdown_timeout) before it returns."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn_config(app, sock, cfg)
    # uvicorn re-raises the stopping signal once it has shut down gracefully; with this handler that
    # ends nothing, and the command finishes normally (exit 0, one JSON line)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    print(f"serving {what} on http://{host}:{port} ({cfg.workers} worker(s), {cfg.backend}; GET /ping, "
          "POST /invocations); Ctrl-C stops", file=sys.stderr, flush=True)
    if cfg.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


def run_in_thread(app: ServingApp, cfg: ServeConfig, host: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """A single-process server on a free port in a thread (tests, the SageMaker archive's local check):
    returns (base URL, stop function)."""
    import threading
    import time

    import uvicorn

    sock = listen(host, 0)
    server = uvicorn.Server(uvicorn_config(app, sock, cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    return f"http://{host}:{sock.getsockname()[1]}", stop
