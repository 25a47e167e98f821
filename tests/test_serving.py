import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import build_model
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


# --- the HTTP server -------------------------------------------------------------------------------

import json  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

from cnnpipe.config import ServeConfig  # noqa: E402
from cnnpipe.serving.contract import MAX_PAYLOAD  # noqa: E402
from cnnpipe.serving.server import ServingApp, cnnpipe_invoke, run_in_thread  # noqa: E402


@pytest.fixture
def server(predictor):
    url, stop = run_in_thread(ServingApp(lambda: cnnpipe_invoke(predictor, 3), ServeConfig()),
                              ServeConfig())
    yield url
    stop()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("content_type, fmt", [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("application/x-image", "PPM")])
def test_raw_image_bodies(server, content_type, fmt):
    status, out = post(f"{server}/invocations", encoded(fmt), content_type)
    assert status == 200 and len(out["predictions"]) == 1
    p = out["predictions"][0]
    assert set(p) == {"predicted_class", "predicted_class_index", "confidence", "top_k"} and len(p["top_k"]) == 3


@pytest.mark.parametrize("payload, n", [
    ({"image": b64(encoded("PNG"))}, 1),
    ({"images": [b64(encoded("PNG")), b64(encoded("JPEG"))]}, 2),
    ({"instances": [b64(encoded("PNG")), {"b64": b64(encoded("PNG"))}, {"image": b64(encoded("PNG"))}]}, 3),
    ({"instances": [np.zeros((16, 16, 3), np.uint8).tolist()]}, 1),
    ({"dataframe_split": {"columns": ["image"], "data": [[b64(encoded("PNG"))], [b64(encoded("PNG"))]]}}, 2),
    ({"dataframe_records": [{"image": b64(encoded("PNG"))}]}, 1),
    ({"inputs": {"image": [b64(encoded("PNG"))]}}, 1),
])
def test_json_forms(server, payload, n):
    status, out = post(f"{server}/invocations", json.dumps(payload).encode(), "application/json")
    assert status == 200 and len(out["predictions"]) == n


def test_top_k_from_params_and_query(server):
    body = json.dumps({"image": b64(encoded("PNG")), "params": {"top_k": 2}}).encode()
    assert len(post(f"{server}/invocations", body, "application/json")[1]["predictions"][0]["top_k"]) == 2
    assert len(post(f"{server}/invocations?top_k=4", encoded("PNG"), "image/png")[1]["predictions"][0]["top_k"]) == 4
    # a 400 that says why, not a dropped connection
    assert post(f"{server}/invocations?top_k=-1", encoded("PNG"), "image/png") == (
        400, {"error": "top_k: expected an integer from 1 to 4 (the number of classes), got -1"})


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"", "image/png", 400, "empty request body"),
    (b"definitely not an image", "image/png", 400, "not a readable image"),
    (b"hello", "text/plain", 415, "unsupported content type 'text/plain'"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"pictures": []}', "application/json", 400, "with one of the keys"),
    (b'{"image": "%%%"}', "application/json", 400, "not valid base64"),
    (b'{"instances": [[[300]]]}', "application/json", 400, "integers 0..255"),
])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, body, content_type, status, message):
    got, out = post(f"{server}/invocations", body, content_type)
    assert got == status and message in out["error"]
    with urllib.request.urlopen(f"{server}/ping", timeout=10) as r:
        assert r.status == 200


def test_payload_over_sagemakers_limit_is_refused(server):
    status, out = post(f"{server}/invocations", b"\x00" * (MAX_PAYLOAD + 1), "image/png")
    assert status == 413 and "exceeds" in out["error"]
    assert post(f"{server}/invocations", encoded("PNG"), "image/png")[0] == 200


def test_unknown_route(server):
    assert post(f"{server}/predict", b"x", "image/png")[0] == 404
