"""Photos as they come: EXIF orientation, CMYK, 16-bit, alpha, grayscale, large JPEGs, and the resize modes,
identical in ingest and serving (cnnpipe.imaging)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnpipe.config import IngestConfig
from cnnpipe.imaging import RESIZE_MODES, decode, reduce_on_decode, to_array


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def landscape(w: int = 60, h: int = 30) -> Image.Image:
    """Left half red, right half blue: orientation and crops are visible in the pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2:, 2] = 255
    return Image.fromarray(a)


def test_exif_orientation_is_applied():
    img = landscape()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the viewer shows it portrait, red on top
    data = encode(img, "JPEG", exif=exif, quality=95)
    out = decode(data, "p.jpg", 16, 3)
    assert out[:4, :, 0].mean() > 200 and out[:4, :, 2].mean() < 60  # red on top
    assert out[-4:, :, 2].mean() > 200  # blue at the bottom
    assert np.array_equal(out, to_array(data, 16, 3))


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "RGBA", "LA", "L", "P"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_as_serving_does(mode, channels):
    base = landscape()
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).convert("I;16")
        fmt = "PNG"
    elif mode in ("RGBA", "LA"):
        img = base.convert(mode)
        img.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 60, dtype=np.uint8), (30, 1))))
        fmt = "PNG"
    else:
        img, fmt = base.convert(mode), "JPEG" if mode == "CMYK" else "PNG"
    data = encode(img, fmt)
    out = decode(data, f"x.{fmt.lower()}", 16, channels)
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8
    assert np.array_equal(out, to_array(data, 16, channels))
    if mode == "I;16":  # 16 bits scaled to 8, not clipped
        assert out.max() > 60


def test_modes_differ_and_match_serving():
    data = encode(landscape(), "PNG")
    outs = {}
    for mode in RESIZE_MODES:
        outs[mode] = decode(data, "x.png", 20, 3, resize=mode)
        assert np.array_equal(outs[mode], to_array(data, 20, 3, resize=mode)), mode
    assert outs["squash"][:, 0, 0].mean() > 200  # the whole width: red at the left edge
    assert outs["letterbox"][:4].max() == 0 and outs["letterbox"][-4:].max() == 0  # black bars above and below
    assert outs["letterbox"][10, 0, 0] > 200 and outs["letterbox"][10, -1, 2] > 200
    crop = outs["center_crop"]  # the central 30x30: half red, half blue, nothing black
    assert crop[:, :8, 0].mean() > 200 and crop[:, -8:, 2].mean() > 200 and crop.max(-1).min() > 100


def test_resize_mode_reaches_the_model_through_ingest_and_the_spec(tmp_path):
    from cnnpipe.stages import ingest

    root = tmp_path / "photos"
    for k, color in enumerate(((255, 0, 0), (0, 0, 255))):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40 + i, 20), color).save(root / f"c{k}/{i}.png")
    cfg = IngestConfig(source="imagefolder", path=str(root), image_size=12, channels=3, resize="letterbox")
    ingest.run(cfg=cfg, data=tmp_path / "processed", report=tmp_path / "report.json")
    from cnnpipe.data.store import read_dataset

    ds = read_dataset(tmp_path / "processed")
    assert ds.manifest["resize"] == "letterbox"
    assert ds.splits["train"].images[:, 0].max() == 0  # letterboxed: a black top row in every image


def test_large_jpegs_are_decoded_reduced():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), np.uint8)).resize((1600, 1200))
    data = encode(big, "JPEG", quality=90)
    img = Image.open(io.BytesIO(data))
    reduce_on_decode(img, 64)
    img.load()
    assert img.size == (200, 150)  # 1/8 scale: still covers 64 x 64
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), float)
    assert np.abs(decode(data, "big.jpg", 64, 3).astype(float) - full).mean() < 12


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 90), h=st.integers(1, 90), size=st.integers(4, 40), mode=st.sampled_from(RESIZE_MODES),
       channels=st.sampled_from([1, 3]))
def test_any_shape_gives_the_model_its_input(w, h, size, mode, channels):
    data = encode(Image.new("RGB", (w, h), (200, 30, 30)), "PNG")
    out = decode(data, "x.png", size, channels, resize=mode)
    assert out.shape == (size, size, channels)
    assert np.array_equal(out, to_array(data, size, channels, resize=mode))
