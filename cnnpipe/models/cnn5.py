"""Five conv-BN-ReLU-maxpool blocks (32 -> 512 channels at width 32) + dense 512 + dropout 0.6.

The 64x64 traffic-sign net; max-pools use ceil_mode so small images (8x8) still pass.
"""

from torch import nn

MIN_SIZE = 1


def build(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    del image_size  # global pooling before the head
    chans = [in_channels] + [width * 2**i for i in range(5)]
    blocks = [nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                            nn.MaxPool2d(2, ceil_mode=True)) for a, b in zip(chans, chans[1:])]
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(chans[-1], 512), nn.ReLU(inplace=True), nn.Dropout(0.6), nn.Linear(512, num_classes),
    )
