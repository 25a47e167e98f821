"""The dense baseline of the CIFAR-10 study: flatten, 128 -> 64 hidden units (width = first layer)."""

from torch import nn


def build(in_channels: int, num_classes: int, image_size: int, width: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, width), nn.ReLU(inplace=True),
        nn.Linear(width, width // 2), nn.ReLU(inplace=True),
        nn.Linear(width // 2, num_classes),
    )
