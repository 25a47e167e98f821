"""Which torch device to run on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from cnnpipe.errors import CnnpipeError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnpipeError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnpipeError(f"device: {name!r} asked for, but torch sees no CUDA device")
    return device


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX (elsewhere torch emulates it, slower than fp32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, precision: str) -> tuple[Callable[[], contextlib.AbstractContextManager], str]:
    """The training step's autocast factory for `precision`, and the precision it gives: auto is bf16 on CUDA
    (tensor cores) and fp32 on CPU (runs repeat exactly); bf16 is bf16 where the hardware has it, fp32
    elsewhere (a recipe stays portable)."""
    bf16 = (precision == "bf16" and native_bf16(device)) or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext, "fp32"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16"


def available_cores() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (containers,
    CI runners), which os.cpu_count() ignores; torch's default of one thread per visible core oversubscribes
    a throttled machine (a 20x slowdown was seen on 2 busy cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, v1 cfs quota/period); None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def set_threads(requested: int, processes: int = 1) -> int:
    """Set torch's intra-op threads: `requested`, or (0) this process's share of the available cores."""
    threads = requested or max(1, available_cores() // processes)
    torch.set_num_threads(threads)
    return threads
