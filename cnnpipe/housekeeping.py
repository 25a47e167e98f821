"""`cnnpipe gc`: clear what a killed command left behind.

Runs still RUNNING whose process died on this machine are marked KILLED, model versions whose
`register` died before finishing with them are deleted, and a training checkpoint no live run
writes is reported (resume it with `cnnpipe train --resume`, or delete it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnpipe.config import TrackingConfig
from cnnpipe.tracking import reap


def checkpoint_state(path: Path) -> dict | None:
    """The epoch and run of a training checkpoint at `path` (None when there is none)."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        return {"path": str(path), "error": f"unreadable: {str(e).splitlines()[0]}"}
    state = state if isinstance(state, dict) else {}
    return {"path": str(path), "epoch": state.get("epoch"), "run_id": state.get("run_id")}


def run(*, tracking: TrackingConfig, checkpoint: Path) -> dict:
    found = reap(tracking.uri)
    state = checkpoint_state(checkpoint)
    stale = state if state is not None and state.get("run_id") not in found["live_runs"] else None
    for run_id in found["killed_runs"]:
        print(f"run {run_id}: its process died: marked KILLED", file=sys.stderr)
    for version in found["deleted_versions"]:
        print(f"model version {version}: its registration was killed: deleted", file=sys.stderr)
    for run_id in found["unjudged_runs"]:
        print(f"run {run_id}: RUNNING, started on another machine or by another tool: left alone", file=sys.stderr)
    if stale is not None:
        print(f"stale checkpoint '{checkpoint}' (epoch {stale.get('epoch')}, run {stale.get('run_id')}): "
              f"`cnnpipe train --resume` continues it; delete it to start afresh", file=sys.stderr)
    return {**found, "stale_checkpoint": stale}
