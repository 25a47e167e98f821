"""The inference contract: how a request body becomes images, and SageMaker's four handler functions. How an
image becomes model input is cnnpipe.imaging's; the probabilities (calibration, TTA) and the answer made of them
are cnnpipe.calibration's.

cnnpipe's own server, predictor and pyfunc import it; `cnnpipe export sagemaker` copies this very file into
model.tar.gz as code/inference.py, with the cnnpipe modules it imports beside it (torch-free but for the
torch handler's model_fn/predict_fn), so the endpoint and `cnnpipe serve` behave the same.

Bodies: image/png, image/jpeg, application/x-image (one raw image), or application/json with one of
{"image": b64}, {"images": [b64, ...]}, {"instances": [b64 | {"image"|"b64": b64} | pixel array, ...]},
MLflow's {"dataframe_split": ...}, {"dataframe_records": ...}, {"inputs": ...} (an `image` column),
and optionally "params": {"top_k": k}. An image may come with its object's box, cropped to before
resizing as ingest crops GTSRB's ROI: {"image": b64, "box": [x1, y1, x2, y2]} at the top level or as an
item of images/instances/dataframe_records, or a `box` column; pixel edges of the sent image, x2 and y2
exclusive (PIL's crop box). Answer: {"predictions": [{"predicted_class",
"predicted_class_index", "confidence", "top_k": [{"class", "index", "probability"}, ...]}, ...]}.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from cnnpipe.calibration import answer, probabilities, tta_probabilities, usable_flips
from cnnpipe.errors import RequestError
from cnnpipe.imaging import MAX_PIXELS, BoxedImage, open_any, pixels_of

MAX_PAYLOAD = 6 * 1024 * 1024  # SageMaker's real-time invocation limit
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/x-portable-pixmap", "image/bmp", "image/webp", "image/gif",
               "application/x-image")
JSON_KEYS = ("image", "images", "instances", "dataframe_split", "dataframe_records", "inputs")


class Budgets(NamedTuple):  # not a dataclass: SageMaker's loader may import this file outside sys.modules
    """What one request may cost a server: the `serve:` block's limits (the defaults are params.yaml's; SageMaker's
    handler uses them as they are). Past one: a 413 (408 for time) naming it."""

    max_body_bytes: int = MAX_PAYLOAD
    # json.loads holds the GIL while it builds a body's arrays and objects (a million of them: long enough for
    # /ping to wait; benchmarks/results/hostile_load.json), so they are counted first; a pixel array costs one
    # per pixel and one per row
    max_json_containers: int = 100_000
    max_images: int = 256
    max_pixels: int = MAX_PIXELS  # per image, from its header
    max_request_pixels: int = 2 * MAX_PIXELS  # all of a request's images, from their headers, before decoding any
    max_decode_seconds: float = 1.0  # CPU time reading and decoding one image may take
    batch_size: int = 64  # images decoded and predicted at a time

    @classmethod
    def of(cls, cfg: object) -> Budgets:
        """The budgets of a ServeConfig (or anything with these fields)."""
        return cls(**{name: getattr(cfg, name) for name in cls._fields})


DEFAULT_BUDGETS = Budgets()


def parse_box(value, i: int) -> tuple[float, float, float, float] | None:  # noqa: ANN001
    """A request's box: None, or four finite numbers with x1 < x2 and y1 < y2 (the image's bounds are checked
    when it is decoded)."""
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise RequestError(f"image {i}: box {value!r}: expected [x1, y1, x2, y2] with x1 < x2 and y1 < y2")
    return box


def with_box(image, box, i: int):  # noqa: ANN001, ANN201 - bytes | np.ndarray | BoxedImage
    box = parse_box(box, i)
    return image if box is None else BoxedImage(image, box)


def decode_value(value, i: int):  # noqa: ANN001, ANN201 - bytes | np.ndarray | BoxedImage
    """One image of a request: base64 text -> bytes, a pixel array (nested lists) -> uint8 array."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):  # {"image" | "b64": ..., "box": [...]}
        if "box" in value:
            return with_box(decode_value(value.get("image", value.get("b64")), i), value["box"], i)
        value = value.get("image", value.get("b64"))
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"image {i}: not valid base64") from None
    if isinstance(value, list):
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged or too deeply nested lists
            arr = np.asarray([])
        if arr.dtype.kind not in "iu" or arr.ndim not in (2, 3) or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
            raise RequestError(f"image {i}: expected base64 text or a pixel array (H x W [x C] integers 0..255)")
        return arr.astype(np.uint8)
    raise RequestError(f"image {i}: expected base64 text or a pixel array, got {type(value).__name__}")


def _column(frame, where: str) -> list:  # noqa: ANN001
    if isinstance(frame, dict) and "columns" in frame:  # dataframe_split
        columns, data = frame["columns"], frame.get("data", [])
        if not isinstance(columns, list) or "image" not in columns:
            raise RequestError(f"{where}: expected a column 'image', got {str(columns)[:80]}")
        k = columns.index("image")
        b = columns.index("box") if "box" in columns else None
        width = max(k, b if b is not None else -1)
        if not isinstance(data, list) or not all(isinstance(row, list) and len(row) > width for row in data):
            raise RequestError(f"{where}: expected 'data' as rows (lists), each with an 'image' value")
        return [row[k] if b is None else {"image": row[k], "box": row[b]} for row in data]
    if isinstance(frame, list):  # dataframe_records, instances: items keep their box (decode_value reads it)
        return frame
    if isinstance(frame, dict) and "image" in frame:  # inputs: {"image": [...]}
        v = frame["image"]
        return v if isinstance(v, list) and (not v or not isinstance(v[0], int)) else [v]
    raise RequestError(f"{where}: expected an 'image' column")


def parse_top_k(value, where: str) -> int:  # noqa: ANN001 - whatever the request held
    """A requested top_k: an integer (JSON number or decimal text), not a bool, float, NaN or string of words."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise RequestError(f"{where}: expected an integer >= 1, got {str(value)[:40]!r}")


def check_top_k(top_k: int, num_classes: int, where: str = "top_k") -> int:
    if not 1 <= top_k <= num_classes:
        raise RequestError(f"{where}: expected an integer from 1 to {num_classes} (the number of classes), got {top_k}")
    return top_k


def parse_body(body: bytes, content_type: str, budgets: Budgets = DEFAULT_BUDGETS) -> tuple[list, int | None]:
    """The images of a request body (bytes or uint8 arrays) and its top_k (None: the default), within the
    budgets of body bytes, JSON arrays and objects, and images."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise RequestError("empty request body")
    if len(body) > budgets.max_body_bytes:
        raise RequestError(f"payload of {len(body):,} bytes exceeds the {budgets.max_body_bytes:,}-byte limit "
                           "(serve.max_body_bytes)", 413)
    if kind in IMAGE_TYPES:
        return [body], None
    if kind != "application/json":
        raise RequestError(f"unsupported content type {content_type!r} (send image/png, image/jpeg, "
                           "application/x-image or application/json)", 415)
    containers = body.count(b"[") + body.count(b"{")  # an upper bound: brackets inside strings count too
    if containers > budgets.max_json_containers:
        raise RequestError(f"body has {containers:,} JSON arrays and objects, more than the budget of "
                           f"{budgets.max_json_containers:,} (serve.max_json_containers; a pixel array costs one per "
                           "pixel: send encoded images)", 413)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or a number past Python's digit limit
        raise RequestError(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("body is not valid JSON: nested too deeply") from None
    key = next((k for k in JSON_KEYS if isinstance(obj, dict) and k in obj), None)
    if key is None:
        raise RequestError(f"expected a JSON object with one of the keys {', '.join(JSON_KEYS)}")
    value = obj[key]
    raw = [{"image": value, "box": obj.get("box")}] if key == "image" else value if key == "images" \
        else _column(value, key)
    if not isinstance(raw, list) or not raw:
        raise RequestError("no images in the request")
    params = obj.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError(f"params: expected a JSON object like {{\"top_k\": 3}}, got {type(params).__name__}")
    top_k = parse_top_k(params["top_k"], "params.top_k") if params.get("top_k") is not None else None
    if len(raw) > budgets.max_images:
        raise RequestError(f"request has {len(raw):,} images, more than the budget of {budgets.max_images:,} "
                           "(serve.max_images)", 413)
    return [decode_value(v, i) for i, v in enumerate(raw)], top_k


def request_batches(images: list, size: int, channels: int, resize: str = "squash",
                    budgets: Budgets = DEFAULT_BUDGETS) -> Iterator[np.ndarray]:
    """A request's images as model input, `batch_size` at a time (uint8 n x size x size x channels): every
    image's header is read first, and the request refused (413) if their pixels together exceed the budget, so
    nothing is decoded for a request that cannot be answered; each image's decode has its CPU deadline."""
    if len(images) > budgets.max_images:
        raise RequestError(f"request has {len(images):,} images, more than the budget of {budgets.max_images:,} "
                           "(serve.max_images)", 413)
    opened, pixels = [], 0
    for i, image in enumerate(images):
        pil, box = open_any(image, i, budgets.max_pixels, budgets.max_decode_seconds)
        pixels += pil.width * pil.height
        if pixels > budgets.max_request_pixels:
            raise RequestError(f"images 0-{i} declare {pixels:,} pixels, more than the budget of "
                               f"{budgets.max_request_pixels:,} per request (serve.max_request_pixels)", 413)
        opened.append((pil, box))
    for start in range(0, len(opened), budgets.batch_size):
        batch = []
        for i in range(start, min(start + budgets.batch_size, len(opened))):
            (pil, box), opened[i] = opened[i], None  # its decoded pixels go as soon as it is resized
            batch.append(pixels_of(pil, box, size, channels, resize, i))
            del pil
        yield np.stack(batch)


# --- SageMaker's PyTorch serving contract (model.tar.gz: model.pt, metadata.json, code/inference.py) ---

def model_fn(model_dir: str) -> dict:
    import torch

    with open(os.path.join(model_dir, "metadata.json")) as f:
        meta = json.load(f)
    model = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu").eval()
    return {"model": model, "meta": meta}


def input_fn(request_body: bytes, request_content_type: str) -> dict:
    if isinstance(request_body, str):
        request_body = request_body.encode()
    images, top_k = parse_body(bytes(request_body), request_content_type)
    return {"images": images, "top_k": top_k}


def predict_fn(input_data: dict, model: dict) -> list[dict]:
    import torch

    meta = model["meta"]
    top_k = input_data["top_k"]
    top_k = check_top_k(top_k, len(meta["classes"])) if top_k is not None else min(meta["top_k"], len(meta["classes"]))
    mean, std = torch.tensor(meta["mean"]).view(1, -1, 1, 1), torch.tensor(meta["std"]).view(1, -1, 1, 1)
    temperature, flips = meta.get("temperature", 1.0), usable_flips(meta.get("flips")) if meta.get("tta") else {}
    predictions = []
    for batch in request_batches(input_data["images"], meta["image_size"], meta["channels"],
                                 meta.get("resize", "squash")):
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255.0) - mean) / std
        with torch.no_grad():
            probs = tta_probabilities(lambda view: probabilities(model["model"](view), temperature), x, flips,
                                      meta.get("tta_temperature")) if flips else probabilities(model["model"](x), temperature)
        predictions += answer(probs, meta["classes"], top_k)
    return predictions


def output_fn(prediction: list[dict], accept: str) -> str:
    if accept and accept.split(";")[0].strip() not in ("application/json", "*/*"):
        raise RequestError(f"unsupported accept type {accept!r} (application/json)", 406)
    return json.dumps({"predictions": prediction})
