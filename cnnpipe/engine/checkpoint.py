"""The model file that train writes and evaluate / register / serving read.

Only tensors, numbers, strings, lists and dicts go in, so `torch.load(weights_only=True)` reads it:
loading a model file never runs code from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file
from cnnpipe.models import build_model

FORMAT = "cnnpipe.model/1"


@dataclass
class ModelSpec:
    arch: str
    width: int
    in_channels: int
    num_classes: int
    image_size: int
    classes: list[str]
    mean: list[float]  # per channel, 0..1 scale: the training split's statistics
    std: list[float]

    def build(self) -> nn.Module:
        return build_model(self.arch, self.in_channels, self.num_classes, self.image_size, self.width)


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
