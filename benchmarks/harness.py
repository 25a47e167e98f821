"""What every benchmark shares: run a cnnpipe command (or any command, or a Python callable) as a child and
measure it, and record a result with the machine it ran on.

A measured child runs in its own process group (start_new_session), so its workers (ingest's decoders, a
DataLoader's loaders, a server's uvicorn processes) are measured with it:
- wall_s: wall-clock seconds from start to exit;
- peak_rss_mb: the command's own peak RSS (MiB), exact, from the kernel: a small launcher process runs it
  and reads its ru_maxrss (the largest of the command and its reaped descendants). Not wait4 on the command
  from here: Linux counts in a child's ru_maxrss the memory of the process that forked it (as big as
  torch makes a benchmark), the launcher's is small;
- peak_group_rss_mb: the process group's summed RSS (MiB), sampled every `sample_s` (pages shared after a
  fork count twice; a spike shorter than a sample can be missed);
- load_before / load_after: the 1, 5 and 15 min load averages: other jobs on the machine disturb wall times,
  not memory.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import subprocess
import tempfile
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent  # this environment's executables: cnnpipe, dvc, mlflow
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides fp32 vs bf16 speed on a CPU


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info() -> dict:
    """The CPU (model, the flags that matter, cores), memory, Python and the packages' versions, the commit."""
    cpu, flags = "unknown", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "pillow", "mlflow", "dvc"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {"cpu": cpu, "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "versions": versions, "git_commit": code_version()}


def code_version(root: Path = ROOT) -> str:
    """The commit the benchmark runs (`root`: another checkout's), "+changes" when cnnpipe/ or benchmarks/ differ
    from it (a variant measured before it was committed); "" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "cnnpipe", "benchmarks/*.py"], cwd=root,
                                 capture_output=True).returncode == 1
    except OSError:
        return ""
    return f"{commit}+changes" if commit and changed else commit


def earlier_results(path: Path) -> dict:
    """The results file a run adds to ({} when there is none). Refused (SystemExit) when it was measured on a CPU
    with other flags: record() would stamp this machine and today on that CPU's figures."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    flags, theirs = machine_info()["cpu_flags"], previous.get("machine", {}).get("cpu_flags", {})
    if any(flags.get(f) != on for f, on in theirs.items() if f in flags):
        sys.exit(f"{path}: measured on a CPU with other flags ({theirs}, this one {flags}): write this machine's "
                 "results to another --out file")
    return previous


def record(path: Path, result: dict) -> None:
    """Add the machine, the date and the command line (unless `result` says its own) to `result`, write it as
    JSON to `path`, and print it (less the machine)."""
    result = {"command": " ".join(["python", "-m", _module_name(), *sys.argv[1:]]), **result,
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def process_rss_mb(pid: int) -> float:
    """RSS (MiB) of one process now (0 when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")), 0.0)


def group_rss_mb(pgid: int) -> float:
    """Summed RSS (MiB) of a process group now."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = Path(f"/proc/{entry}/status").read_text().splitlines()
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


@dataclass
class Run:
    """A finished child: its exit code, output and measurements."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float
    peak_group_rss_mb: float
    load_before: list[float]
    load_after: list[float]

    def json_line(self) -> dict:
        """The last JSON line the child printed (a cnnpipe command's result)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


# Runs argv[2:], writes its ru_maxrss (KiB) to the file argv[1], exits with its exit code (128 + N: signal N).
LAUNCHER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(r.returncode if r.returncode >= 0 else 128 - r.returncode)")


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True,
        on_line: Callable[[str], None] | None = None, stderr_to_terminal: bool = False,
        sample_s: float = 0.2) -> Run:
    """Run `cmd` in its own process group and measure it. `env`: its environment (default: this one); `on_line`
    sees each stdout line as it comes; `check`: exit with the command's output when it fails."""
    fd, peak_file = tempfile.mkstemp(prefix="cnnpipe-bench-maxrss-")
    os.close(fd)
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, peak_file, *map(str, cmd)], cwd=cwd, env=env,
                            text=True, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=None if stderr_to_terminal else subprocess.PIPE)
    done = threading.Event()
    peak_group = [0.0]
    err: list[str] = []

    def sample() -> None:
        while not done.is_set():
            peak_group[0] = max(peak_group[0], group_rss_mb(proc.pid))
            done.wait(sample_s)

    threads = [threading.Thread(target=sample, daemon=True)]
    if proc.stderr is not None:  # drained beside stdout: a full pipe would stall the child
        threads.append(threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True))
    for t in threads:
        t.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if on_line is not None:
            on_line(line)
    proc.wait()
    wall = time.perf_counter() - start
    done.set()
    for t in threads:
        t.join()
    peak_kib = Path(peak_file).read_text() or "0"
    Path(peak_file).unlink()
    result = Run(cmd, proc.returncode, "".join(out), "".join(err), round(wall, 2), round(int(peak_kib) / 1024, 1),
                 round(peak_group[0], 1), load_before, load_average())
    if check and result.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def cnnpipe(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True,
            stderr_to_terminal: bool = True) -> Run:
    """`cnnpipe <args>` of this environment, measured; its progress goes to the terminal."""
    return run([str(BIN / "cnnpipe"), *args], cwd=cwd, env=env, check=check, stderr_to_terminal=stderr_to_terminal)


def stage(args: list[str]) -> tuple[float, int]:
    """`cnnpipe <args>`: (wall seconds, the child's peak RSS in MiB)."""
    measured = cnnpipe(*args)
    return measured.wall_s, round(measured.peak_rss_mb)


def _call_in_group(fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.setpgid(0, 0)  # its own process group, as run()'s children: its workers are measured with it
    result = fn(*args)
    # VmHWM: this process's own peak since its exec (its ru_maxrss would count the parent it was forked from)
    status = Path("/proc/self/status").read_text().splitlines()
    queue.put((result, next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))))


def run_callable(fn: Callable[..., Any], *args: Any, sample_s: float = 0.2) -> tuple[Any, Run]:
    """`fn(*args)` in a fresh (spawned) Python process, measured as run() measures a command; `fn` must be a
    module-level function and its result picklable. Returns (its result, the measurements)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    load_before = load_average()
    start = time.perf_counter()
    child = ctx.Process(target=_call_in_group, args=(fn, args, queue))
    child.start()
    peak_group = 0.0
    while child.is_alive() and queue.empty():
        peak_group = max(peak_group, group_rss_mb(child.pid))
        time.sleep(sample_s)
    result, peak_own_kib = queue.get() if child.exitcode in (None, 0) else (None, 0)
    child.join()
    wall = time.perf_counter() - start
    if child.exitcode != 0:
        sys.exit(f"{fn.__name__} failed in its child process ({child.exitcode})")
    measured = Run([fn.__name__], child.exitcode, "", "", round(wall, 2), round(peak_own_kib / 1024, 1),
                   round(peak_group, 1), load_before, load_average())
    return result, measured
