"""Weight initializations a config can ask for on top of a net's own (train.conv_init)."""

from collections.abc import Callable

import torch
from torch import nn

from cnnpipe.models.fastnet import FastNet


@torch.no_grad()
def dirac_convs(model: nn.Module) -> int:
    """airbench's identity initialization, in every fastnet inside `model`: each convolution after fastnet's stem
    gets its first in_channels filters as identities (filter i passes input channel i through at the kernel's
    centre) and keeps its other, random ones, so a fresh net starts close to carrying its stem's features through.
    The stem, which sees pixels, and the layers of whatever wraps fastnet (a spatial transformer's) stay as built.
    Returns the layers changed: 0 when `model` holds no fastnet."""
    changed = 0
    for net in (m for m in model.modules() if isinstance(m, FastNet)):
        for conv in [m for m in net.modules() if isinstance(m, nn.Conv2d)][1:]:  # fastnet's widths never shrink
            nn.init.dirac_(conv.weight[:conv.in_channels])
            changed += 1
    return changed


# train.conv_init -> the function, which returns the layers it changed ("default": the net as built)
CONV_INITS: dict[str, Callable[[nn.Module], int]] = {"dirac": dirac_convs}
