"""The inference contract, standalone (torch, numpy and Pillow only): how a request body becomes
images, how an image becomes model input, how probabilities become the answer, and SageMaker's four
handler functions.

cnnpipe's own server, predictor and pyfunc import it; `cnnpipe export sagemaker` copies this very
file into model.tar.gz as code/inference.py, so the endpoint and `cnnpipe serve` behave the same.

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
import io
import json
import math
import os
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PAYLOAD = 6 * 1024 * 1024  # SageMaker's real-time invocation limit
MAX_PIXELS = 4096 * 4096  # per image, checked from its header before decoding: a decode costs ~3-4 bytes a pixel
IMAGE_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "GIF")  # what Pillow may open: not its every parser
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/x-portable-pixmap", "image/x-portable-graymap",
               "image/x-portable-anymap", "image/bmp", "image/webp", "application/x-image")
RESIZE_MODES = ("squash", "center_crop", "letterbox")  # ingest.resize
JSON_KEYS = ("image", "images", "instances", "dataframe_split", "dataframe_records", "inputs")


class RequestError(ValueError):
    """A bad request: `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close  # the server should close the connection after answering (body left unread)


class BoxedImage(NamedTuple):  # not a dataclass: SageMaker's loader may import this file outside sys.modules
    """An image of a request with the box (x1, y1, x2, y2; pixel edges) its object occupies."""

    image: bytes | np.ndarray
    box: tuple[float, float, float, float]


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


def parse_body(body: bytes, content_type: str, max_bytes: int = MAX_PAYLOAD) -> tuple[list, int | None]:
    """The images of a request body (bytes or uint8 arrays) and its top_k (None: the default)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise RequestError("empty request body")
    if len(body) > max_bytes:
        raise RequestError(f"payload of {len(body):,} bytes exceeds the {max_bytes:,}-byte limit", 413)
    if kind in IMAGE_TYPES:
        return [body], None
    if kind != "application/json":
        raise RequestError(f"unsupported content type {content_type!r} (send image/png, image/jpeg, "
                           "application/x-image or application/json)", 415)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    return [decode_value(v, i) for i, v in enumerate(raw)], top_k


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any image mode -> L (channels 1) or RGB (3), as ingest converts training images: transparency
    composited on black, 16-bit scaled to 8 bits. Ingest's decode calls this too."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        flat = Image.new("RGBA", img.size, (0, 0, 0, 255))
        flat.alpha_composite(img)
        img = flat
    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def open_image(data: bytes, i: int = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an encoded image's header (nothing decoded yet) and refuse it past `max_pixels`."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the pixel budget below is the check
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise RequestError(f"image {i}: not a readable image (expected {', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise RequestError(f"image {i}: its size exceeds the budget of {max_pixels:,} pixels per image ({e})", 413) from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's parsers raise all three on a broken header
        raise RequestError(f"image {i}: not a readable image ({e})") from None
    width, height = pil.size
    if width * height > max_pixels:
        raise RequestError(f"image {i}: {width}x{height} = {width * height:,} pixels exceeds the budget of "
                           f"{max_pixels:,} pixels per image", 413)
    if width * height == 0:
        raise RequestError(f"image {i}: not a readable image (size {width}x{height})")
    return pil


def crop_to_box(img: Image.Image, box: tuple[float, float, float, float], i: int = 0) -> Image.Image:
    """The part of `img` inside `box` (pixel edges); a box reaching outside the image is refused."""
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height):
        raise RequestError(f"image {i}: box {list(box)} is outside the {img.width}x{img.height} image "
                           f"(expected 0 <= x1 < x2 <= {img.width}, 0 <= y1 < y2 <= {img.height})")
    return img.crop(box)


def reduce_on_decode(img: Image.Image, size: int) -> None:
    """Ask a not yet decoded JPEG for a 1/2, 1/4 or 1/8 scale that still covers size x size: a 12-megapixel
    photo bound for 224 px then decodes ~8x faster. Other formats ignore it."""
    if img.format == "JPEG":
        img.draft(None, (size, size))


def resize_to(img: Image.Image, size: int, resize: str) -> Image.Image:
    """size x size by ingest.resize: squash (stretch), center_crop (the central square) or letterbox
    (the whole image scaled to fit, centred on black)."""
    w, h = img.size
    if resize == "center_crop" and w != h:
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    elif resize == "letterbox" and w != h:
        scale = size / max(w, h)
        inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        canvas = Image.new(img.mode, (size, size))
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    elif resize not in RESIZE_MODES:
        raise ValueError(f"resize: expected one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BILINEAR)


def to_pixels(img: Image.Image, size: int, channels: int, resize: str = "squash",
              box: tuple[float, float, float, float] | None = None, i: int = 0) -> np.ndarray:
    """A PIL image as training saw it: upright by its EXIF orientation, converted to `channels`, cropped to
    `box` (if any), resized by `resize`: uint8 size x size x channels. Ingest's decode and every serving
    path call this."""
    if box is None:  # a box is in the full image's pixels: no reduced-scale decoding then
        reduce_on_decode(img, size)
    img = to_mode(ImageOps.exif_transpose(img), channels)
    if box is not None:
        img = crop_to_box(img, box, i)
    return np.asarray(resize_to(img, size, resize)).reshape(size, size, channels)


def to_array(image, size: int, channels: int, i: int = 0, max_pixels: int = MAX_PIXELS,  # noqa: ANN001
             resize: str = "squash") -> np.ndarray:
    """Encoded bytes, a uint8 H x W [x C] array or a BoxedImage -> uint8 size x size x channels, as training
    saw it: converted, cropped to the box (if any), resized by `resize`."""
    box = None
    if isinstance(image, BoxedImage):
        image, box = image.image, image.box
    if isinstance(image, (bytes, bytearray)):
        pil = open_image(bytes(image), i, max_pixels)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise RequestError(f"image {i}: expected uint8 H x W [x 1|3|4], got {arr.dtype} {arr.shape}")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise RequestError(f"image {i}: {arr.shape[1]}x{arr.shape[0]} pixels exceeds the budget of {max_pixels:,}", 413)
        pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    try:
        return to_pixels(pil, size, channels, resize, box, i)
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated data only fails when decoded
        raise RequestError(f"image {i}: not a readable image ({e})") from None


def probabilities(logits, temperature: float = 1.0):  # noqa: ANN001, ANN201 - N x C torch tensors
    """Class probabilities of the served model: softmax(logits / T), T the temperature evaluate fitted on the
    validation split (1: uncalibrated). Every path from logits to an answer goes through here (torch,
    ONNX graph, pyfunc, SageMaker's handler); a positive T never changes the argmax."""
    return (logits.float() / temperature).softmax(1)


FLIP_DIMS = {"hflip": (-1,), "vflip": (-2,), "rot180": (-2, -1)}  # the augment policy's flips: N x C x H x W dims


def usable_flips(flips: dict | None) -> dict[str, list[int]]:
    """The flip tables that keep or swap at least one class (entry c: the class an image of class c becomes
    when flipped, -1: never flipped): the views test-time augmentation may add."""
    return {name: list(table) for name, table in (flips or {}).items()
            if name in FLIP_DIMS and any(t >= 0 for t in table)}


def tta_probabilities(probs_of, x, flips: dict[str, list[int]], temperature: float | None = None):  # noqa: ANN001, ANN201
    """Test-time augmentation over class-aware flips: `probs_of` (N x C x H x W images -> N x K probabilities)
    of the original view and of each flipped view. A flipped view's probability of class table[c] is its vote
    for class c of the original (a swap pair's columns are permuted back); each class averages the views in
    which it is defined (table[c] >= 0; the original always), and the result is renormalized.

    Views that disagree soften the average, so it has its own temperature (evaluate fits it on val, None: 1):
    softmax(log(average) / temperature), which never moves the argmax."""
    import torch

    total = probs_of(x).double()
    views = torch.ones_like(total)
    for name, table in usable_flips(flips).items():
        index = torch.tensor(table, device=total.device)
        kept = (index >= 0).to(total.dtype)
        total = total + probs_of(x.flip(FLIP_DIMS[name])).double()[:, index.clamp(min=0)] * kept
        views = views + kept
    mean = total / views
    mean = mean / mean.sum(1, keepdim=True)
    return (mean if temperature is None else probabilities(mean.clamp_min(1e-30).log(), temperature)).float()


def answer(probs, classes: list[str], top_k: int) -> list[dict]:  # noqa: ANN001 - probs: N x C torch tensor
    """One dict per image: class, index, confidence and the k most probable classes."""
    if top_k < 1:  # one check for every way in: query, params, pyfunc, SageMaker
        raise RequestError(f"top_k: expected an integer >= 1, got {top_k}")
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    return [{"predicted_class": classes[i_row[0]], "predicted_class_index": int(i_row[0]), "confidence": float(p_row[0]),
             "top_k": [{"class": classes[i], "index": int(i), "probability": float(p)} for p, i in zip(p_row, i_row)]}
            for p_row, i_row in zip(top_p.tolist(), top_i.tolist())]


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
    size, channels = meta["image_size"], meta["channels"]
    resize = meta.get("resize", "squash")
    batch = np.stack([to_array(img, size, channels, i, resize=resize) for i, img in enumerate(input_data["images"])])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255.0)
    x = (x - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(1, -1, 1, 1)
    temperature, flips = meta.get("temperature", 1.0), usable_flips(meta.get("flips")) if meta.get("tta") else {}
    with torch.no_grad():
        probs = tta_probabilities(lambda view: probabilities(model["model"](view), temperature), x, flips,
                                  meta.get("tta_temperature")) if flips else probabilities(model["model"](x), temperature)
    top_k = input_data["top_k"]
    top_k = check_top_k(top_k, len(meta["classes"])) if top_k is not None else min(meta["top_k"], len(meta["classes"]))
    return answer(probs, meta["classes"], top_k)


def output_fn(prediction: list[dict], accept: str) -> str:
    if accept and accept.split(";")[0].strip() not in ("application/json", "*/*"):
        raise RequestError(f"unsupported accept type {accept!r} (application/json)", 406)
    return json.dumps({"predictions": prediction})
