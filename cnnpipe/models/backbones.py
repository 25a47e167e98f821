"""Library backbones: torchvision classification models and timm models, by name.

`torchvision/<name>` (or a bare torchvision name cnnpipe's own registry does not use, e.g. resnet50)
and `timm/<name>` build the library's network with a fresh head for the dataset's classes and a stem
that takes the dataset's channels. Their ImageNet weights: cnnpipe/models/imagenet.py.
"""

from __future__ import annotations

from torch import nn

from cnnpipe.errors import CnnpipeError

TORCHVISION, TIMM = "torchvision/", "timm/"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # every torchvision classifier's weights
# builder kwargs: networks with auxiliary heads return a tuple in train mode, which no loss takes
TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_names() -> list[str]:
    import torchvision.models
    from torchvision.models import list_models

    return list_models(module=torchvision.models)  # the classifiers, not detection or segmentation


def resolve(arch: str) -> tuple[str, str] | None:
    """(library, model name) of a library arch, None for a name that is not one."""
    if arch.startswith(TIMM):
        return "timm", arch[len(TIMM):]
    name = arch[len(TORCHVISION):] if arch.startswith(TORCHVISION) else arch
    if name in torchvision_names():
        return "torchvision", name
    if arch.startswith(TORCHVISION):
        raise CnnpipeError(f"train.arch: torchvision has no classification model {name!r}")
    return None


def _set_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the stem convolution `in_channels` inputs (a grayscale dataset on an RGB network)."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def build(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    library, name = resolve(arch)
    if library == "timm":
        import timm

        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise CnnpipeError(f"train.arch {arch!r}: {e}") from None
    from torchvision.models import get_model

    model = get_model(name, weights=None, num_classes=num_classes, **TORCHVISION_KWARGS.get(name, {}))
    _set_first_conv(model, in_channels)
    return model
