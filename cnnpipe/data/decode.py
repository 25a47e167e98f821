"""Decode one image file's bytes into the uint8 H x W x C array the processed dataset holds."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnpipe.errors import CnnpipeError
from cnnpipe.serving.contract import IMAGE_FORMATS, reduce_on_decode, to_mode, to_pixels

# the file names of the formats serving accepts (GIF, PGM, ... too): ingest reads what a server would
IMAGE_SUFFIXES = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS))


class BadImage(Exception):
    """This file is not a usable image: counted in the ingest report and skipped."""


def decode(data: bytes, name: str, size: int, channels: int,
           roi: tuple[float, float, float, float, float, float] | None = None, resize: str = "squash") -> np.ndarray:
    """Decode, optionally crop to `roi`, convert and resize to size x size by `resize` (ingest.resize).

    `roi` is (x1, y1, x2, y2, width, height): an inclusive box in an image of width x height, scaled
    to the decoded image's actual size (GTSRB's CSVs describe the originals; copies may be resized).

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to `channels` (1: luma, 3: RGB;
    transparency is composited on black), photos turned upright by their EXIF orientation, and large
    JPEGs decoded reduced: exactly what serving does to a request (contract.to_pixels). An image over
    PIL's decompression-bomb limit is refused as an error, not skipped: it is an attack or a mistake,
    never a training image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if roi is None:  # the ROI's coordinates need the full resolution
                reduce_on_decode(img, size)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CnnpipeError(f"image '{name}' refused: {e}") from None
    except UnidentifiedImageError:  # its message names a BytesIO's address: the report must not vary by run
        raise BadImage("UnidentifiedImageError: not an image format PIL reads") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if roi is not None:
        img = to_mode(img, channels)
        x1, y1, x2, y2, ref_w, ref_h = roi
        sx, sy = img.width / ref_w, img.height / ref_h
        img = img.crop((max(0.0, x1 * sx), max(0.0, y1 * sy), min(img.width, (x2 + 1) * sx),
                        min(img.height, (y2 + 1) * sy)))
    return to_pixels(img, size, channels, resize)  # the same conversion serving applies to requests
