"""What a model is, apart from its weights: architecture, classes and the preprocessing it was trained with.
Torch-free, so a server running the ONNX export reads it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass
class ModelSpec:
    arch: str
    width: int
    in_channels: int
    num_classes: int
    image_size: int
    classes: list[str]
    mean: list[float]  # per channel, 0..1 scale: the training split's statistics, or the pretrained weights' own
    std: list[float]
    resize: str = "squash"  # ingest.resize: how a photo becomes image_size x image_size, here and in serving

    def build(self) -> nn.Module:
        from cnnpipe.models import build_model  # torch: only where a network is built

        return build_model(self.arch, self.in_channels, self.num_classes, self.image_size, self.width)
