"""Starting weights for `train.pretrained`: the library's ImageNet weights, a local file, or a registered model.

Whatever the source, its tensors are fitted into the freshly built network by name: the classifier head
is left fresh when its shape (or, for a registered model, its class list) differs, the stem convolution
is adapted when the channels differ (summed for grayscale, spread for RGB from gray), and anything else
that is missing or of another shape is an error naming the source.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnpipe.config import TrackingConfig
from cnnpipe.engine.checkpoint import FORMAT as MODEL_FORMAT
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import backbones, head, is_library_arch


@dataclass
class Pretrained:
    source: str  # as the user wrote it
    state: dict[str, torch.Tensor]
    mean: list[float] | None  # the statistics the weights were trained with (None: unknown, use the data's)
    std: list[float] | None
    classes: list[str] | None = None  # a cnnpipe model's classes: its head is kept only for the same classes
    lineage: dict[str, str] = field(default_factory=dict)  # tags for the run and the registered version


def _tensors(blob: object, where: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: bare, or under "state_dict" / "model" (common checkpoint layouts)."""
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CnnpipeError(f"{where}: expected a state dict (tensors by name), a safetensors file or a cnnpipe model file")
    return {k.removeprefix("module."): v for k, v in blob.items()}  # DistributedDataParallel's prefix


def _from_file(path: Path, arch: str, where: str) -> Pretrained:
    if not path.is_file():
        raise CnnpipeError(f"{where}: weights file '{path}' not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            blob = load_file(path)
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise several types for a truncated or foreign file
        raise CnnpipeError(f"{where}: weights file '{path}' is not readable: {str(e).splitlines()[0]}") from None
    if isinstance(blob, dict) and blob.get("format") == MODEL_FORMAT:  # a model cnnpipe trained
        spec = blob["spec"]
        if spec["arch"] != arch:
            raise CnnpipeError(f"{where}: '{path}' holds a {spec['arch']} model, train.arch is {arch}")
        return Pretrained(str(path), _tensors(blob["state_dict"], where), spec["mean"], spec["std"], spec["classes"])
    mean, std = (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD) if is_library_arch(arch) else (None, None)
    return Pretrained(str(path), _tensors(blob, f"{where} '{path}'"), mean, std)


def _from_registry(uri: str, arch: str, tracking: TrackingConfig | None) -> Pretrained:
    """`models:/<name>@<alias>` or `models:/<name>/<version>`: the model file inside the registered pyfunc."""
    if tracking is None:
        raise CnnpipeError(f"train.pretrained {uri}: a registered model needs the tracking store (drop --no-tracking)")
    ref = uri[len("models:/"):]
    name, sep, alias = ref.partition("@")
    if not sep:
        name, _, alias = ref.rpartition("/")
    if not name or not alias:
        raise CnnpipeError(f"train.pretrained {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    import mlflow

    from cnnpipe.tracking import Registry

    version = Registry(tracking.uri).version(name, alias)
    mlflow.set_registry_uri(tracking.uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                          dst_path=tmp, tracking_uri=tracking.uri))
        files = sorted(folder.glob("artifacts/*.pt"))
        if not files:
            raise CnnpipeError(f"train.pretrained {uri}: version {version.version} holds no cnnpipe model file")
        pre = _from_file(files[0], arch, f"train.pretrained {uri}")
    pre.source = uri
    pre.lineage = {"cnnpipe.parent.model": name, "cnnpipe.parent.version": str(version.version),
                   "cnnpipe.parent.run_id": version.run_id or "", "cnnpipe.pretrained": uri}
    return pre


def load_pretrained(source: str, arch: str, tracking: TrackingConfig | None) -> Pretrained:
    """The weights `train.pretrained` names."""
    if source == "imagenet":
        if not is_library_arch(arch):
            raise CnnpipeError(f"train.pretrained imagenet: {arch} is cnnpipe's own network, with no ImageNet "
                               f"weights (use a torchvision or timm arch, e.g. torchvision/{arch})")
        state, mean, std = backbones.imagenet_weights(arch)
        return Pretrained(source, state, mean, std, lineage={"cnnpipe.pretrained": "imagenet"})
    if source.startswith("models:/"):
        return _from_registry(source, arch, tracking)
    pre = _from_file(Path(source), arch, "train.pretrained")
    pre.lineage = {"cnnpipe.pretrained": Path(source).name}
    return pre


def fit_weights(model: nn.Module, pre: Pretrained, classes: list[str]) -> dict[str, int | bool]:
    """Load `pre` into `model` (see the module docstring); returns what was loaded and whether the head was."""
    target = model.state_dict()
    head_module = head(model)
    head_keys = {f"{n}.{p}" for n, m in model.named_modules() if m is head_module for p in ("weight", "bias")}
    stem = next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    keep_head = pre.classes is None or pre.classes == classes
    merged, problems = {}, []
    for key, want in target.items():
        have = pre.state.get(key)
        if key in head_keys and (not keep_head or have is None or have.shape != want.shape):
            continue  # a fresh classifier for these classes
        if have is None:
            if not key.endswith("num_batches_tracked"):
                problems.append(f"{key} missing")
            continue
        if key == stem:
            have = _adapt_stem(have, want.shape)
        if have.shape != want.shape:
            problems.append(f"{key} is {tuple(have.shape)}, the network needs {tuple(want.shape)}")
            continue
        merged[key] = have.to(want.dtype)
    if problems:
        raise CnnpipeError(f"train.pretrained '{pre.source}': the weights do not fit this network: "
                           f"{len(problems)} of {len(target)} tensors wrong ({problems[0]})")
    model.load_state_dict(merged, strict=False)
    return {"tensors_loaded": len(merged), "head_loaded": all(k in merged for k in head_keys)}


def _adapt_stem(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The first convolution's out x in x k x k weights for another number of input channels."""
    if weight.shape == shape or weight.shape[0] != shape[0] or weight.shape[2:] != shape[2:]:
        return weight
    if shape[1] == 1:  # gray x through summed RGB filters = the RGB network on (x, x, x)
        return weight.sum(1, keepdim=True)
    if weight.shape[1] == 1:
        return weight.expand(shape) / shape[1]
    return weight


def adapt_stats(values: list[float], channels: int) -> list[float]:
    """Per-channel statistics for `channels`: RGB averaged for gray, gray repeated for RGB."""
    if len(values) == channels:
        return list(values)
    return [sum(values) / len(values)] if channels == 1 else [values[0]] * channels
