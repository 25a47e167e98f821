"""Temperature scaling: the fit recovers a known temperature, lowers the ECE of a miscalibrated model, never
moves the argmax; every serving path (torch predictor, ONNX graph, SageMaker handler) answers softmax(logits / T)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from cnnpipe.calibration import UNCALIBRATED, Calibration, fit_temperature
from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.engine.inference import predict_logits, to_nchw_uint8
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluation.metrics import classification_metrics
from cnnpipe.models import build_model

CLASSES = [f"c{i}" for i in range(10)]


def synthetic(temperature: float, n: int = 10000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels are drawn from softmax(logits / temperature): the true temperature is known."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, len(CLASSES), generator=g) * 4
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(true_t):
    assert fit_temperature(*synthetic(true_t)) == pytest.approx(true_t, rel=0.03)


def test_calibration_lowers_ece_and_nll_and_keeps_every_prediction():
    logits, labels = synthetic(2.0)  # overconfident by a factor of 2
    t = fit_temperature(logits, labels)
    before = classification_metrics(logits, labels, CLASSES)
    after = classification_metrics(logits, labels, CLASSES, t)
    assert after["scalars"]["ece"] < before["scalars"]["ece"] / 4 and after["scalars"]["ece"] < 0.02
    assert after["scalars"]["loss"] < before["scalars"]["loss"]
    assert (after["y_pred"] == before["y_pred"]).all()
    for k in ("accuracy", "top5_accuracy", "f1_macro"):
        assert after["scalars"][k] == before["scalars"][k]


def test_no_error_on_val_means_no_temperature():
    logits = torch.tensor([[5.0, 0.0], [0.0, 3.0], [4.0, 1.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 0])) == 1.0  # the NLL would only fall as T -> 0
    assert fit_temperature(logits, torch.tensor([0, 1, 1])) > 1.0  # one confident mistake: softer


def test_a_calibrated_model_is_left_alone():
    logits, labels = synthetic(1.0)
    t = fit_temperature(logits, labels)
    assert abs(t - 1) < 0.03
    assert classification_metrics(logits, labels, CLASSES, t)["scalars"]["ece"] < 0.02


@pytest.mark.parametrize("content", [{"temperature": 0}, {"temperature": -1.5}, {"temperature": "2"},
                                     {"temperature": True}, {"temperature": float("inf")}, {}, [2.0]])
def test_a_bad_calibration_file_is_named(tmp_path, content):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CnnpipeError, match=re.escape(f"calibration file '{path}': expected {{\"temperature\": T > 0")):
        Calibration.read(path)
    with pytest.raises(CnnpipeError, match="not found"):
        Calibration.read(tmp_path / "missing.json")
    path.write_text(json.dumps({"temperature": 1.7, "fitted_on": "val"}))
    assert Calibration.read(path) == Calibration(1.7)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrated")
    spec = ModelSpec("mlp", 8, 3, 4, 16, CLASSES[:4], [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    torch.manual_seed(0)
    net = build_model("mlp", 3, 4, 16, 8)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # sharper logits than a fresh init gives: the temperature must visibly matter
        head.weight.mul_(30)
    save_model(tmp / "model.pt", net, spec)
    return tmp / "model.pt"


def batch(n: int = 12) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def expected_probabilities(model_file, images: np.ndarray, t: float) -> torch.Tensor:
    """softmax(logits / T) computed here, from the network's raw logits."""
    plain = Predictor.from_file(model_file)
    logits = predict_logits(plain.model, to_nchw_uint8(images, plain.device), plain.mean, plain.std)
    return torch.softmax(logits.double() / t, 1).float()


def all_probabilities(answers: list[dict]) -> np.ndarray:
    out = np.zeros((len(answers), len(answers[0]["top_k"])))
    for row, a in zip(out, answers):
        for c in a["top_k"]:
            row[c["index"]] = c["probability"]
    return out


@pytest.mark.parametrize("t", [0.5, 3.0])
def test_the_torch_predictor_answers_softmax_of_logits_over_t(model_file, t):
    images = batch()
    calibrated = Predictor.from_file(model_file, calibration=Calibration(t)).predict(images, top_k=4)
    plain = Predictor.from_file(model_file, calibration=UNCALIBRATED).predict(images, top_k=4)
    assert np.allclose(all_probabilities(calibrated), expected_probabilities(model_file, images, t).numpy(), atol=1e-5)
    assert [a["predicted_class_index"] for a in calibrated] == [a["predicted_class_index"] for a in plain]
    assert not np.allclose(all_probabilities(calibrated), all_probabilities(plain), atol=1e-3)


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_onnx_graph_and_sagemaker_handler_apply_the_temperature(model_file, tmp_path):
    from cnnpipe.serving.onnx_model import export_onnx
    from cnnpipe.serving.onnx_runtime import OnnxPredictor
    from cnnpipe.serving.sagemaker import export, extract, load_inference

    t = 2.5
    predictor = Predictor.from_file(model_file, calibration=Calibration(t))
    images = batch()
    want = expected_probabilities(model_file, images, t).numpy()
    assert export_onnx(predictor, 4, tmp_path / "m.onnx")["temperature"] == t
    onnx = OnnxPredictor(tmp_path / "m.onnx", threads=1)
    assert onnx.calibration == Calibration(t)
    assert np.allclose(all_probabilities(onnx.predict(images, 4)), want, atol=1e-5)

    assert export(predictor, 4, tmp_path / "model.tar.gz")["temperature"] == t
    model_dir = extract(tmp_path / "model.tar.gz", tmp_path / "sm")
    assert json.loads((model_dir / "metadata.json").read_text())["temperature"] == t
    inference = load_inference(model_dir)
    answers = inference.predict_fn({"images": list(images) * 6, "top_k": 4}, inference.model_fn(str(model_dir)))
    assert np.allclose(all_probabilities(answers), np.tile(want, (6, 1)), atol=1e-5)  # 72 images: two batches


def test_tta_permutes_a_swapped_pair_back_and_averages_per_class():
    """Images are 1 x 2 pixels: brighter left = class 0 ("keep left"), brighter right = class 1 ("keep right"),
    class 2 mirror-invariant, class 3 never flipped. The toy model is right about the direction."""
    from cnnpipe.calibration import tta_probabilities

    def probs_of(view: torch.Tensor) -> torch.Tensor:
        left = view[:, 0, 0, 0] > view[:, 0, 0, 1]
        out = torch.where(left.view(-1, 1), torch.tensor([0.7, 0.1, 0.15, 0.05]), torch.tensor([0.1, 0.7, 0.15, 0.05]))
        return out.clone()

    x = torch.tensor([[[[9, 1]]], [[[1, 9]]]], dtype=torch.uint8)  # one left, one right
    flips = {"hflip": [1, 0, 2, -1], "vflip": [-1, -1, -1, -1]}
    got = tta_probabilities(probs_of, x, flips)
    # class c of the original = class table[c] of the flipped view: the pair's votes agree after the permutation;
    # class 3 has only the original view; then renormalized
    left = torch.tensor([(0.7 + 0.7) / 2, (0.1 + 0.1) / 2, (0.15 + 0.15) / 2, 0.05])
    assert torch.allclose(got[0], left / left.sum(), atol=1e-6)
    assert torch.allclose(got[1], left[[1, 0, 2, 3]] / left.sum(), atol=1e-6)
    # without the permutation the flipped view would vote for the other direction: the average would be split
    assert got[0, 0] > 0.65 and got[1, 1] > 0.65
    assert torch.equal(tta_probabilities(probs_of, x, {"vflip": [-1] * 4}), probs_of(x))  # no usable flip: no TTA


@pytest.fixture
def flip_calibration() -> Calibration:
    """Flip tables for the 4-class model: 0 <-> 1 swap under hflip, 2 keeps, 3 never flips; 2 keeps a half turn."""
    return Calibration(1.7, {"hflip": [1, 0, 2, -1], "vflip": [-1] * 4, "rot180": [-1, -1, 2, -1]}, tta_temperature=0.6)


def test_tta_of_a_flipped_image_is_the_permuted_tta_of_the_image(model_file):
    calibration = Calibration(1.7, {"hflip": [1, 0, 2, 3]})  # an involution on every class
    predictor = Predictor.from_file(model_file, calibration=calibration, tta=True)
    assert predictor.tta
    x = to_nchw_uint8(batch(), predictor.device)
    direct, mirrored = predictor.probabilities(x), predictor.probabilities(x.flip(-1))
    assert torch.allclose(mirrored[:, [1, 0, 2, 3]], direct, atol=1e-6)
    assert torch.allclose(direct.sum(1), torch.ones(len(x)), atol=1e-6)
    plain = Predictor.from_file(model_file, calibration=calibration)
    assert not torch.allclose(plain.probabilities(x), direct, atol=1e-3)  # TTA did change the answer
    assert not Predictor.from_file(model_file, calibration=Calibration(1.7, {"hflip": [-1] * 4}), tta=True).tta
    with pytest.raises(CnnpipeError, match="flip table 'hflip' does not fit a model of 4 classes"):
        Predictor.from_file(model_file, calibration=Calibration(1.0, {"hflip": [0, 1, 2]}))


def test_torch_onnx_and_sagemaker_tta_answer_alike(model_file, flip_calibration, tmp_path):
    from cnnpipe.serving.onnx_model import export_onnx
    from cnnpipe.serving.onnx_runtime import OnnxPredictor
    from cnnpipe.serving.sagemaker import export, extract, load_inference

    predictor = Predictor.from_file(model_file, calibration=flip_calibration, tta=True)
    images = batch()
    want = all_probabilities(predictor.predict(images, 4))
    export_onnx(predictor, 4, tmp_path / "m.onnx")
    onnx = OnnxPredictor(tmp_path / "m.onnx", threads=1, tta=True)
    assert onnx.tta and onnx.calibration == flip_calibration
    assert np.allclose(all_probabilities(onnx.predict(images, 4)), want, atol=1e-5)
    assert not np.allclose(all_probabilities(OnnxPredictor(tmp_path / "m.onnx", threads=1).predict(images, 4)), want,
                           atol=1e-3)
    # the TTA temperature is what TTA applies, in every path: at T the answer differs
    at_plain_t = Predictor.from_file(model_file, calibration=dataclasses.replace(flip_calibration, tta_temperature=None),
                                     tta=True)
    assert not np.allclose(all_probabilities(at_plain_t.predict(images, 4)), want, atol=1e-3)
    exported = export(predictor, 4, tmp_path / "model.tar.gz")
    assert {"tta": True, "temperature": 1.7, "tta_temperature": 0.6}.items() <= exported.items()
    model_dir = extract(tmp_path / "model.tar.gz", tmp_path / "sm")
    inference = load_inference(model_dir)
    answers = inference.predict_fn({"images": list(images) * 6, "top_k": 4}, inference.model_fn(str(model_dir)))
    assert np.allclose(all_probabilities(answers), np.tile(want, (6, 1)), atol=1e-5)  # 72 images: two batches


def test_tta_gets_its_own_temperature_and_is_calibrated_with_it():
    """An underconfident average of two views (as GTSRB's label-smoothed model gave): the temperature fitted on
    the log of the averages (what evaluate does) calibrates it; it never moves the argmax."""
    from cnnpipe.calibration import tta_probabilities

    g = torch.Generator().manual_seed(0)
    base = torch.randn(20000, len(CLASSES), generator=g) * 4
    labels = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    views = {k: 0.4 * base + torch.randn(base.shape, generator=g) * 0.2 for k in "ab"}  # both too soft
    x = torch.zeros(len(base), 1, 1, 2)
    flips = {"hflip": list(range(len(CLASSES)))}  # every class keeps: the flipped view votes for the same class

    def probs_of(view: torch.Tensor) -> torch.Tensor:  # the original view is x, the flipped one x.flip(-1)
        return views["a" if view is x else "b"].softmax(1)

    averaged = tta_probabilities(probs_of, x, flips)
    t = fit_temperature(averaged.log(), labels)
    calibrated = tta_probabilities(probs_of, x, flips, t)
    assert torch.allclose(calibrated, (averaged.double().log() / t).softmax(1).float(), atol=1e-6)
    assert torch.equal(calibrated.argmax(1), averaged.argmax(1)) and t < 1
    before = classification_metrics(averaged.log(), labels, CLASSES)["scalars"]
    after = classification_metrics(calibrated.log(), labels, CLASSES)["scalars"]
    assert after["ece"] < 0.02 < before["ece"] and after["loss"] < before["loss"]


def test_a_calibration_file_without_a_tta_temperature_still_reads(tmp_path):
    (tmp_path / "c.json").write_text('{"temperature": 1.5, "flips": null}')
    assert Calibration.read(tmp_path / "c.json") == Calibration(1.5, None, None)
    Calibration(1.5, None, 0.8).write(tmp_path / "d.json")
    assert Calibration.read(tmp_path / "d.json").tta_temperature == 0.8
