"""Benchmark: `cnnpipe serve` (torch and onnxruntime backends) and `mlflow models serve` under load, on
the same registered model, in one run on 127.0.0.1.

The model: fastnet trained briefly through the real CLI (ingest -> augment -> train -> evaluate ->
register) on the GTSRB training zip when it is present (the GTSRB recipe, fewer epochs), else on the
embedded digits upsampled to 32x32 RGB; the result says which. Closed-loop clients (1, then 16), each
on a kept-alive connection, send one 32x32 PNG per request for --seconds: throughput, p50/p99 latency,
errors, and the server's RSS (its whole process group) before and after. cnnpipe gets the raw PNG
(image/png) and, for the ratio with MLflow, the same JSON body MLflow takes (dataframe_split, base64).
Targets (issue 13): zero errors, p99 <= 15 ms at concurrency 1 and <= 60 ms at 16, throughput >= 2x
MLflow's, RSS growth <= 50 MB. The load average is recorded: on a shared machine the figures move.

    .venv/bin/python -m benchmarks.serve_load [--seconds 60] [--workers 1] [--epochs 2]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks.harness import cnnpipe, group_rss_mb, load_average, record

ROOT = Path(__file__).resolve().parents[1]
# beside the repository (…/shared/data), also from a git worktree one level deeper
GTSRB_ZIP = next((p / "shared/data/GTSRB_Final_Training_Images.zip" for p in ROOT.parents
                  if (p / "shared/data/GTSRB_Final_Training_Images.zip").exists()),
                 ROOT.parent / "shared/data/GTSRB_Final_Training_Images.zip")
BIN = Path(sys.executable).parent


def build_model(ws: Path, zip_path: Path, epochs: int) -> str:
    """Train and register the served model in workspace `ws`; returns the dataset it was trained on."""
    dataset = "gtsrb" if zip_path.exists() else "digits"
    params = yaml.safe_load((ROOT / ("configs/gtsrb.yaml" if dataset == "gtsrb" else "params.yaml")).read_text())
    params["train"].update(arch="fastnet", width=32, epochs=epochs, batch_size=128, lr=0.2)
    params["evaluate"]["tsne_samples"] = 0
    params["register"]["model_name"] = "serve-load"
    params["tracking"] = {"uri": f"sqlite:///{ws / 'mlflow.db'}", "experiment": "serve-load"}
    if dataset == "gtsrb":
        params["ingest"]["path"] = str(zip_path)
    else:
        params["ingest"].update(image_size=32, channels=3)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("ingest", "augment", "train", "evaluate", "register"):
        print(f"model: {stage} ({dataset}) ...", file=sys.stderr, flush=True)
        cnnpipe(stage, cwd=ws, stderr_to_terminal=False)
    (ws / "dataset.txt").write_text(dataset)
    return dataset


def sample_png(zip_path: Path) -> bytes:
    if zip_path.exists():
        with zipfile.ZipFile(zip_path) as z:
            img = Image.open(io.BytesIO(z.read("GTSRB/Final_Training/Images/00014/00000_00000.ppm")))
    else:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").resize((32, 32)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], ws: Path, port: int) -> subprocess.Popen:
    # mlflow models serve starts `uvicorn` by name: this environment's bin first on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            sys.exit(f"{cmd[:3]} did not start")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def post(conn: http.client.HTTPConnection, body: bytes, content_type: str) -> tuple[bool, http.client.HTTPConnection]:
    """One POST /invocations on `conn`: whether it answered 200, and the connection to use next (a new one when
    this one broke)."""
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status == 200, conn
    except OSError:
        conn.close()
        return False, http.client.HTTPConnection(conn.host, conn.port, timeout=conn.timeout)


def model_workspace(ws: Path, zip_path: Path, epochs: int, reuse: bool) -> str:
    """The served model's workspace `ws`: the one a previous run left (`reuse`), else trained anew; its dataset."""
    if reuse and (ws / "dataset.txt").exists():
        return (ws / "dataset.txt").read_text()
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    return build_model(ws, zip_path, epochs)


def load(port: int, body: bytes, content_type: str, clients: int, seconds: float) -> dict:
    """`clients` closed-loop clients for `seconds`: requests/s, latency percentiles, errors."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            ok, conn = post(conn, body, content_type)
            if ok:
                latencies[i].append(time.perf_counter() - t0)
            else:
                errors[i] += 1
        conn.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    lat = np.array([x for xs in latencies for x in xs]) * 1000
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": int(lat.size), "errors": sum(errors),
            "requests_per_s": round(lat.size / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None}


def measure(name: str, cmd: list[str], ws: Path, port: int, bodies: dict[str, tuple[bytes, str]],
            seconds: float) -> dict:
    print(f"{name}: starting", file=sys.stderr, flush=True)
    proc = start(cmd, ws, port)
    try:
        for body, ctype in bodies.values():  # warm-up
            load(port, body, ctype, 2, 2)
        out = {"rss_before_mb": round(group_rss_mb(proc.pid), 1)}
        for label, (body, ctype) in bodies.items():
            for clients in (1, 16):
                print(f"{name}: {label}, {clients} client(s), {seconds:g} s", file=sys.stderr, flush=True)
                out[f"{label}_c{clients}"] = load(port, body, ctype, clients, seconds)
        out["rss_after_mb"] = round(group_rss_mb(proc.pid), 1)
        out["rss_growth_mb"] = round(out["rss_after_mb"] - out["rss_before_mb"], 1)
        out["load_average_after"] = load_average()
    finally:
        stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="per load level (default 60)")
    parser.add_argument("--workers", type=int, default=1, help="cnnpipe serve --workers and mlflow models serve "
                                                                "--workers (default 1)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the served model (default 2)")
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-serve-load"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load.json")
    parser.add_argument("--reuse", action="store_true", help="serve the model a previous run left in --work")
    parser.add_argument("--note", default=None, help="what else ran on the machine meanwhile (the load averages "
                                                     "count this benchmark's own server and clients too)")
    args = parser.parse_args()
    ws = args.work
    load_before = load_average()
    dataset = model_workspace(ws, args.zip, args.epochs, args.reuse)
    png = sample_png(args.zip)
    as_json = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}})
    png_body, json_body = (png, "image/png"), (as_json.encode(), "application/json")
    uri = "models:/serve-load@champion"
    results = {}
    for backend in ("torch", "onnxruntime"):
        port = free_port()
        results[f"cnnpipe_{backend}"] = measure(
            f"cnnpipe serve --backend {backend}",
            [str(BIN / "cnnpipe"), "serve", "--backend", backend, "--workers", str(args.workers), "--port", str(port)],
            ws, port, {"png": png_body, "json": json_body} if backend == "torch" else {"png": png_body}, args.seconds)
    port = free_port()
    results["mlflow_models_serve"] = measure(
        "mlflow models serve", [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                                "-h", "127.0.0.1", "-p", str(port), "-w", str(args.workers)],
        ws, port, {"json": json_body}, args.seconds)
    torch_json, mlflow_json = results["cnnpipe_torch"], results["mlflow_models_serve"]
    ratio = {f"c{c}": round(torch_json[f"json_c{c}"]["requests_per_s"] / max(mlflow_json[f"json_c{c}"]["requests_per_s"],
                                                                            1e-9), 2) for c in (1, 16)}
    record(args.out, {
        "benchmark": "closed-loop HTTP load on 127.0.0.1, one 32x32 PNG per request",
        "model": f"fastnet (width 32, {args.epochs} epochs) trained on {dataset}, registered as {uri}",
        "dataset": dataset, "seconds_per_level": args.seconds, "cnnpipe_workers": args.workers,
        "mlflow_workers": args.workers,
        "results": results, "throughput_ratio_cnnpipe_torch_over_mlflow_same_json_body": ratio,
        "targets": {"errors": 0, "p99_ms_c1": 15, "p99_ms_c16": 60, "throughput_ratio": 2, "rss_growth_mb": 50},
        "load_average_before": load_before,
        "note": args.note,
    })


if __name__ == "__main__":
    main()
