"""Images in, model input out: the one decoder and the one preprocessing that ingest, training, evaluation,
`cnnpipe predict` and every server (torch, ONNX Runtime, SageMaker's handler) share, so a served image is
resized exactly as the training images were.

Torch-free (numpy and Pillow only): the lean serving path and SageMaker's handler import it without torch, and
`cnnpipe export sagemaker` copies this file into the archive beside the handler.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnpipe.errors import CnnpipeError, RequestError

MAX_PIXELS = 4096 * 4096  # per served image, checked from its header before decoding: a decode costs ~3-4 bytes a pixel
IMAGE_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "GIF")  # what Pillow may open: not its every parser
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".webp", ".gif")  # files of those formats
RESIZE_MODES = ("squash", "center_crop", "letterbox")  # ingest.resize


class BoxedImage(NamedTuple):  # not a dataclass: SageMaker's loader may import this file outside sys.modules
    """An image of a request with the box (x1, y1, x2, y2; pixel edges) its object occupies."""

    image: bytes | np.ndarray
    box: tuple[float, float, float, float]


class BadImage(Exception):
    """An image file ingest cannot use: counted in the ingest report and skipped."""


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any image mode -> L (channels 1) or RGB (3): transparency composited on black, 16-bit scaled to 8 bits."""
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
    photo bound for 224 px then decodes a fraction of its pixels. Other formats ignore it."""
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


def decode_images(images: list[bytes | np.ndarray | BoxedImage], size: int, channels: int, resize: str = "squash",
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A request's images as model input: decoded, converted to `channels`, cropped to the box (if any) and
    resized: uint8 N x size x size x channels (RequestError naming the bad one)."""
    return np.stack([to_array(img, size, channels, i, max_pixels, resize) for i, img in enumerate(images)])


def as_requests(images: np.ndarray, boxes: np.ndarray | None = None) -> list[np.ndarray | BoxedImage]:
    """Stored uint8 N x H x W x C images as a server receives them: whole, or each with its box."""
    if boxes is None:
        return list(images)
    return [BoxedImage(np.asarray(img), tuple(box.tolist())) for img, box in zip(images, boxes)]


def decode(data: bytes, name: str, size: int, channels: int,
           roi: tuple[float, float, float, float, float, float] | None = None, resize: str = "squash") -> np.ndarray:
    """An image file's bytes as the processed dataset holds it: uint8 size x size x channels, by `to_pixels`,
    exactly what serving does to a request. Ingest's decoder.

    `roi` is (x1, y1, x2, y2, width, height): an inclusive box in an image of width x height, scaled to the
    decoded image's actual size (GTSRB's CSVs describe the originals; copies may be resized).

    A file that is no readable image of IMAGE_FORMATS, or fails while decoding or converting, raises BadImage (the
    report lists it). An image over Pillow's decompression-bomb limit is refused as a CnnpipeError, not skipped:
    it is an attack or a mistake, never a training image.
    """
    try:
        img = open_image(data, max_pixels=Image.MAX_IMAGE_PIXELS)
        if roi is None:  # the ROI's coordinates need the full resolution
            reduce_on_decode(img, size)
        img.load()
        if roi is not None:
            img = to_mode(ImageOps.exif_transpose(img), channels)
            x1, y1, x2, y2, ref_w, ref_h = roi
            sx, sy = img.width / ref_w, img.height / ref_h
            img = img.crop((max(0.0, x1 * sx), max(0.0, y1 * sy), min(img.width, (x2 + 1) * sx),
                            min(img.height, (y2 + 1) * sy)))
        return to_pixels(img, size, channels, resize)
    except RequestError as e:
        reason = str(e).removeprefix("image 0: ")
        if e.status == 413:
            raise CnnpipeError(f"image '{name}' refused: {reason}") from None
        raise BadImage(reason) from None
    except (OSError, SyntaxError, ValueError, EOFError, ZeroDivisionError) as e:  # Pillow's decoders raise all these
        raise BadImage(f"{type(e).__name__}: {e}") from None
