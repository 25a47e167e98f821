"""A spatial transformer (Jaderberg et al., 2015) in front of fastnet: `fastnet-stn`.

A small localization net looks at the whole image and predicts one affine map per image; the image is
resampled through it before fastnet sees it, so the net can learn to zoom in on (and straighten) the
object in a whole frame. The best published GTSRB results use such layers (Arcos-Garcia et al., 2018:
99.71 %). The map starts as the identity (last layer zero, bias = identity), so training starts from
plain fastnet; the correction is scaled down (airbench's trick for the head) so the peak learning rate
that suits fastnet does not throw the map around.
"""

import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.models import fastnet

MIN_SIZE = 1
LOC_WIDTH = 16  # the localization net's first conv: ~10 % of fastnet width 48's multiply-adds at 32x32
THETA_SCALE = 0.1  # the localization head's output, scaled: small, smooth corrections of the identity


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels: int, width: int = LOC_WIDTH):
        super().__init__()
        self.loc = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2, bias=False), nn.MaxPool2d(2, ceil_mode=True),
            nn.BatchNorm2d(width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 5, padding=2, bias=False), nn.MaxPool2d(2, ceil_mode=True),
            nn.BatchNorm2d(2 * width), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, 64), nn.GELU(), nn.Linear(64, 6),
        )
        nn.init.zeros_(self.loc[-1].weight)
        nn.init.zeros_(self.loc[-1].bias)
        self.register_buffer("identity", torch.tensor([1.0, 0, 0, 0, 1, 0]), persistent=False)

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """N x 2 x 3 affine maps (output -> input, normalized coordinates), in fp32 whatever the autocast."""
        return (self.identity + THETA_SCALE * self.loc(x).float()).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.theta(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # border padding: a zoom-out repeats the frame's edge rather than adding black margins
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


def build(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    return nn.Sequential(SpatialTransformer(in_channels), fastnet.build(in_channels, num_classes, image_size, width))
