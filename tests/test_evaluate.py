"""Evaluation: metrics against a case computed by hand, and every artifact a real, non-empty file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnpipe.config import AugmentConfig, EvaluateConfig, TrainConfig
from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluation.metrics import calibration_bins, classification_metrics, expected_calibration_error
from cnnpipe.stages import augment, evaluate, train
from tests.helpers import write_tiny_dataset

PNGS = ["confusion_matrix.png", "training_curves.png", "misclassified.png", "correct.png", "confidence_histogram.png",
        "reliability_diagram.png", "first_layer_filters.png", "feature_maps.png", "tsne.png"]


def test_metrics_match_a_hand_computed_case():
    # 3 classes, 6 images; predictions: 0->0, 0->0, 1->1, 1->2, 2->2, 2->0
    classes = ["a", "b", "c"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = [0, 0, 1, 2, 2, 0]
    confidence = [0.9, 0.8, 0.7, 0.6, 0.9, 0.5]
    logits = torch.full((6, 3), -10.0)
    for i, (p, c) in enumerate(zip(predicted, confidence)):
        # softmax over [log c, log((1-c)/2), log((1-c)/2)]: the top probability is exactly c
        logits[i] = math.log((1 - c) / 2)
        logits[i, p] = math.log(c)
    m = classification_metrics(logits, labels, classes)
    s = m["scalars"]
    assert s["accuracy"] == pytest.approx(4 / 6) and s["error_rate"] == pytest.approx(2 / 6)
    assert m["confusion"].tolist() == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]
    # per class: a P=2/3 R=1 F1=0.8; b P=1 R=0.5 F1=2/3; c P=0.5 R=0.5 F1=0.5
    assert [round(c["f1"], 6) for c in m["per_class"]] == [0.8, round(2 / 3, 6), 0.5]
    assert s["precision_macro"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert s["f1_macro"] == pytest.approx((0.8 + 2 / 3 + 0.5) / 3)
    assert s["top5_accuracy"] == 1.0
    assert s["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.7, 0.2, 0.9, 0.25])), rel=1e-5)
    # ECE over 15 bins: each image alone in its bin except the two 0.9s (both correct)
    # |1-0.9|*2 + |1-0.8| + |1-0.7| + |0-0.6| + |0-0.5| = 0.2 + 0.2 + 0.3 + 0.6 + 0.5 = 1.8, / 6
    assert s["ece"] == pytest.approx(1.8 / 6)
    assert m["most_confused"] == [{"true": "b", "predicted": "c", "count": 1}, {"true": "c", "predicted": "a", "count": 1}] \
        or m["most_confused"] == [{"true": "c", "predicted": "a", "count": 1}, {"true": "b", "predicted": "c", "count": 1}]


def test_perfect_calibration_has_zero_ece():
    conf = np.array([1.0, 1.0, 0.5, 0.5])
    correct = np.array([True, True, True, False])
    assert expected_calibration_error(calibration_bins(conf, correct)) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    write_tiny_dataset(tmp / "processed", classes=4, size=16, channels=3, n=30)
    augment.run(cfg=AugmentConfig(), data=tmp / "processed", augmented=tmp / "augmented")
    train.run(cfg=TrainConfig(arch="fastnet", width=8, epochs=3, batch_size=16), data=tmp / "processed",
              augmented=tmp / "augmented", model=tmp / "model", tracking=None)
    evaluate.run(cfg=EvaluateConfig(tsne_samples=40, tta=True), model=tmp / "model", data=tmp / "processed",
                 evaluation=tmp / "evaluation", tracking=None)
    return tmp / "evaluation"


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
@pytest.mark.parametrize("name", PNGS)
def test_every_figure_is_a_valid_non_empty_image(evaluated, name):
    img = Image.open(evaluated / name)
    img.verify()
    img = Image.open(evaluated / name).convert("L")
    assert img.size[0] >= 100 and img.size[1] >= 100
    assert np.asarray(img).std() > 5  # not a blank canvas


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_tables_report_and_kfp_matrix(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"} and {"accuracy", "ece", "f1_macro", "top5_accuracy"} <= set(metrics["test"])
    cm = json.loads((evaluated / "confusion_matrix.json").read_text())
    assert cm["categories"] == ["class0", "class1", "class2", "class3"] and len(cm["matrix"]) == 4
    assert sum(map(sum, cm["matrix"])) == len((evaluated / "predictions.csv").read_text().splitlines()) - 1
    md = (evaluated / "report.md").read_text()
    for png in PNGS:
        assert f"]({png})" in md
    assert "| test |" in md and "## Per class (test)" in md
    # top-down: the headline, calibration, the confusion matrix and the worst classes before any detail; params last
    order = ["## Headline", "## Calibration", "## Confusion matrix (test)", "## Worst classes (test)",
             "## Every metric", "## Data", "## Model", "| train param | value |"]
    assert [md.index(h) for h in order] == sorted(md.index(h) for h in order)
    worst = md.split("## Worst classes (test)")[1].split("##")[0]
    f1s = [float(line.split("|")[2]) for line in worst.splitlines() if line.startswith("| class") and "f1" not in line]
    assert f1s == sorted(f1s) and len(f1s) == 4
    html = (evaluated / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PNGS)
    assert html.index("<h2>Headline</h2>") < html.index("<h2>Data</h2>")
    assert "<details><summary>Training params</summary><table>" in html
    # `dvc metrics show`: the headline only, nested as test.accuracy
    headline = json.loads((evaluated / "headline.json").read_text())
    assert headline["test"] == {k: metrics["test"][k] for k in ("accuracy", "f1_macro", "ece")}  # no flips: no TTA
    assert headline["val"] == {"accuracy": metrics["val"]["accuracy"]} and headline["calibration"]["temperature"] > 0


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_calibration_is_fitted_reported_and_kept_out_of_the_model_folder(evaluated, tmp_path):
    from cnnpipe.calibration import Calibration

    metrics = json.loads((evaluated / "metrics.json").read_text())
    calibration = Calibration.read(evaluated / "calibration.json")
    assert calibration.temperature > 0 and calibration.tta_flips == {}  # class0..3: no flips, no TTA
    for m in metrics.values():
        assert {"ece_uncalibrated", "loss_uncalibrated"} <= set(m) and m["loss"] <= m["loss_uncalibrated"] + 1e-6
        assert not any(k.endswith("_tta") for k in m)
    assert "calibration.json" not in {f.name for f in (evaluated.parent / "model").iterdir()}
    md = (evaluated / "report.md").read_text()
    assert "## Calibration" in md and f"T = {calibration.temperature:.4f}" in md and "| ECE before | ECE after |" in md
    assert "TTA off: the augment policy the model was trained with flips no class" in md
    off = evaluate.run(cfg=EvaluateConfig(tsne_samples=0, calibrate=False), model=evaluated.parent / "model",
                       data=evaluated.parent / "processed", evaluation=tmp_path / "uncalibrated", tracking=None)
    assert Calibration.read(tmp_path / "uncalibrated/calibration.json").temperature == 1.0
    for split, m in off.items():
        assert m["ece"] == m["ece_uncalibrated"] and m["loss"] == m["loss_uncalibrated"]
        assert m["accuracy"] == metrics[split]["accuracy"]  # the temperature never moves a prediction


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_a_final_fit_on_train_and_val_trains_on_both_and_is_not_calibrated(evaluated, tmp_path, capsys):
    """train.train_on_val: the val split's images join the training ones (counted, no validation), and evaluate
    fits no temperature on images the model learned: T = 1, said in the report, on stderr and in calibration.json."""
    from cnnpipe.calibration import Calibration
    from cnnpipe.data.store import read_dataset

    data = evaluated.parent / "processed"
    r = train.run(cfg=TrainConfig(arch="fastnet", width=8, epochs=3, batch_size=16, keep="last", train_on_val=True),
                  data=data, augmented=evaluated.parent / "augmented", model=tmp_path / "model", tracking=None)
    assert r["val_accuracy"] is None and r["val_loss"] is None and r["best_epoch"] is None and r["kept_epoch"] == 3
    counts = read_dataset(data, splits=()).manifest["counts"]
    n = counts["train"]["total"] + counts["val"]["total"]
    assert f"{n:,} training images (the val split's among them: no validation)" in capsys.readouterr().err
    metrics = evaluate.run(cfg=EvaluateConfig(tsne_samples=0), model=tmp_path / "model", data=data,
                           evaluation=tmp_path / "evaluation", tracking=None)
    assert Calibration.read(tmp_path / "evaluation/calibration.json").temperature == 1.0
    assert all(m["ece"] == m["ece_uncalibrated"] for m in metrics.values())
    # its val scores are named for what they are, in every place a held-out score would be read
    assert set(metrics) == {"val_trained", "test"}
    assert json.loads((tmp_path / "evaluation/metrics.json").read_text()).keys() == metrics.keys()
    assert "val" not in json.loads((tmp_path / "evaluation/headline.json").read_text())
    md = (tmp_path / "evaluation/report.md").read_text()
    assert "Not calibrated (train.train_on_val: no held-out split to fit a temperature on): T = 1." in md
    assert "its val_trained rows score training images" in md and "| val_trained |" in md
    assert "its val_trained scores are of training images" in capsys.readouterr().err
    assert (tmp_path / "evaluation/training_curves.png").stat().st_size > 0  # train's curves alone


def test_register_gates_a_model_trained_on_val_on_its_test_accuracy():
    """Its val scores are of training images (metrics.json names them val_trained): the floor reads test's."""
    from cnnpipe.config import RegisterConfig
    from cnnpipe.stages.register import check_quality

    cfg = RegisterConfig(min_accuracy=0.5)
    assert check_quality(cfg, {"val": {"accuracy": 0.9}, "test": {"accuracy": 0.3}}, 4, Path("m.json")) == 0.9
    with pytest.raises(CnnpipeError, match=r"register: test accuracy 0.3000 \('m.json'\) is below register.min_acc"):
        check_quality(cfg, {"val_trained": {"accuracy": 1.0}, "test": {"accuracy": 0.3}}, 4, Path("m.json"))
    assert check_quality(cfg, {"val_trained": {"accuracy": 1.0}, "test": {"accuracy": 0.8}}, 4, Path("m.json")) == 0.8


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_tta_is_measured_when_the_policy_has_flips(tmp_path):
    from cnnpipe.augment.policy import CIFAR10
    from cnnpipe.calibration import Calibration

    # CIFAR-10's names: every class mirror-invariant; the bars of the tiny images are rows, which a mirror keeps
    write_tiny_dataset(tmp_path / "processed", classes=10, size=20, channels=3, n=12, names=CIFAR10)
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    train.run(cfg=TrainConfig(arch="mlp", width=8, epochs=3, batch_size=16), data=tmp_path / "processed",
              augmented=tmp_path / "augmented", model=tmp_path / "model", tracking=None)
    metrics = evaluate.run(cfg=EvaluateConfig(tsne_samples=0, tta=True), model=tmp_path / "model",
                           data=tmp_path / "processed", evaluation=tmp_path / "evaluation", tracking=None)
    calibration = Calibration.read(tmp_path / "evaluation/calibration.json")
    assert calibration.tta_flips == {"hflip": list(range(10))}
    assert calibration.tta_temperature is not None and calibration.tta_temperature > 0  # fitted on val's views
    for m in metrics.values():
        assert {"accuracy_tta", "ece_tta", "loss_tta", "ms_per_image", "ms_per_image_tta"} <= set(m)
        assert 0 <= m["accuracy_tta"] <= 1 and m["ms_per_image_tta"] > 0
    assert "TTA on: 2 views (original, hflip)" in (tmp_path / "evaluation/report.md").read_text()
    assert f"TTA temperature {calibration.tta_temperature:.4f}" in (tmp_path / "evaluation/report.md").read_text()


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_mismatched_model_and_empty_split_are_named(evaluated, tmp_path):
    model_dir = evaluated.parent / "model"
    write_tiny_dataset(tmp_path / "gray", classes=4, size=16, channels=1)
    with pytest.raises(CnnpipeError, match="model takes 4 classes, 16x16x3; dataset has 4 classes, 16x16x1"):
        evaluate.run(cfg=EvaluateConfig(), model=model_dir, data=tmp_path / "gray", evaluation=tmp_path / "out",
                     tracking=None)
    with pytest.raises(CnnpipeError, match="model file '.*missing/model.pt' not found"):
        evaluate.run(cfg=EvaluateConfig(), model=tmp_path / "missing", data=tmp_path / "gray",
                     evaluation=tmp_path / "out", tracking=None)
    assert not (tmp_path / "out").exists()
