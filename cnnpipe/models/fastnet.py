"""The fast default net for small images, in the spirit of airbench (KellerJordan/airbench).

A 3x3 stem, then three blocks of conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU at widths
(w, 2w, 4w), a global max-pool and a bias-free linear head whose logits are scaled down (airbench's
trick: it keeps early training from saturating the softmax).

Its training speed per width is measured in benchmarks/results/train_throughput.json.
"""

from torch import nn

MIN_SIZE = 1  # max-pools use ceil_mode, the head pools globally: any size works


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2, ceil_mode=True),
        nn.BatchNorm2d(cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
    )


class FastNet(nn.Sequential):
    """fastnet's layers: a class of its own so that an initialization (train.conv_init) finds them inside the archs
    that wrap fastnet (contrast normalization, a spatial transformer) and leaves the wrappers' layers alone."""


class Mul(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):  # noqa: ANN001, ANN201
        return x * self.scale


def build(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    del image_size  # global pooling: the net is size-agnostic
    w = (width, 2 * width, 4 * width)
    return FastNet(
        nn.Conv2d(in_channels, w[0] // 2, 3, padding=1, bias=False), nn.BatchNorm2d(w[0] // 2), nn.GELU(),
        _block(w[0] // 2, w[0]), _block(w[0], w[1]), _block(w[1], w[2]),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(w[2], num_classes, bias=False), Mul(1 / 9),
    )
