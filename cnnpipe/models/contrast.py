"""Per-image contrast normalization in front of fastnet: `fastnet-cn` (whole image) and `fastnet-lcn` (local).

GTSRB's frames run from near-black to over-exposed; the classic GTSRB nets normalized each image's contrast
before the first layer (Sermanet & LeCun, 2011: local contrast normalization; Ciresan et al., 2012: several
contrast normalizations, one per column). Here it is the model's first layer, so training, evaluation, the
served model and its ONNX export all see the same thing. It runs after the dataset's mean/std standardization.
"""

import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.models import fastnet

MIN_SIZE = 1
MIN_STD = 0.1  # in dataset-standardized units: a near-blank image's noise is amplified at most 10x
LCN_SIZE = 7  # the local window (pixels at 32x32: about a quarter of a sign's diameter)
LCN_SIGMA = 2.0
UPSAMPLE = 1.5  # fastnet-lcn-up: every feature map 1.5 times finer (docs/budget.md: it did not pay in 600 s)


class ImageContrastNorm(nn.Module):
    """Each image minus its mean, over its standard deviation (all channels together: colour is kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=(1, 2, 3), keepdim=True, correction=0)
        return ((x32 - mean) / var.sqrt().clamp(min=MIN_STD)).to(x.dtype)


class LocalContrastNorm(nn.Module):
    """Subtractive then divisive normalization over a Gaussian window across channels (Jarrett et al., 2009):
    each pixel minus its neighbourhood's mean, over the neighbourhood's deviation, never below the image's mean
    deviation (flat regions are not blown up)."""

    def __init__(self, channels: int, size: int = LCN_SIZE, sigma: float = LCN_SIGMA):
        super().__init__()
        r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma * sigma))
        self.register_buffer("window", (g / (g.sum() * channels)).expand(1, channels, size, size).clone(),
                             persistent=False)
        self.pad = size // 2

    def local_mean(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [self.pad] * 4, mode="replicate"), self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        centred = x32 - self.local_mean(x32)
        std = self.local_mean(centred.square()).sqrt()
        floor = std.mean(dim=(2, 3), keepdim=True).clamp(min=MIN_STD)
        return (centred / torch.maximum(std, floor)).to(x.dtype)


def build_cn(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    return nn.Sequential(ImageContrastNorm(), fastnet.build(in_channels, num_classes, image_size, width))


def build_lcn(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    return nn.Sequential(LocalContrastNorm(in_channels), fastnet.build(in_channels, num_classes, image_size, width))


def build_lcn_up(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    """fastnet-lcn reading its input upsampled (bilinear) by UPSAMPLE: finer maps of the same pixels."""
    return nn.Sequential(LocalContrastNorm(in_channels), nn.Upsample(scale_factor=UPSAMPLE, mode="bilinear"),
                         fastnet.build(in_channels, num_classes, image_size, width))
