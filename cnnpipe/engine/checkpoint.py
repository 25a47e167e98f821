"""The model file that train writes and evaluate / register / serving read.

Only tensors, numbers, strings, lists and dicts go in, so `torch.load(weights_only=True)` reads it:
loading a model file never runs code from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from cnnpipe.config import TrainConfig
from cnnpipe.engine.spec import ModelSpec
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file

FORMAT = "cnnpipe.model/1"


def save_model(path: Path | str, model: nn.Module, spec: ModelSpec) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, "spec": asdict(spec), "state_dict": state}, tmp)


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelSpec]:
    path = Path(path)
    if not path.is_file():
        raise CnnpipeError(f"model file '{path}' not found (expected the output of `cnnpipe train`)")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise CnnpipeError(f"model file '{path}' is not a readable cnnpipe model: {str(e).splitlines()[0]}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CnnpipeError(f"model file '{path}': expected format {FORMAT}")
    spec = ModelSpec(**blob["spec"])
    model = spec.build().to(device)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CnnpipeError(f"model file '{path}': weights do not fit {spec.arch}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, spec


CHECKPOINT_FORMAT = "cnnpipe.checkpoint/1"
# train params that may differ between a run and its resumption: they change no result
RESUMABLE_CHANGES = ("device", "compile")


def save_checkpoint(path: Path | str, state: dict) -> None:
    """The whole training state after an epoch; written atomically, so a kill never leaves half a file."""
    with atomic_file(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def load_checkpoint(path: Path | str, config: dict) -> dict:
    """A checkpoint to resume from; it must have been written by a run of the same `config`."""
    path = Path(path)
    if not path.is_file():
        raise CnnpipeError(f"no checkpoint at '{path}' to resume from (run without --resume to start afresh)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise CnnpipeError(f"checkpoint '{path}' is corrupt or not a checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CnnpipeError(f"checkpoint '{path}': expected format {CHECKPOINT_FORMAT}")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a knob newer than the checkpoint
    for key, value in config.items():
        if key not in RESUMABLE_CHANGES and state["config"].get(key, defaults.get(key)) != value:
            raise CnnpipeError(f"checkpoint '{path}' was written with train.{key}={state['config'].get(key)!r}, "
                               f"this run has {value!r}: resume with the same params or start afresh")
    return state
