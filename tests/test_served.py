"""What is served is what was measured (issue 18): whole frames + boxes in the dataset, box-jittered
crops in training, both protocols in evaluation, a box in requests, and the quality gates."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnpipe.augment import AugmentPolicy, apply_policy, no_flips
from cnnpipe.config import ServeConfig, TrainConfig
from cnnpipe.data.store import Split, read_dataset, write_dataset
from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.engine.inference import stats_tensors
from cnnpipe.engine.loop import TrainData, evaluate_split, fit
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError, RequestError
from cnnpipe.imaging import BoxedImage, as_requests, decode, to_array
from cnnpipe.models import build_model
from cnnpipe.serving.contract import MAX_PAYLOAD, input_fn, parse_body
from cnnpipe.serving.local import predict_files
from cnnpipe.serving.server import ServingApp, cnnpipe_invoke, run_in_thread
from tests.helpers import REPO, cnnpipe, make_images
from tests.formats import gtsrb_zip, sign_image

# --- the dataset: whole frames and their boxes -----------------------------------------------------


@pytest.mark.e2e  # whole stages on real models: seconds each, so not in the unit tier
def test_ingest_keeps_whole_frames_and_boxes_scaled_to_the_stored_image(tmp_path):
    z = gtsrb_zip(tmp_path / "g.zip", classes=3, tracks=4, frames=3)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(source="gtsrb", path=str(z), image_size=20, channels=3, roi_crop=False,
                            val_fraction=0.25, test_fraction=0.25)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = cnnpipe("ingest", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ds = read_dataset(tmp_path / "data/processed")
    assert ds.has_boxes and ds.manifest["whole_frames"]
    # the CSV's inclusive ROI 5,4..34,33 of a 40 x 38 frame -> edges 5..35 x 4..34, scaled by 20/40 and 20/38
    expected = [5 * 20 / 40, 4 * 20 / 38, 35 * 20 / 40, 34 * 20 / 38]
    for split in ds.splits.values():
        assert split.boxes.shape == (len(split.labels), 4)
        np.testing.assert_allclose(split.boxes, np.tile(expected, (len(split.labels), 1)), rtol=1e-5)
    frame = np.asarray(ds.splits["train"].images[0])
    assert tuple(frame[0, 0]) == (90, 90, 90)  # the grey border is kept: a whole frame, not a crop

    params["ingest"]["roi_crop"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cnnpipe("ingest", "--out", "crops", cwd=tmp_path).returncode == 0
    crops = read_dataset(tmp_path / "crops")
    assert not crops.has_boxes and crops.splits["train"].boxes is None and not crops.manifest["whole_frames"]


def test_store_refuses_boxes_outside_the_images(tmp_path):
    images, labels = make_images(2, 2, 8, 1)
    good = np.tile([1.0, 1.0, 7.0, 6.0], (len(labels), 1)).astype(np.float32)
    splits = {s: Split(images, labels, good) for s in ("train", "val", "test")}
    write_dataset(tmp_path / "ok", ["a", "b"], splits, {"source": {"name": "t"}})
    np.testing.assert_array_equal(read_dataset(tmp_path / "ok").splits["val"].boxes, good)
    bad = good.copy()
    bad[1, 2] = 9.0  # x2 past the 8-pixel width
    write_dataset(tmp_path / "bad", ["a", "b"], {**splits, "test": Split(images, labels, bad)}, {"source": {"name": "t"}})
    with pytest.raises(CnnpipeError, match=r"test_boxes.npy': expected 4 x 4 float boxes .* inside the 8x8 images"):
        read_dataset(tmp_path / "bad")


# --- training: random crops between the box and the whole frame --------------------------------------


def _policy(**kw) -> AugmentPolicy:
    base = {"translate": 0.0, "rotate": 0.0, "scale": 0.0, "shear": 0.0, "brightness": 0.0, "contrast": 0.0,
            "saturation": 0.0, "cutout": 0.0, "box_crop": 1.0, "hflip": no_flips(2), "vflip": no_flips(2),
            "rot180": no_flips(2)}
    return AugmentPolicy(**{**base, **kw})


def test_box_crops_lie_between_the_box_and_the_whole_frame():
    n, size = 256, 32
    x = torch.zeros(n, 1, size, size)
    x[:, :, 8:24, 4:20] = 1.0  # the object fills its box exactly
    boxes = torch.tensor([[4.0, 8.0, 20.0, 24.0]]).repeat(n, 1)
    out, _ = apply_policy(x, torch.zeros(n, dtype=torch.long), _policy(), torch.Generator().manual_seed(0), boxes)
    share = out.mean(dim=(1, 2, 3))
    frame_share = 16 * 16 / size ** 2
    # never tighter than the box (a little bilinear blur at its edges), never wider than the frame
    assert share.max() <= 1.0 and share.min() >= frame_share - 0.02
    # scale jitter: from nearly the tight box to the whole frame; offset jitter: the object moves
    assert share.max() > 0.9 and (share - frame_share).abs().min() < 0.02
    centers = (out[:, 0].sum(1) > 0.5 * out[:, 0].sum(1).max(1, keepdim=True).values).float()
    assert centers.std(0).sum() > 0
    untouched, _ = apply_policy(x, torch.zeros(n, dtype=torch.long), _policy(box_crop=0.0),
                                torch.Generator().manual_seed(0), boxes)
    torch.testing.assert_close(untouched, x)


def test_a_flipped_image_is_cropped_around_its_flipped_box():
    n, size = 64, 16
    x = torch.zeros(n, 1, size, size)
    x[:, :, :, :4] = 1.0  # the object: the left quarter
    boxes = torch.tensor([[0.0, 0.0, 4.0, 16.0]]).repeat(n, 1)
    flips = [0, 0]  # class 0 flips into itself
    out, _ = apply_policy(x, torch.zeros(n, dtype=torch.long), _policy(hflip=flips),
                          torch.Generator().manual_seed(1), boxes)
    # every crop contains the whole object, on whichever side it ended up
    assert (out.sum(dim=(1, 2, 3)) >= 4 * 16 - 1).all()


@settings(max_examples=30, deadline=None)
@given(x1=st.floats(0, 14), y1=st.floats(0, 14), w=st.floats(1, 16), h=st.floats(1, 16), seed=st.integers(0, 2**31))
def test_box_crops_never_sample_outside_the_frame(x1, y1, w, h, seed):
    boxes = torch.tensor([[x1, y1, min(16.0, x1 + w), min(16.0, y1 + h)]])
    out, _ = apply_policy(torch.ones(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), _policy(),
                          torch.Generator().manual_seed(seed), boxes)
    torch.testing.assert_close(out, torch.ones_like(out))  # a pixel from outside would be padded, not 1


# --- training gates ----------------------------------------------------------------------------------


def _tensors(n: int = 16) -> TrainData:
    images, labels = make_images(n, 3, 8, 1)
    val_images, val_labels = make_images(4, 3, 8, 1, seed=1)
    mean, std = stats_tensors([0.3], [0.3], torch.device("cpu"))
    to = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return TrainData(to(images), torch.from_numpy(labels), to(val_images), torch.from_numpy(val_labels), mean, std)


def test_a_diverging_loss_stops_training_with_a_clear_error():
    cfg = TrainConfig(arch="mlp", width=8, epochs=3, batch_size=8, lr=1e30, optimizer="sgd", channels_last=False)
    with pytest.raises(CnnpipeError, match="the loss became (nan|inf) in epoch 1 .* lower train.lr"):
        fit(build_model("mlp", 1, 3, 8, 8), _tensors(), cfg, None)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_best_keeps_the_best_validation_epoch(keep):
    torch.manual_seed(0)
    cfg = TrainConfig(arch="mlp", width=8, epochs=6, batch_size=8, lr=0.5, schedule="constant", channels_last=False,
                      keep=keep, early_stopping_metric="val/loss")
    data = _tensors()
    result = fit(build_model("mlp", 1, 3, 8, 8), data, cfg, None)
    losses = [h["val/loss"] for h in result.history]
    kept_loss, _ = evaluate_split(result.model, data.val_images, data.val_labels, data.mean, data.std)
    if keep == "best":
        assert result.kept_epoch == result.best_epoch == 1 + int(np.argmin(losses))
    else:
        assert result.kept_epoch == 6
    assert kept_loss == pytest.approx(losses[result.kept_epoch - 1], rel=1e-5)


@pytest.mark.e2e  # the real CLI / git + DVC in subprocesses
def test_cli_train_with_a_diverging_loss_exits_2_and_writes_no_model(tmp_path, tiny_dataset):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cnnpipe("augment", "--data", str(tiny_dataset), "--out", "aug", cwd=tmp_path).returncode == 0
    proc = cnnpipe("train", "--no-tracking", "--data", str(tiny_dataset), "--augmented", "aug", "--out", "model",
                   "--arch", "mlp", "--width", "8", "--epochs", "2", "--lr", "1e30", cwd=tmp_path)
    assert proc.returncode == 2 and "the loss became" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "model").exists()


# --- requests with a box --------------------------------------------------------------------------------


@pytest.fixture
def predictor(tmp_path) -> Predictor:
    spec = ModelSpec("cnn3", 8, 3, 3, 16, ["a", "b", "c"], [0.5] * 3, [0.25] * 3)
    save_model(tmp_path / "model.pt", build_model("cnn3", 3, 3, 16, 8), spec)
    return Predictor.from_file(tmp_path / "model.pt")


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_a_request_box_crops_as_ingest_does():
    frame = sign_image(1)  # 40 x 38, ROI 5,4..34,33 inclusive
    body = json.dumps({"image": base64.b64encode(_png(frame)).decode(), "box": [5, 4, 35, 34]}).encode()
    images, _ = parse_body(body, "application/json")
    assert isinstance(images[0], BoxedImage) and images[0].box == (5, 4, 35, 34)
    crop = to_array(images[0], 16, 3)
    np.testing.assert_array_equal(crop, decode(_png(frame), "f", 16, 3, (5, 4, 34, 33, 40, 38)))
    assert (crop == sign_image(1)[10, 10]).all()  # the sign only: no grey border


@pytest.mark.parametrize("box, message", [
    ([0, 0, 41, 38], r"image 0: box \[0.0, 0.0, 41.0, 38.0\] is outside the 40x38 image"),
    ([-1, 0, 10, 10], "is outside the 40x38 image"),
    ([10, 10, 5, 20], "expected \\[x1, y1, x2, y2\\] with x1 < x2"),
    ([1, 2, 3], "expected \\[x1, y1, x2, y2\\]"),
    (["a", 1, 2, 3], "expected \\[x1, y1, x2, y2\\]"),
])
def test_a_bad_box_is_a_400_naming_it(predictor, box, message):
    base, stop = run_in_thread(ServingApp(lambda: cnnpipe_invoke(predictor, 3, MAX_PAYLOAD, 4096 * 4096), ServeConfig()),
                               ServeConfig())
    try:
        url = f"{base}/invocations"
        good = json.dumps({"instances": [{"image": base64.b64encode(_png(sign_image(0))).decode(),
                                          "box": [5, 4, 35, 34]}]}).encode()
        req = urllib.request.Request(url, good, {"Content-Type": "application/json"})
        assert len(json.loads(urllib.request.urlopen(req).read())["predictions"]) == 1
        bad = json.dumps({"image": base64.b64encode(_png(sign_image(0))).decode(), "box": box}).encode()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, bad, {"Content-Type": "application/json"}))
        assert e.value.code == 400
        assert re.search(message, json.loads(e.value.read())["error"])
    finally:
        stop()


def test_sagemaker_handler_takes_a_box():
    frame = sign_image(2)
    body = json.dumps({"dataframe_split": {"columns": ["image", "box"],
                                           "data": [[base64.b64encode(_png(frame)).decode(), [5, 4, 35, 34]],
                                                    [base64.b64encode(_png(frame)).decode(), None]]}})
    data = input_fn(body, "application/json")
    assert isinstance(data["images"][0], BoxedImage) and isinstance(data["images"][1], bytes)
    with pytest.raises(RequestError, match="box .* is outside the 40x38 image"):
        to_array(BoxedImage(_png(frame), (0, 0, 50, 10)), 16, 3)


def test_predict_reads_a_box_column(predictor, tmp_path):
    frame = sign_image(0)
    (tmp_path / "f.png").write_bytes(_png(frame))
    (tmp_path / "list.csv").write_text("path,box\nf.png,5 4 35 34\nf.png,\nf.png,0 0 99 10\n")
    result = predict_files(predictor, [tmp_path / "list.csv"], tmp_path / "out.csv")
    assert result == {"files": 3, "predicted": 2, "unreadable": 1, "output": str(tmp_path / "out.csv")}
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert "outside the 40x38 image" in rows[3] and rows[1].split(",")[4] == "" and rows[2].split(",")[4] == ""
    cropped = predictor.predict(predictor.preprocess([BoxedImage(_png(frame), (5, 4, 35, 34))]), top_k=1)[0]
    # the first row is the crop: the same answer as predicting the cropped image (batched: equal to float precision)
    assert float(rows[1].split(",")[3]) == pytest.approx(cropped["confidence"], abs=1e-4)


# --- end to end: both protocols in metrics.json, MLflow, promotion; the register gate ----------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny GTSRB-layout zip through ingest (whole frames + boxes), augment (box crops), train, evaluate."""
    ws = tmp_path_factory.mktemp("served")
    z = gtsrb_zip(ws / "g.zip", classes=3, tracks=6, frames=4)
    params = yaml.safe_load((REPO / "configs/gtsrb.yaml").read_text())
    params["ingest"].update(path=str(z), image_size=16, val_fraction=0.2, test_fraction=0.2)
    params["train"].update(arch="cnn3", width=8, epochs=3, batch_size=16, lr=0.05)
    params["evaluate"]["tsne_samples"] = 0
    params["register"].update(promotion_metric="loss", min_accuracy=0.9)
    params["tracking"]["uri"] = f"sqlite:///{ws / 'mlflow.db'}"
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("ingest", "augment", "train", "evaluate"):
        proc = cnnpipe(stage, cwd=ws)
        assert proc.returncode == 0, proc.stderr
    return ws


@pytest.mark.e2e
def test_both_protocols_reach_metrics_mlflow_and_promotion(trained):
    from mlflow import MlflowClient

    metrics = json.loads((trained / "data/evaluation/metrics.json").read_text())
    assert set(metrics) == {"val", "test", "val_roi", "test_roi"}
    assert metrics["test"]["accuracy"] == 1.0 and metrics["test_roi"]["accuracy"] == 1.0  # right on both
    assert metrics["test"]["loss"] != metrics["test_roi"]["loss"]  # two different sets of inputs
    assert "Protocol: served: whole images" in (trained / "data/evaluation/report.md").read_text()

    proc = cnnpipe("register", cwd=trained)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    promotion = record["promotion"]
    assert promotion["protocol"] == "served" and promotion["promoted"]
    # promotion scored the registered pyfunc on whole frames: evaluate's served figure, not the ROI one
    assert promotion["challenger_value"] == pytest.approx(metrics["test"]["loss"], rel=1e-4)

    uri = f"sqlite:///{trained / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(record["run_id"])
    assert run.data.metrics["test/loss"] == pytest.approx(metrics["test"]["loss"])
    assert run.data.metrics["test_roi/loss"] == pytest.approx(metrics["test_roi"]["loss"])
    version = client.get_model_version(record["name"], record["version"])
    assert version.tags["promotion.protocol"] == "served"
    assert float(version.tags["test_roi.loss"]) == pytest.approx(metrics["test_roi"]["loss"])

    roi = cnnpipe("promote", "--version", record["version"], "--promotion-protocol", "roi", cwd=trained)
    assert roi.returncode == 0, roi.stderr
    assert json.loads(roi.stdout)["challenger_value"] == pytest.approx(metrics["test_roi"]["loss"], rel=1e-4)


@pytest.mark.e2e
def test_a_collapsed_run_cannot_be_registered(trained, tmp_path):
    from mlflow import MlflowClient

    # lr 0: the weights never move, the model stays at its random start (well below the 0.9 floor)
    proc = cnnpipe("train", "--lr", "0", "--epochs", "1", "--out", str(tmp_path / "model"), cwd=trained)
    assert proc.returncode == 0, proc.stderr
    proc = cnnpipe("evaluate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "evaluation"), cwd=trained)
    assert proc.returncode == 0, proc.stderr
    val = json.loads((tmp_path / "evaluation/metrics.json").read_text())["val"]["accuracy"]
    assert val < 0.9
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    before = len(client.search_model_versions("name='cnnpipe-gtsrb'"))
    proc = cnnpipe("register", "--model", str(tmp_path / "model"), "--evaluation", str(tmp_path / "evaluation"),
                   "--out", str(tmp_path / "registered.json"), cwd=trained)
    assert proc.returncode == 2
    assert f"validation accuracy {val:.4f}" in proc.stderr and "not registered" in proc.stderr
    assert not (tmp_path / "registered.json").exists()
    assert len(client.search_model_versions("name='cnnpipe-gtsrb'")) == before


GTSRB_ZIP = Path(__file__).resolve().parents[2] / "shared/data/GTSRB_Final_Training_Images.zip"


@pytest.mark.e2e
@pytest.mark.skipif(not GTSRB_ZIP.exists(), reason="the real GTSRB training zip is not in ../shared/data")
def test_real_gtsrb_roi_protocol_is_exactly_ingests_fixed_crops(tmp_path):
    """Whole frames + boxes, cropped by the serving contract, give ingest's fixed ROI crops byte for byte."""
    params = ["--params", str(REPO / "configs/gtsrb.yaml"), "--path", str(GTSRB_ZIP)]
    for flag, out in (("--no-roi-crop", "whole"), ("--roi-crop", "crops")):
        proc = cnnpipe("ingest", *params, flag, "--out", str(tmp_path / out), "--report", str(tmp_path / f"{out}.json"),
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    whole, crops = (read_dataset(tmp_path / name, splits=("test",)).splits["test"] for name in ("whole", "crops"))
    np.testing.assert_array_equal(whole.labels, crops.labels)
    roi = np.stack([to_array(r, 32, 3, i) for i, r in enumerate(as_requests(whole.images, whole.boxes))])
    np.testing.assert_array_equal(roi, crops.images)
