"""Benchmark: a registered model served by `cnnpipe serve` (real CLI, 127.0.0.1), measured over HTTP.

p50 / p99 latency of one 32x32 PNG per request (sequential, one keep-alive connection), images/s
at concurrency 8 (8 clients, one image per request), and images/s for batches of 256 images per
request (JSON, base64 PNGs). Target (issue 6, 2-core CPU): p50 <= 15 ms for one image.

    .venv/bin/python -m benchmarks.serve_latency --tracking-uri sqlite:///mlflow.db --model models:/cnnpipe-gtsrb@champion
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import record

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def request(conn: http.client.HTTPConnection, body: bytes, ctype: str) -> float:
    start = time.perf_counter()
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": ctype})
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/cnnpipe-gtsrb@champion")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_latency.json")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "cnnpipe"), "serve", "--params", str(ROOT / "params.yaml"),
                               "--model", args.model, "--tracking-uri", args.tracking_uri, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/ping")
                if c.getresponse().status == 200:
                    break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.5)
        images = [png(i) for i in range(64)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(20):  # warm-up
            request(conn, images[i % 64], "image/png")
        lat = np.array([request(conn, images[i % 64], "image/png") for i in range(args.requests)]) * 1000

        per_client = args.requests // 8
        done = []

        def client() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for i in range(per_client):
                request(c, images[i % 64], "image/png")
            done.append(per_client)

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent = sum(done) / (time.perf_counter() - start)

        batch = json.dumps({"images": [base64.b64encode(images[i % 64]).decode() for i in range(256)]}).encode()
        request(conn, batch, "application/json")
        seconds = [request(conn, batch, "application/json") for _ in range(5)]
        result = {
            "benchmark": "cnnpipe serve on 127.0.0.1, 32x32 RGB PNG images", "model": args.model,
            "single_image_latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                                        "p99": round(float(np.percentile(lat, 99)), 2),
                                        "mean": round(float(lat.mean()), 2), "requests": args.requests},
            "concurrency_8_images_per_s": round(concurrent),
            "batch_256_images_per_s": round(256 / float(np.median(seconds))),
            "batch_256_latency_ms_median": round(float(np.median(seconds)) * 1000, 1),
            "target_p50_ms": 15,
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    record(args.out, result)


if __name__ == "__main__":
    main()
