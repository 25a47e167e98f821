"""Model registry: every architecture is built from (in_channels, num_classes, image_size, width).

cnnpipe's own small-image networks are listed in MODELS; any other name is a library backbone
(cnnpipe/models/backbones.py: torchvision by name, timm as `timm/<name>`), for which `width` is unused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import backbones, cnn3, cnn5, contrast, fastnet, lenet5, mlp, resnet, stn

# name -> (builder, smallest image side it takes)
MODELS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "fastnet": (fastnet.build, fastnet.MIN_SIZE),
    "fastnet-stn": (stn.build, stn.MIN_SIZE),  # fastnet behind a spatial transformer (whole frames)
    "fastnet-cn": (contrast.build_cn, contrast.MIN_SIZE),  # each image's contrast normalized first
    "fastnet-lcn": (contrast.build_lcn, contrast.MIN_SIZE),  # ... locally (a Gaussian window)
    "fastnet-lcn-up": (contrast.build_lcn_up, contrast.MIN_SIZE),  # ... its input upsampled 1.5x (docs/budget.md)
    "mlp": (mlp.build, 1),
    "lenet5": (lenet5.build, lenet5.MIN_SIZE),
    "cnn3": (cnn3.build, cnn3.MIN_SIZE),
    "cnn5": (cnn5.build, cnn5.MIN_SIZE),
    "resnet9": (resnet.build_resnet9, resnet.MIN_SIZE),
    "resnet18": (resnet.build_resnet18, resnet.MIN_SIZE),  # CIFAR-style stem; torchvision's is torchvision/resnet18
}


def is_library_arch(arch: str) -> bool:
    return arch not in MODELS and backbones.resolve(arch) is not None


def build_model(arch: str, in_channels: int, num_classes: int, image_size: int, width: int) -> nn.Module:
    if arch not in MODELS:
        if backbones.resolve(arch) is None:
            raise CnnpipeError(f"train.arch: unknown architecture {arch!r} (expected one of: {', '.join(MODELS)}, "
                               f"a torchvision classifier such as torchvision/resnet50, or timm/<name>)")
        return backbones.build(arch, in_channels, num_classes)
    builder, min_size = MODELS[arch]
    if image_size < min_size:
        raise CnnpipeError(f"train.arch: {arch} needs images of at least {min_size}x{min_size}, "
                           f"the dataset has {image_size}x{image_size}")
    return builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)


@torch.no_grad()
def check_input_size(model: nn.Module, arch: str, in_channels: int, image_size: int) -> None:
    """One forward pass on a blank image: a library network whose pooling shrinks a small image to nothing
    fails here with one line instead of mid-epoch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    except (RuntimeError, ValueError) as e:
        raise CnnpipeError(f"train.arch: {arch} cannot take {image_size}x{image_size} images "
                           f"({str(e).splitlines()[0]}); raise ingest.image_size") from None
    finally:
        model.train(was_training)


def head(model: nn.Module) -> nn.Linear:
    """The classifier: the last Linear layer, replaced when a network is fine-tuned on other classes."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
