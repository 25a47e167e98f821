"""Images in, model input out: the one decoder and the one preprocessing that ingest, training, evaluation,
`cnnpipe predict` and every server (torch, ONNX Runtime, SageMaker's handler) share, so a served image is
resized exactly as the training images were.

Torch-free (numpy and Pillow only): the lean serving path and SageMaker's handler import it without torch, and
`cnnpipe export sagemaker` copies this file into the archive beside the handler.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnpipe.errors import CnnpipeError, RequestError

MAX_PIXELS = 4096 * 4096  # per served image, checked from its header before decoding: a decode costs ~3-4 bytes a pixel
IMAGE_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "GIF")  # what Pillow may open: not its every parser
CONVERT_BAND_PIXELS = 2**18  # pixels converted at a time from 16 bits (a band of rows)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".webp", ".gif")  # files of those formats
RESIZE_MODES = ("squash", "center_crop", "letterbox")  # ingest.resize
# Encoders write ~10 scans per progressive JPEG; libjpeg decodes every scan, each one a pass over all of the
# image's blocks, so a few bytes a scan repeated thousands of times cost minutes.
MAX_JPEG_SCANS = 64
DECODE_STEP = 4096  # bytes a decoder reads at a time: the decode deadline is checked between steps


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
        img = Image.fromarray(_to_8_bits(img))
    return img.convert("L" if channels == 1 else "RGB")


def _to_8_bits(img: Image.Image) -> np.ndarray:
    """A 16- or 32-bit gray image's values / 257, clipped to 0..255, as uint8: computed a band of rows at a time,
    so a 9400 x 9400 16-bit PNG costs its uint8 result, not float64 copies of it (0.7 GB each)."""
    out = np.empty((img.height, img.width), np.uint8)
    rows = max(1, CONVERT_BAND_PIXELS // max(img.width, 1))
    for top in range(0, img.height, rows):
        band = np.asarray(img.crop((0, top, img.width, min(top + rows, img.height))))
        out[top:top + rows] = np.clip(band // 257, 0, 255)
    return out


class DecodeClock(io.BytesIO):
    """An encoded image's bytes that charge the CPU time of the thread reading them to that image: Pillow's
    parsers and decoders read in steps (DECODE_STEP bytes), and each read past `seconds` of charged time
    stops the decode with a 408. CPU time, not the wall clock: a busy machine does not make an image late.
    `pause` stops the charging while other images are worked on; reading resumes it."""

    def __init__(self, data: bytes, seconds: float, i: int):
        super().__init__(data)
        self.seconds, self.i = seconds, i
        self.charged, self.since = 0.0, time.thread_time()

    def pause(self) -> None:
        if self.since is not None:
            self.charged += time.thread_time() - self.since
            self.since = None

    def read(self, size: int | None = -1) -> bytes:
        now = time.thread_time()
        if self.since is None:
            self.since = now
        if self.charged + now - self.since > self.seconds:
            raise RequestError(f"image {self.i}: decoding took more than {self.seconds:g} s of CPU time "
                               "(serve.max_decode_seconds)", 408)
        return super().read(size)


def jpeg_scans(data: bytes, limit: int) -> int:
    """The scans (SOS segments) of a JPEG's first image, counted by walking its segments, up to `limit` + 1."""
    scans, i = 0, 2
    while i + 4 <= len(data) and scans <= limit:
        marker = data[i + 1]
        if data[i] != 0xFF or marker == 0xD9:  # not a segment (bad data: the decoder says so), or the end
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, or a marker with no length
            i += 1 if marker == 0xFF else 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            scans += 1
            while (i := data.find(b"\xff", i)) >= 0 and i + 1 < len(data) and (
                    data[i + 1] == 0 or 0xD0 <= data[i + 1] <= 0xD7):
                i += 2  # a stuffed 0xFF or a restart marker: still the scan's entropy-coded data
            if i < 0:
                break
    return scans


def open_image(data: bytes, i: int = 0, max_pixels: int = MAX_PIXELS,
               decode_seconds: float | None = None) -> Image.Image:
    """Read an encoded image's header (nothing decoded yet) and refuse it past `max_pixels`, or a progressive
    JPEG of more than MAX_JPEG_SCANS scans; `decode_seconds`: the CPU time reading and decoding it may take
    (a DecodeClock; None: no limit)."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the pixel budget below is the check
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fp = io.BytesIO(data) if decode_seconds is None else DecodeClock(data, decode_seconds, i)
            pil = Image.open(fp, formats=IMAGE_FORMATS)
    except RequestError:
        raise
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
    if pil.format == "JPEG" and pil.info.get("progressive") and jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise RequestError(f"image {i}: a progressive JPEG of more than {MAX_JPEG_SCANS} scans (encoders write ~10)",
                           413)
    if decode_seconds is not None:
        pil.decodermaxblock = DECODE_STEP
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
    ImageOps.exif_transpose(img, in_place=True)  # not a copy: an upright image would be copied whole
    img = to_mode(img, channels)
    if box is not None:
        img = crop_to_box(img, box, i)
    return np.asarray(resize_to(img, size, resize)).reshape(size, size, channels)


def open_any(image, i: int = 0, max_pixels: int = MAX_PIXELS,  # noqa: ANN001 - bytes | np.ndarray | BoxedImage
             decode_seconds: float | None = None) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """Encoded bytes, a uint8 H x W [x C] array or a BoxedImage -> its PIL image (not decoded yet: its size is
    known, within `max_pixels`) and its box (None: the whole image). `decode_seconds`: see open_image."""
    box = None
    if isinstance(image, BoxedImage):
        image, box = image.image, image.box
    if isinstance(image, (bytes, bytearray)):
        pil = open_image(bytes(image), i, max_pixels, decode_seconds)
        if isinstance(pil.fp, DecodeClock):
            pil.fp.pause()  # until it is decoded: other images may be opened meanwhile
        return pil, box
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise RequestError(f"image {i}: expected uint8 H x W [x 1|3|4], got {arr.dtype} {arr.shape}")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise RequestError(f"image {i}: {arr.shape[1]}x{arr.shape[0]} pixels exceeds the budget of {max_pixels:,}", 413)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr), box


def pixels_of(pil: Image.Image, box: tuple[float, float, float, float] | None, size: int, channels: int,
              resize: str = "squash", i: int = 0) -> np.ndarray:
    """An image from open_any, decoded by `to_pixels` (RequestError naming it if its data is bad)."""
    try:
        return to_pixels(pil, size, channels, resize, box, i)
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated data only fails when decoded
        raise RequestError(f"image {i}: not a readable image ({e})") from None


def to_array(image, size: int, channels: int, i: int = 0, max_pixels: int = MAX_PIXELS,  # noqa: ANN001
             resize: str = "squash", decode_seconds: float | None = None) -> np.ndarray:
    """Encoded bytes, a uint8 H x W [x C] array or a BoxedImage -> uint8 size x size x channels, as training
    saw it: converted, cropped to the box (if any), resized by `resize`."""
    pil, box = open_any(image, i, max_pixels, decode_seconds)
    return pixels_of(pil, box, size, channels, resize, i)


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
            ImageOps.exif_transpose(img, in_place=True)  # as to_pixels does: no copy of an upright image
            img = to_mode(img, channels)
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
