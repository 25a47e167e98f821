import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.search.sweep import STUDY, grid


def test_grid_is_the_cartesian_product():
    assert grid(["train.arch=mlp,cnn3", "epochs=2,4"]) == [
        {"arch": "mlp", "epochs": "2"}, {"arch": "mlp", "epochs": "4"},
        {"arch": "cnn3", "epochs": "2"}, {"arch": "cnn3", "epochs": "4"}]


@pytest.mark.parametrize("axis, message", [
    ("epochs", "expected train.NAME=V1,V2"),
    ("train.depth=1,2", "train.depth is not a train param"),
])
def test_bad_axes_are_named(axis, message):
    with pytest.raises(CnnpipeError, match=message):
        grid([axis])


def test_study_preset_is_the_published_design():
    assert STUDY == [{"arch": "mlp", "width": 128}, {"arch": "cnn3", "width": 16}, {"arch": "cnn3", "width": 32},
                     {"arch": "cnn3", "width": 64}, {"arch": "cnn3", "width": 128}]
