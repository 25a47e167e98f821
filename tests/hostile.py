"""Builders of hostile images (issue 24), small to send and costly to decode: shared by the tests and
benchmarks/hostile_load.py."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG written by Pillow; a scan's segment includes its
    entropy-coded data."""
    out, i = [], 2
    while i < len(data) and data[i + 1] != 0xD9:
        marker, j = data[i + 1], i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        while marker == 0xDA:  # entropy-coded data: up to the next marker that is not a stuffed 0xFF or a restart
            j = data.find(b"\xff", j)
            if data[j + 1] != 0 and not 0xD0 <= data[j + 1] <= 0xD7:
                break
            j += 2
        out.append((marker, i, j))
        i = j
    return out


def scan_bomb(side: int, copies: int) -> bytes:
    """A progressive side x side JPEG (10 scans) with an AC refinement scan of one component (a few bytes that
    touch every block) repeated `copies` times more: libjpeg decodes each one."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(np.kron(rng.integers(0, 256, (side // 64, side // 64, 3), dtype=np.uint8),
                                  np.ones((64, 64, 1), np.uint8)))
    data = encoded(img, "JPEG", progressive=True, quality=90)
    scans = [s for s in jpeg_segments(data) if s[0] == 0xDA]
    # an SOS header of one component: Ns, Cs, Td/Ta, Ss, Se, Ah/Al after the marker and length; the costliest
    # scan refines the full-resolution luma's whole AC band
    luma = [s for s in scans if data[s[1] + 4] == 1 and data[s[1] + 5] == 1 and data[s[1] + 7:s[1] + 9] == b"\x01?"]
    _, start, end = max(luma, key=lambda s: data[s[1] + 9] >> 4)
    return data[:scans[-1][2]] + data[start:end] * copies + data[scans[-1][2]:]


def png_chunks(total: int) -> bytes:
    """A 1x1 PNG with `total` bytes of empty ancillary chunks before its pixels: each one parsed on opening."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    filler = chunk(b"xxXx", b"")
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + filler * (total // len(filler)) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


def webp_declaring(side: int) -> bytes:
    """A lossless WebP of side x side pixels of one colour: ~700 bytes for 4096 x 4096."""
    return encoded(Image.new("RGB", (side, side), (10, 200, 30)), "WEBP", lossless=True)
