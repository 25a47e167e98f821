"""LeNet-5 (LeCun et al. 1998): conv 6 @5x5 -> pool -> conv 16 @5x5 -> pool -> 120 -> 84 -> classes.

The features are pooled to LeNet's 5x5 map before the dense layers, so images smaller than 32x32
(8x8 digits) fit the same net; at 32x32 it is the classic layout. `width` scales the conv channels
(6 = the original).
"""

from torch import nn

MIN_SIZE = 1


def build(in_channels: int, num_classes: int, image_size: int, width: int = 6) -> nn.Module:
    pad = 0 if image_size >= 32 else 2  # the classic valid convolutions need 32x32 input
    c1, c2 = width, round(width * 16 / 6)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=pad), nn.Tanh(), nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(c1, c2, 5, padding=pad), nn.Tanh(), nn.AvgPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(c2 * 25, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes),
    )
