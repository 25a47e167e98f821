"""Model registry: every architecture is built from (in_channels, num_classes, image_size, width)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import cnn3, cnn5, fastnet, lenet5, mlp, resnet

# name -> (builder, smallest image side it takes)
MODELS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "fastnet": (fastnet.build, fastnet.MIN_SIZE),
    "mlp": (mlp.build, 1),
    "lenet5": (lenet5.build, lenet5.MIN_SIZE),
    "cnn3": (cnn3.build, cnn3.MIN_SIZE),
    "cnn5": (cnn5.build, cnn5.MIN_SIZE),
    "resnet9": (resnet.build_resnet9, resnet.MIN_SIZE),
    "resnet18": (resnet.build_resnet18, resnet.MIN_SIZE),
}


def build_model(arch: str, in_channels: int, num_classes: int, image_size: int, width: int) -> nn.Module:
    if arch not in MODELS:
        raise CnnpipeError(f"train.arch: unknown architecture {arch!r} (expected one of: {', '.join(MODELS)})")
    builder, min_size = MODELS[arch]
    if image_size < min_size:
        raise CnnpipeError(f"train.arch: {arch} needs images of at least {min_size}x{min_size}, "
                           f"the dataset has {image_size}x{image_size}")
    return builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
