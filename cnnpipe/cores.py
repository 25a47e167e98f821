"""How many CPUs this process may really use (torch-free: ingest's decoding processes need it too)."""

from __future__ import annotations

import os
from pathlib import Path


def available_cores() -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (containers,
    CI runners), which os.cpu_count() ignores; torch's default of one thread per visible core oversubscribes
    a throttled machine, which then runs many times slower."""
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
