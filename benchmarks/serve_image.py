"""Benchmark: the lean ONNX Runtime serving image (`EXTRAS=serve-onnx container/build.sh`) against the torch
backend and `mlflow models serve`, on the same registered model, on this host, in one run.

For each server: cold start (launch -> first 200 on /ping, median of --starts), RSS per worker at rest and the
largest seen under 16 clients, and closed-loop HTTP load (one 32x32 GTSRB PNG per request; clients kept alive)
at 1 and 16 clients: throughput, p50/p99. The servers:
- onnx_image:      the serve-onnx image under podman (host network: no port proxy in the path), the version's
                   folder mounted at /opt/ml/model, `cnnpipe serve --backend onnxruntime`;
- onnx_process:    the same command as a process of this environment;
- torch_process:   `cnnpipe serve --backend torch` as a process (the torch image is not rebuilt here: its
                   size is image_build_serve.json's, a from-scratch build took 17 min on this machine);
- mlflow_process:  `mlflow models serve --env-manager local` (it takes MLflow's JSON, not a raw PNG).
Every server runs --workers (default 2) workers. The model: serve_load.py's (fastnet trained on GTSRB through
the real CLI, registered: its ONNX graph exported by register).

    flock /tmp/cnnpipe-bench.lock nice -n 5 .venv/bin/python -m benchmarks.serve_image [--seconds 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import load_average, process_rss_mb, record
from benchmarks.serve_load import BIN, GTSRB_ZIP, ROOT, free_port, load, model_workspace, sample_png, stop

IMAGE = "localhost/cnnpipe-onnx:bench"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "container/containers.conf")}
TORCH_IMAGE_MB = 6658  # EXTRAS=serve,mlflow: benchmarks/results/image_build_serve.json
TARGETS = {"image_mb": 600, "cold_start_s": 3.0, "rss_per_worker_mb_at_rest": 150,
           "throughput_c16_over_torch": 2.0, "throughput_c16_over_mlflow": 5.0}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def worker_rss(root: int) -> list[float]:
    """RSS (MB) of each serving process under `root`: its worker children when it supervises some (uvicorn
    --workers N; a `sh -c`/podman layer is looked through), else `root` itself."""
    kids = [k for k in children(root) if Path(f"/proc/{k}/cmdline").exists()]
    # uvicorn's Multiprocess spawns its workers via multiprocessing: a resource tracker is not a worker
    workers = [k for k in kids if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]
    if not workers:
        return [round(process_rss_mb(root), 1)]
    if len(workers) == 1 and children(workers[0]):  # a launcher in between
        return worker_rss(workers[0])
    return [round(process_rss_mb(k), 1) for k in workers]


def wait_ping(port: int, alive, deadline_s: float = 300) -> float:  # noqa: ANN001 - a callable
    began = time.perf_counter()
    while time.perf_counter() - began < deadline_s:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return time.perf_counter() - began
        except OSError:
            pass
        if not alive():
            raise SystemExit(f"the server on port {port} stopped before answering /ping")
        time.sleep(0.02)
    raise SystemExit(f"no 200 from /ping on port {port} within {deadline_s:g} s")


class Server:
    """One server: started, timed to its first 200, its serving PID, stopped."""

    def __init__(self, name: str, ws: Path, model_dir: Path, workers: int):
        self.name, self.ws, self.model_dir, self.workers = name, ws, model_dir, workers
        self.proc: subprocess.Popen | None = None
        self.container: str | None = None

    def start(self) -> float:
        port = self.port = free_port()
        w = str(self.workers)
        if self.name == "onnx_image":
            t0 = time.perf_counter()
            out = subprocess.run(["podman", "run", "-d", "--rm", "--network", "host", "-v",
                                  f"{self.model_dir}:/opt/ml/model:ro", IMAGE, "cnnpipe", "serve", "--backend",
                                  "onnxruntime", "--model", "/opt/ml/model", "--host", "127.0.0.1", "--port", str(port),
                                  "--workers", w], capture_output=True, text=True, env=PODMAN_ENV, check=True)
            self.container = out.stdout.strip()
            alive = lambda: subprocess.run(["podman", "inspect", "-f", "{{.State.Running}}", self.container],
                                           capture_output=True, text=True, env=PODMAN_ENV).stdout.strip() == "true"
            return time.perf_counter() - t0 + wait_ping(port, alive)
        cmd = {"onnx_process": [str(BIN / "cnnpipe"), "serve", "--backend", "onnxruntime", "--workers", w],
               "torch_process": [str(BIN / "cnnpipe"), "serve", "--backend", "torch", "--workers", w],
               "mlflow_process": [str(BIN / "mlflow"), "models", "serve", "-m", "models:/serve-load@champion",
                                  "--env-manager", "local", "-h", "127.0.0.1", "-w", w]}[self.name]
        cmd += ["--port" if self.name != "mlflow_process" else "-p", str(port)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.ws / 'mlflow.db'}",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        return time.perf_counter() - t0 + wait_ping(port, lambda: self.proc.poll() is None)

    def pid(self) -> int:
        if self.container:
            return int(subprocess.run(["podman", "inspect", "-f", "{{.State.Pid}}", self.container], capture_output=True,
                                      text=True, env=PODMAN_ENV, check=True).stdout)
        return self.proc.pid

    def stop(self) -> None:
        if self.container:
            subprocess.run(["podman", "rm", "-f", "-t", "10", self.container], capture_output=True, env=PODMAN_ENV)
            self.container = None
        elif self.proc is not None:
            stop(self.proc)
            self.proc = None


def under_load(server: Server, body: bytes, ctype: str, clients: int, seconds: float) -> tuple[dict, float]:
    """The load's figures and the largest RSS of a worker seen meanwhile."""
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], *worker_rss(server.pid()))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        figures = load(server.port, body, ctype, clients, seconds)
    finally:
        done.set()
        sampler.join()
    return figures, round(peak[0], 1)


def measure(server: Server, bodies: dict[str, tuple[bytes, str]], seconds: float, starts: int) -> dict:
    print(f"{server.name}: cold starts", file=sys.stderr, flush=True)
    colds = []
    for _ in range(starts - 1):
        colds.append(server.start())
        server.stop()
    colds.append(server.start())
    try:
        for body, ctype in bodies.values():  # warm-up
            load(server.port, body, ctype, 2, 2)
        time.sleep(1)
        out = {"cold_start_s": round(statistics.median(colds), 2), "cold_starts_s": [round(c, 2) for c in colds],
               "rss_per_worker_mb_at_rest": worker_rss(server.pid())}
        peak = 0.0
        for label, (body, ctype) in bodies.items():
            for clients in (1, 16):
                print(f"{server.name}: {label}, {clients} client(s), {seconds:g} s", file=sys.stderr, flush=True)
                out[f"{label}_c{clients}"], seen = under_load(server, body, ctype, clients, seconds)
                peak = max(peak, seen)
        out["rss_per_worker_mb_under_load_max"] = peak
        out["load_average_after"] = load_average()
    finally:
        server.stop()
    return out


def build_image() -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "container/build.sh")], capture_output=True, text=True,
                          env={**PODMAN_ENV, "EXTRAS": "serve-onnx", "CNNPIPE_IMAGE": IMAGE})
    if proc.returncode != 0:
        raise SystemExit(f"container/build.sh failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    size = int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], capture_output=True,
                              text=True, env=PODMAN_ENV, check=True).stdout)
    torch_free = subprocess.run(["podman", "run", "--rm", IMAGE, "python3", "-c",
                                 "import importlib.util as u; print(u.find_spec('torch') is None)"],
                                capture_output=True, text=True, env=PODMAN_ENV).stdout.strip() == "True"
    return {"image": IMAGE, "image_mb": round(size / 1e6), "no_torch_in_image": torch_free,
            "build_s_with_cached_layers": round(time.perf_counter() - t0, 1),
            "build_log_tail": re.sub(r"\s+", " ", proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="per load level (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="workers of every server (default 2)")
    parser.add_argument("--starts", type=int, default=3, help="cold starts per server (median; default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the served model (default 2)")
    parser.add_argument("--zip", type=Path, default=GTSRB_ZIP)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnpipe-serve-image"))
    parser.add_argument("--reuse", action="store_true", help="serve the model a previous run left in --work")
    parser.add_argument("--servers", default="onnx_image,onnx_process,torch_process,mlflow_process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_image.json")
    parser.add_argument("--note", default=None, help="what else ran on the machine meanwhile")
    args = parser.parse_args()
    ws = args.work
    load_before = load_average()
    dataset = model_workspace(ws, args.zip, args.epochs, args.reuse)
    from cnnpipe.tracking import Registry

    model_dir = ws / "version"
    shutil.rmtree(model_dir, ignore_errors=True)
    folder, tags, _ = Registry(f"sqlite:///{ws / 'mlflow.db'}").model_files("models:/serve-load@champion", model_dir)
    if "cnnpipe.onnx_sha256" not in tags:
        raise SystemExit("the registered version carries no ONNX graph (registered by an older cnnpipe? rerun "
                         "without --reuse)")
    image = build_image() if "onnx_image" in args.servers else {}
    png = sample_png(args.zip)
    as_json = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}})
    png_body, json_body = (png, "image/png"), (as_json.encode(), "application/json")
    results = {}
    for name in args.servers.split(","):
        bodies = {"json": json_body} if name == "mlflow_process" else {"png": png_body, "json": json_body}
        results[name] = measure(Server(name, ws, folder, args.workers), bodies, args.seconds, args.starts)
    rps = lambda name, body: results.get(name, {}).get(f"{body}_c16", {}).get("requests_per_s")
    onnx = "onnx_image" if "onnx_image" in results else "onnx_process"
    ratios = {}
    if rps(onnx, "png") and rps("torch_process", "png"):
        ratios["c16_png_onnx_over_torch"] = round(rps(onnx, "png") / rps("torch_process", "png"), 2)
    if rps(onnx, "json") and rps("mlflow_process", "json"):
        ratios["c16_json_onnx_over_mlflow"] = round(rps(onnx, "json") / rps("mlflow_process", "json"), 2)
        ratios["c16_png_onnx_over_mlflow_json"] = round(rps(onnx, "png") / rps("mlflow_process", "json"), 2)
    record(args.out, {
        "benchmark": "serving image/process: size, cold start, RSS per worker, closed-loop HTTP load on 127.0.0.1 "
                     "(one 32x32 PNG per request; MLflow gets the same image as dataframe_split JSON)",
        "model": f"fastnet (width 32, {args.epochs} epochs) trained on {dataset}, models:/serve-load@champion",
        "workers": args.workers, "seconds_per_level": args.seconds, "cold_starts": args.starts,
        "image": image, "torch_image_mb": TORCH_IMAGE_MB, "results": results, "throughput_ratios": ratios,
        "targets": TARGETS, "load_average_before": load_before, "note": args.note,
    })


if __name__ == "__main__":
    main()
