import pytest
import torch

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import MODELS, build_model, count_parameters


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


def test_bad_arch_and_size_are_clear():
    with pytest.raises(CnnpipeError, match="unknown architecture 'vgg99'"):
        build_model("vgg99", 3, 10, 32, 8)
    with pytest.raises(CnnpipeError, match="cnn3 needs images of at least 8x8"):
        build_model("cnn3", 1, 10, 4, 8)
