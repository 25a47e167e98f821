"""Three conv blocks (width, 2x, 4x channels) + dense 512 + dropout 0.5: the CIFAR-10 study's CNN.

Width 16/32/64/128 gives the study's shallow / baseline / deep / very deep variants.
"""

from torch import nn

MIN_SIZE = 8  # three 2x2 max-pools


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def build(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    side = image_size // 8
    return nn.Sequential(
        _block(in_channels, width), _block(width, 2 * width), _block(2 * width, 4 * width),
        nn.Flatten(),
        nn.Linear(4 * width * side * side, 512), nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )
