"""`cnnpipe serve`: SageMaker's container contract (`GET /ping`, `POST /invocations`) on uvicorn + Starlette.

Request bodies and answers are those of cnnpipe.serving.contract. Every request gets an HTTP answer
with a JSON body: a malformed one a 4xx naming what was wrong, a busy worker a 503 with Retry-After.
The guards (all per worker process, from the params.yaml `serve` block):
- the body limit is counted while reading (chunked or not, whatever Content-Length says);
- a request's headers and its body each have a deadline (408), and a body must arrive at a minimum rate
  after a grace period (408): clients trickling bytes hold nothing for long;
- request heads are limited to 16 KiB (431), whether they arrive at once or in pieces;
- bodies being read hold at most `max_pending` full bodies' worth of bytes, and at most `max_pending`
  requests with a complete body wait or predict (503 past either); one at a time decodes and predicts,
  in a thread (the event loop keeps answering /ping), in batches of `batch_size` images;
- a request's images, their declared pixels and each image's decode time are budgeted (in the contract);
- an error answer is followed by a lingering close: the rest of what the client sends is read and
  dropped for a moment, so that it reads the answer rather than a reset connection.
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
from cnnpipe.serving.contract import (DEFAULT_BUDGETS, Budgets, RequestError, check_top_k, parse_body, parse_top_k,
                                      request_batches)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response

ROUTES_HINT = "use GET /ping or POST /invocations"
BUSY = {"Retry-After": "1"}
# After an error answer, how long the rest of what the client sends is read and dropped before the connection
# closes: closing with unread data makes the kernel send a reset, which can destroy the answer in flight.
LINGER_SECONDS = 2.0
# Inference threads per worker process. One: a request holds a few images, too little work to share out,
# and intra-op threads waiting on each other cost most on a busy machine (measured here under load: a
# one-image request many times slower with two threads than with one). More cores: more --workers.
INFERENCE_THREADS = 1

Invoke = Callable[[bytes, str, Mapping[str, str]], tuple[int, dict]]  # (body, content type, query) -> status, JSON


def cnnpipe_invoke(predictor: Any, default_top_k: int, budgets: Budgets = DEFAULT_BUDGETS) -> Invoke:
    """The request handling of `cnnpipe serve`: parse the body, decode and predict `budgets.batch_size` images at a
    time, answer {"predictions": [...]}. `predictor` is a Predictor or an OnnxPredictor (its spec and predict)."""
    spec = predictor.spec
    num_classes = len(spec.classes)

    def invoke(body: bytes, content_type: str, query: Mapping[str, str]) -> tuple[int, dict]:
        try:
            images, top_k = parse_body(body, content_type, budgets)
            if "top_k" in query:
                top_k = parse_top_k(query["top_k"], "top_k")
            top_k = check_top_k(top_k, num_classes) if top_k is not None else min(default_top_k, num_classes)
            predictions = []
            for batch in request_batches(images, spec.image_size, spec.in_channels, spec.resize, budgets):
                predictions += predictor.predict(batch, top_k)
            return 200, {"predictions": predictions}
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
    budgets: Budgets
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
        return cnnpipe_invoke(predictor, self.top_k, self.budgets)


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
        self.pending = 0  # requests with a complete body, waiting for or in inference
        self.reading = BodyBytes(cfg.max_pending * cfg.max_body_bytes)

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

            try:  # a request counts as pending once its body is complete: slow uploads hold nothing
                body = await read_body(request, self.cfg, self.reading)
            except RequestError as e:
                return error(e.status, str(e), {"Connection": "close", **BUSY} if e.status == 503 else
                             {"Connection": "close"} if e.close else None)
            except ClientDisconnect:
                return error(400, "client disconnected")  # nobody reads it; uvicorn drops it
            if self.pending >= self.cfg.max_pending:
                return error(503, f"server busy ({self.pending} requests waiting or predicting, serve.max_pending "
                             f"is {self.cfg.max_pending}); retry shortly", BUSY)
            self.pending += 1
            try:
                query = dict(request.query_params)
                status, payload = await anyio.to_thread.run_sync(
                    self.invoke, body, request.headers.get("content-type", ""), query, limiter=limiter)
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


class BodyBytes:
    """The bytes of request bodies being read in a worker, all connections together: bounded, so that many
    concurrent uploads hold no more memory than `max_pending` full bodies (trickled ones hold next to none)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, n: int) -> None:
        if self.held + n > self.limit:
            raise RequestError(f"server busy (request bodies being received hold {self.held:,} bytes, serve.max_pending "
                               "x serve.max_body_bytes); retry shortly", 503, close=True)
        self.held += n


async def read_body(request: Any, cfg: ServeConfig, reading: BodyBytes) -> bytes:
    """The body, counted as it arrives: a 413 past `max_body_bytes`; a 408 past `body_timeout` seconds, or when
    fewer than `min_upload_rate` bytes a second (on average) arrived after the first `upload_grace` seconds.
    Past the limit, up to as much again is read and dropped (never kept), so that the client reads the 413
    rather than a reset connection; a body declared larger than that is refused unread and the connection closed."""
    limit, timeout = cfg.max_body_bytes, cfg.body_timeout
    declared = request.headers.get("content-length", "")
    too_large = f"payload of {{:,}} bytes exceeds the {limit:,}-byte limit (serve.max_body_bytes)"
    if declared.isdigit() and int(declared) > 2 * limit:
        raise RequestError(too_large.format(int(declared)), 413, close=True)
    loop = asyncio.get_running_loop()
    start = loop.time()

    def deadline(size: int) -> float:  # when the body is late: its total deadline, or its rate falls short
        if cfg.min_upload_rate <= 0:
            return start + timeout
        return min(start + timeout, start + cfg.upload_grace + size / cfg.min_upload_rate)

    chunks, size, kept = [], 0, 0
    try:
        async with asyncio.timeout_at(deadline(0)) as timer:
            async for chunk in request.stream():
                size += len(chunk)
                if size > 2 * limit:
                    raise RequestError(f"payload exceeds the {limit:,}-byte limit (serve.max_body_bytes)", 413,
                                       close=True)
                if size <= limit:
                    reading.take(len(chunk))
                    kept += len(chunk)
                    chunks.append(chunk)
                timer.reschedule(deadline(size))
    except TimeoutError:
        elapsed = loop.time() - start
        if elapsed < timeout:
            raise RequestError(f"request body arriving too slowly: {size:,} bytes in {elapsed:.1f} s, under the "
                               f"minimum of {cfg.min_upload_rate:,} bytes/s after {cfg.upload_grace:g} s "
                               "(serve.min_upload_rate)", 408, close=True) from None
        raise RequestError(f"request body not received within {timeout:g} s ({size:,} bytes arrived; "
                           "serve.body_timeout)", 408, close=True) from None
    finally:
        reading.held -= kept
    if size > limit:
        raise RequestError(too_large.format(size), 413)
    return b"".join(chunks)


class _Connection(h11.Connection):
    """h11's connection, keeping the text of the last protocol error for the answer, and holding a request's
    head to the size limit also when all of it arrives at once (h11 checks only a head still incomplete)."""

    last_error: h11.RemoteProtocolError | None = None

    def __init__(self, max_head_bytes: int):
        super().__init__(h11.SERVER, max_head_bytes)
        self.max_head_bytes = max_head_bytes

    def next_event(self) -> Any:  # an h11 event, or NEED_DATA / PAUSED
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                size = len(event.method) + len(event.target) + 12 + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > self.max_head_bytes:
                    raise h11.RemoteProtocolError(f"request head of {size:,} bytes", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:  # h11 says "Receive buffer too long"
                what = str(e) if str(e).startswith("request head of") else "request head"
                e = h11.RemoteProtocolError(f"{what} exceeds the {self.max_head_bytes:,}-byte limit",
                                            error_status_hint=431)
            self.last_error = e
            raise e from None


class _LingeringTransport:
    """The connection's transport, whose close() is a lingering close (see LINGER_SECONDS): the answer is
    sent, then the sending side shut, and what still arrives is dropped until the client closes or the time is
    up. Everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, on_close: Callable[[], None]):
        self._transport, self._loop, self._on_close = transport, loop, on_close
        self.lingering = False
        self.peer_closed = False  # the client shut its sending side: nothing left to drain

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        self.lingering = True
        self._on_close()
        try:
            if self.peer_closed or not self._transport.can_write_eof():
                raise ConnectionError
            self._transport.write_eof()  # after the answer still buffered
        except OSError:  # the client closed or reset the connection: nothing to linger for
            self._transport.close()
            return
        self._transport.resume_reading()
        self._loop.call_later(LINGER_SECONDS, self._transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers, a size limit on them however they
    arrive, answers to half-closed complete requests, JSON for protocol errors (bad request line,
    Content-Length or Transfer-Encoding, oversized head: uvicorn answers those in text) and lingering closes."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conn = _Connection(self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        self.header_timer: asyncio.TimerHandle | None = None

    def arm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        timeout = getattr(self.config, "header_timeout", 10.0)
        self.header_timer = self.loop.call_later(timeout, self.header_timeout_handler)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self.loop, self.closing))  # type: ignore[arg-type]
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

    def closing(self) -> None:
        """The connection is closing (lingering): a request still in the app is told its client is gone, as
        when the connection is lost, so that nothing more is written (the sending side is shut)."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            return  # answered and closing: dropped
        super().data_received(data)

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
            self.write_json(408, f"request headers not received within {timeout:g} s (serve.header_timeout)")
        self.transport.close()

    def eof_received(self) -> bool:
        """The client closed its sending side. A complete request still gets its answer (stock uvicorn
        would close at once), also one sent with `Connection: close` (h11: MUST_CLOSE rather than DONE); a
        request cut short gets a 400 saying so."""
        self.transport.peer_closed = True
        if self.transport.lingering:
            return False  # nothing more to drain: the transport closes
        state = self.conn.their_state
        if state in (h11.DONE, h11.MUST_CLOSE) and self.cycle is not None and not self.cycle.response_complete:
            return True  # keep the transport open for the answer on its way
        if state is h11.SEND_BODY and self.cycle is not None and not self.cycle.response_started:
            self.write_json(400, "request body cut short: the client stopped sending before its end")
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            self.write_json(400, "request head cut short: the client stopped sending before the blank line")
        self.transport.close()
        return False

    def send_400_response(self, msg: str) -> None:
        e = self.conn.last_error
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # an answer is on its way already: only close
            return
        status = getattr(e, "error_status_hint", 400)
        self.write_json(status, str(e) if status == 431 else f"malformed HTTP request: {e or msg}")
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
