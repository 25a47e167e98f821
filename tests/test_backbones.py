"""Library backbones, pretrained weights and fine-tuning knobs, on tiny generated data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cnnpipe.config import TrainConfig
from cnnpipe.engine.inference import stats_tensors, to_nchw_uint8
from cnnpipe.engine.loop import TrainData, fit
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import build_model, check_input_size, head, is_library_arch
from cnnpipe.engine.pretrained import Pretrained, adapt_stats, fit_weights, load_pretrained
from tests.helpers import cnnpipe, make_images, write_tiny_dataset

torch.set_num_threads(1)


@pytest.mark.parametrize("arch, channels", [("torchvision/resnet18", 1), ("resnet50", 3), ("mobilenet_v3_small", 1),
                                            ("mobilenet_v3_large", 3), ("efficientnet_b0", 1), ("convnext_tiny", 3),
                                            ("vgg11_bn", 1), ("alexnet", 3), ("googlenet", 1), ("timm/resnet18", 1)])
@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_library_arch_takes_the_datasets_channels_and_classes(arch, channels):
    model = build_model(arch, channels, 7, 64, 16).eval()
    assert is_library_arch(arch) and head(model).out_features == 7
    with torch.no_grad():
        assert model(torch.zeros(2, channels, 64, 64)).shape == (2, 7)


def test_own_resnet18_stays_cnnpipes_and_unknown_names_are_one_line():
    assert not is_library_arch("resnet18")  # cnnpipe's CIFAR-style net; torchvision's is torchvision/resnet18
    with pytest.raises(CnnpipeError, match="unknown architecture 'resnet1234'"):
        build_model("resnet1234", 3, 2, 32, 16)
    with pytest.raises(CnnpipeError, match="torchvision has no classification model 'nope'"):
        build_model("torchvision/nope", 3, 2, 32, 16)


@pytest.mark.parametrize("arch, size", [("alexnet", 32), ("vgg11_bn", 16), ("convnext_tiny", 16)])
def test_too_small_images_are_a_clear_error(arch, size):
    model = build_model(arch, 3, 2, size, 16)
    with pytest.raises(CnnpipeError, match=f"{arch} cannot take {size}x{size} images"):
        check_input_size(model, arch, 3, size)


def test_weights_fit_with_a_new_head_and_a_grayscale_stem():
    torch.manual_seed(0)
    source = build_model("torchvision/resnet18", 3, 1000, 32, 16)
    state = source.state_dict()
    model = build_model("torchvision/resnet18", 1, 3, 32, 16)
    fresh_head = head(model).weight.detach().clone()
    loaded = fit_weights(model, Pretrained("src", state, None, None), ["a", "b", "c"])
    assert loaded == {"tensors_loaded": len(state) - 2, "head_loaded": False}
    assert torch.equal(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert torch.equal(head(model).weight, fresh_head)


def test_a_registered_models_head_is_kept_only_for_the_same_classes():
    source = build_model("cnn3", 1, 3, 16, 8)
    state = {k: v + 1 for k, v in source.state_dict().items()}
    for classes, kept in ((["a", "b", "c"], True), (["x", "y", "z"], False)):
        model = build_model("cnn3", 1, 3, 16, 8)
        assert fit_weights(model, Pretrained("src", state, [0.5], [0.2], ["a", "b", "c"]), classes)["head_loaded"] is kept


def test_mismatched_weights_name_the_tensor():
    state = build_model("resnet50", 3, 10, 32, 16).state_dict()
    with pytest.raises(CnnpipeError, match=r"train.pretrained 'r50.pt': the weights do not fit this network: \d+ of"):
        fit_weights(build_model("torchvision/resnet18", 3, 10, 32, 16), Pretrained("r50.pt", state, None, None), ["a"])


def test_weights_files_pt_safetensors_and_cnnpipe_models(tmp_path):
    from safetensors.torch import save_file

    state = build_model("mobilenet_v3_small", 3, 1000, 32, 16).state_dict()
    torch.save(state, tmp_path / "w.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        pre = load_pretrained(str(tmp_path / name), "mobilenet_v3_small", None)
        assert pre.state.keys() == state.keys() and pre.mean == [0.485, 0.456, 0.406]
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(CnnpipeError, match="weights file '.*junk.pt' is not readable"):
        load_pretrained(str(tmp_path / "junk.pt"), "mobilenet_v3_small", None)
    with pytest.raises(CnnpipeError, match="weights file 'missing.pt' not found"):
        load_pretrained("missing.pt", "mobilenet_v3_small", None)
    with pytest.raises(CnnpipeError, match="cnn3 is cnnpipe's own network, with no ImageNet weights"):
        load_pretrained("imagenet", "cnn3", None)


def test_stats_follow_the_channels():
    assert adapt_stats([0.3, 0.6, 0.9], 1) == pytest.approx([0.6])
    assert adapt_stats([0.5], 3) == [0.5, 0.5, 0.5]


def _tiny_data(size: int = 16) -> TrainData:
    images, labels = make_images(8, 2, size, 3)
    x = to_nchw_uint8(images, torch.device("cpu"))
    y = torch.from_numpy(labels)
    mean, std = stats_tensors([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    return TrainData(x, y, x, y, mean, std)


def test_frozen_epochs_train_only_the_head_and_keep_batchnorm_statistics():
    cfg = replace(TrainConfig(), arch="torchvision/resnet18", epochs=1, batch_size=8, augment=False, freeze_epochs=1,
                  channels_last=False)
    model = build_model(cfg.arch, 3, 2, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, _tiny_data(), cfg, None)
    after = model.state_dict()
    head_keys = {"fc.weight", "fc.bias"}
    assert all(not torch.equal(before[k], after[k]) for k in head_keys)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head_keys)  # running stats too


def test_backbone_lr_multiplier_scales_every_layer_but_the_head():
    from cnnpipe.engine.loop import make_optimizer

    cfg = replace(TrainConfig(), lr=0.1, backbone_lr=0.1)
    model = build_model("mobilenet_v3_small", 3, 2, 32, 16)
    opt = make_optimizer(model, cfg)
    head_ids = {id(p) for p in head(model).parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(0.1 if id(p) in head_ids else 0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def _workdir(tmp_path: Path, size: int = 16, channels: int = 3) -> Path:
    import yaml

    from tests.helpers import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params["train"] |= {"epochs": 1, "batch_size": 16}
    params["evaluate"]["tsne_samples"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_tiny_dataset(tmp_path / "data/processed", classes=3, size=size, channels=channels, n=12)
    assert cnnpipe("augment", cwd=tmp_path).returncode == 0
    return tmp_path


@pytest.mark.e2e  # the real CLI / git + DVC in subprocesses
def test_cli_pretrained_file_errors_are_one_line_and_leave_no_model(tmp_path):
    ws = _workdir(tmp_path)
    torch.save(build_model("resnet50", 3, 10, 32, 16).state_dict(), ws / "r50.pt")
    for weights, message in (("r50.pt", "train.pretrained 'r50.pt': the weights do not fit this network"),
                             ("nope.pt", "train.pretrained: weights file 'nope.pt' not found")):
        proc = cnnpipe("train", "--arch", "torchvision/resnet18", "--pretrained", weights, "--no-tracking", cwd=ws)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"cnnpipe train: error: {message}"), proc.stderr
        assert not (ws / "data/model").exists()


@pytest.mark.e2e  # the real CLI / git + DVC in subprocesses
def test_cli_fine_tunes_a_file_and_records_it(tmp_path):
    ws = _workdir(tmp_path, channels=1)
    torch.save(build_model("torchvision/resnet18", 3, 1000, 16, 16).state_dict(), ws / "rgb.pt")
    proc = cnnpipe("train", "--arch", "torchvision/resnet18", "--pretrained", "rgb.pt", "--freeze-epochs", "1",
                   "--backbone-lr", "0.1", "--no-tracking", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and json.loads(proc.stdout)["epochs"] == 1
    blob = torch.load(ws / "data/model/model.pt", weights_only=True)
    assert blob["spec"]["mean"] == pytest.approx([sum([0.485, 0.456, 0.406]) / 3])  # the weights' statistics, gray
    assert json.loads((ws / "data/model/train_config.json").read_text())["lineage"] == {"cnnpipe.pretrained": "rgb.pt"}


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
@pytest.mark.parametrize("arch", ["torchvision/resnet18", "mobilenet_v3_small", "googlenet"])
def test_sagemaker_export_of_a_library_net_answers_as_the_predictor(arch, tmp_path):
    import io

    from PIL import Image

    from cnnpipe.engine.checkpoint import ModelSpec, save_model
    from cnnpipe.engine.predictor import Predictor
    from cnnpipe.serving.sagemaker import export, extract, load_inference

    spec = ModelSpec(arch, 16, 3, 3, 32, ["a", "b", "c"], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "letterbox")
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_model(arch, 3, 3, 32, 16), spec)
    predictor = Predictor.from_file(tmp_path / "model.pt")
    export(predictor, 2, tmp_path / "model.tar.gz")
    inference = load_inference(extract(tmp_path / "model.tar.gz", tmp_path / "sm"))
    model = inference.model_fn(str(tmp_path / "sm"))
    buf = io.BytesIO()
    Image.fromarray(make_images(1, 1, 48, 3)[0][0]).resize((70, 40)).save(buf, format="JPEG")
    answer = inference.predict_fn(inference.input_fn(buf.getvalue(), "image/jpeg"), model)[0]
    ours = predictor.predict(predictor.preprocess([buf.getvalue()]), top_k=2)[0]
    assert answer["predicted_class"] == ours["predicted_class"]
    assert answer["confidence"] == pytest.approx(ours["confidence"], abs=1e-4)


def test_imagenet_weights_that_cannot_be_read_are_one_line(tmp_path, monkeypatch):
    """The download itself needs the network (not here); a corrupt file in torch's cache takes the same path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub/checkpoints/resnet18-f37072fd.pth"  # where torchvision keeps ResNet18_Weights.DEFAULT
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with pytest.raises(CnnpipeError, match="train.pretrained imagenet: the weights of torchvision/resnet18 cannot be "
                                           "fetched: ") as e:
        load_pretrained("imagenet", "torchvision/resnet18", None)
    assert "\n" not in str(e.value)
