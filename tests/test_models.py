import copy

import numpy as np
import pytest
import torch
from torch import nn

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import MODELS, build_model, count_parameters
from cnnpipe.models.init import dirac_convs


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_every_model_trains_a_step(arch, channels, size):
    model = build_model(arch, channels, 10, size, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, channels, size, size), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert model(x).shape == (4, 10) and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cnn3_width_scales_parameters():
    counts = [count_parameters(build_model("cnn3", 3, 10, 32, w)) for w in (16, 32, 64)]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dirac_init_passes_each_fastnet_convs_input_through_its_first_filters(arch):
    """train.conv_init dirac: in fastnet, each of the 6 convolutions after the stem maps input channel i to output
    channel i unchanged; the stem (the only conv taking the image's 3 channels), the other filters and every other
    layer, a spatial transformer's included, keep their random init. Archs without fastnet are left whole (0)."""
    torch.manual_seed(0)
    net = build_model(arch, 3, 10, 32, 16)
    before = copy.deepcopy(net)
    changed = dirac_convs(net)
    old = dict(before.named_modules())
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    moved = {name for name, conv in convs.items() if not torch.equal(conv.weight, old[name].weight)}
    assert changed == len(moved) == (6 if arch.startswith("fastnet") else 0)
    for name in moved:
        conv = convs[name]
        cin = conv.in_channels
        assert cin > 3 and not name.startswith("0.loc")  # not the stem, not the spatial transformer's
        x = torch.randn(2, cin, 5, 5)
        with torch.no_grad():
            assert torch.allclose(conv(x)[:, :cin], x, atol=1e-6)
        assert torch.equal(conv.weight[cin:], old[name].weight[cin:])
    weights = {id(convs[name].weight) for name in moved}
    assert all(torch.equal(p, dict(before.named_parameters())[n]) for n, p in net.named_parameters()
               if id(p) not in weights)


def test_bad_arch_and_size_are_clear():
    with pytest.raises(CnnpipeError, match="unknown architecture 'vgg99'"):
        build_model("vgg99", 3, 10, 32, 8)
    with pytest.raises(CnnpipeError, match="cnn3 needs images of at least 8x8"):
        build_model("cnn3", 1, 10, 4, 8)


def test_spatial_transformer_starts_as_the_identity_and_learns_a_map():
    model = build_model("fastnet-stn", 3, 10, 16, width=8)
    transformer = model[0]
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(transformer(x), x, atol=1e-6)  # identity map: every pixel sampled at its centre
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    moved = transformer.theta(x)
    assert not torch.allclose(moved, transformer.identity.view(1, 2, 3).expand_as(moved))
    assert not torch.allclose(transformer(x), x, atol=1e-3)


def assert_onnx_matches_torch(model: torch.nn.Module, x: torch.Tensor, path) -> None:
    """`model` exported with a dynamic batch, run by onnxruntime on `x`: the same logits as torch."""
    import contextlib
    import io

    import onnxruntime as ort

    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (x,), input_names=["x"], dynamo=True,
                                    dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    program.save(str(path))
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


def test_spatial_transformer_exports_to_onnx(tmp_path):
    model = build_model("fastnet-stn", 3, 10, 16, width=8).eval()
    torch.nn.init.normal_(model[0].loc[-1].weight, std=0.5)  # a real (non-identity) map through GridSample
    assert_onnx_matches_torch(model, torch.rand(3, 3, 16, 16), tmp_path / "stn.onnx")


def test_grad_cam_maps_behind_a_spatial_transformer_lie_over_the_input():
    """A transformer that shifts the view by a quarter of the image: a heat map hot on one column of what the
    net saw is hot on the column a quarter further right in the image sent."""
    from cnnpipe.evaluation.explain import to_input_frame
    from cnnpipe.models import stn

    model = build_model("fastnet-stn", 3, 10, 16, width=8).eval()
    with torch.no_grad():
        model[0].loc[-1].bias[2] = 0.5 / stn.THETA_SCALE  # theta's x offset 0.5 (normalized): 4 pixels of 16
    seen = np.zeros((1, 16, 16), np.float32)
    seen[0, :, 4] = 1.0
    back = to_input_frame(model, torch.rand(1, 3, 16, 16), seen)
    assert back.shape == seen.shape and back[0].sum(0).argmax() == 8
    plain = build_model("fastnet", 3, 10, 16, width=8)
    assert to_input_frame(plain, torch.rand(1, 3, 16, 16), seen) is seen


@pytest.mark.parametrize("arch", ["fastnet-cn", "fastnet-lcn"])
def test_contrast_normalization_ignores_exposure_and_keeps_blank_images_finite(arch):
    model = build_model(arch, 3, 10, 16, width=8).eval()
    norm = model[0]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    # an image darker (or over-exposed) by an affine map of its intensities normalizes to the same input
    assert torch.allclose(norm(0.3 * x - 0.7), norm(x), atol=1e-4)
    assert torch.allclose(norm(2.5 * x + 1.0), norm(x), atol=1e-4)
    blank = norm(torch.full((1, 3, 16, 16), 0.4))
    assert torch.isfinite(blank).all() and blank.abs().max() < 1e-4
    red, blue = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    # normalized over channels together: a flat red and a flat blue sign stay apart (per-channel: both blank)
    assert (norm(red) - norm(blue))[:, [0, 2]].abs().min() > 0.5


@pytest.mark.parametrize("arch", ["fastnet-cn", "fastnet-lcn", "fastnet-lcn-up"])
def test_contrast_normalization_exports_to_onnx(arch, tmp_path):
    model = build_model(arch, 3, 10, 16, width=8).eval()
    x = torch.rand(3, 3, 16, 16) * torch.tensor([0.2, 1.0, 3.0]).view(3, 1, 1, 1)  # three exposures
    assert_onnx_matches_torch(model, x, tmp_path / "cn.onnx")
