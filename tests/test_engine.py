import dataclasses

import numpy as np
import pytest
import torch

from cnnpipe.config import TrainConfig
from cnnpipe.engine.checkpoint import ModelSpec, load_model, save_model
from cnnpipe.engine.inference import stats_tensors, to_nchw_uint8
from cnnpipe.engine.loop import TrainData, fit, lr_factor
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import build_model
from tests.conftest import make_images


def tiny_data(size=8) -> TrainData:
    xtr, ytr = make_images(20, 3, size, 1, seed=0)
    xva, yva = make_images(6, 3, size, 1, seed=1)
    mean, std = stats_tensors([0.3], [0.3], torch.device("cpu"))
    return TrainData(to_nchw_uint8(xtr, "cpu"), torch.from_numpy(ytr), to_nchw_uint8(xva, "cpu"),
                     torch.from_numpy(yva), mean, std)


def test_fit_learns_and_repeats_for_a_seed():
    cfg = TrainConfig(arch="cnn3", width=8, epochs=6, batch_size=16, lr=0.05)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn3", 1, 3, 8, 8)
        runs.append(fit(model, tiny_data(), cfg, policy=None))
    assert runs[0][-1]["val/accuracy"] > 0.9
    assert runs[0] [-1]["train/loss"] < runs[0][0]["train/loss"]
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k and "per_s" not in k} for e in h]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_schedules_start_peak_and_end_as_documented(schedule):
    f = [lr_factor(schedule, s, 100) for s in range(101)]
    assert max(f) == pytest.approx(1.0) and all(0 <= v <= 1 for v in f)
    if schedule != "constant":
        assert f[-1] < 0.05


def test_model_file_roundtrip_uses_weights_only(tmp_path):
    model = build_model("cnn3", 1, 3, 8, 8)
    spec = ModelSpec("cnn3", 8, 1, 3, 8, ["a", "b", "c"], [0.5], [0.25])
    save_model(tmp_path / "model.pt", model, spec)
    loaded, spec2 = load_model(tmp_path / "model.pt")
    assert spec2 == spec
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    assert torch.allclose(model(x), loaded(x))
    # a file that would need full unpickling is refused, not executed
    torch.save({"format": "cnnpipe.model/1", "spec": dataclasses.asdict(spec), "state_dict": model.state_dict(),
                "payload": np.array([1])}, tmp_path / "evil.pt")
    with pytest.raises(CnnpipeError, match="not a readable cnnpipe model"):
        load_model(tmp_path / "evil.pt")


def test_corrupt_or_missing_model_file(tmp_path):
    with pytest.raises(CnnpipeError, match="not found"):
        load_model(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CnnpipeError, match="bad.pt.*not a readable cnnpipe model"):
        load_model(tmp_path / "bad.pt")
