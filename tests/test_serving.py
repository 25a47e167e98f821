import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import build_model
from cnnpipe.serving.predictor import Predictor
from cnnpipe.serving.pyfunc import predict_frame, to_images


@pytest.fixture
def predictor(tmp_path) -> Predictor:
    spec = ModelSpec("cnn3", 8, 3, 4, 16, ["stop", "yield", "left", "right"], [0.5] * 3, [0.25] * 3)
    save_model(tmp_path / "model.pt", build_model("cnn3", 3, 4, 16, 8), spec)
    return Predictor.from_file(tmp_path / "model.pt")


def encoded(fmt: str, mode: str = "RGB", size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size // 2), color=120 if mode in ("L", "P") else (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_decodes_every_format_and_mode_to_the_model_input(predictor):
    raw = [encoded("PNG"), encoded("JPEG"), encoded("PPM"), encoded("PNG", "L"), encoded("PNG", "RGBA"),
           np.zeros((20, 30), np.uint8), np.zeros((16, 16, 3), np.uint8)]
    batch = predictor.preprocess(raw)
    assert batch.shape == (7, 16, 16, 3) and batch.dtype == np.uint8
    assert tuple(batch[0, 0, 0]) == (200, 30, 30)


def test_frame_output_has_class_names_and_top_k(predictor):
    frame = pd.DataFrame({"image": [base64.b64encode(encoded("PNG")).decode()] * 2})
    out = predict_frame(predictor, frame, top_k=3)
    assert list(out.columns) == ["predicted_class", "predicted_class_index", "confidence", "top_k"]
    row = out.iloc[0]
    assert row.predicted_class == predictor.spec.classes[row.predicted_class_index]
    probs = [t["probability"] for t in row.top_k]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and probs[0] == pytest.approx(row.confidence)
    arrays = predict_frame(predictor, np.zeros((2, 16, 16, 3), np.uint8), top_k=1)
    assert len(arrays) == 2 and len(arrays.top_k[0]) == 1


@pytest.mark.parametrize("bad, message", [
    (pd.DataFrame({"img": ["x"]}), "expected a column 'image'"),
    (pd.DataFrame({"image": ["***not base64***"]}), "image 0: not valid base64"),
    (pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}), "image 0: not a readable image"),
    (pd.DataFrame({"image": [base64.b64encode(encoded("PNG")[:60]).decode()]}), "image 0: not a readable image"),
    (np.zeros((2, 8, 8, 3), np.float32), "expected a uint8"),
])
def test_bad_images_are_named(predictor, bad, message):
    with pytest.raises(CnnpipeError, match=message):
        predictor.preprocess(to_images(bad))
