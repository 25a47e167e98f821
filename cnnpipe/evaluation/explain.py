"""Grad-CAM (the `grad-cam` package): where in an image the network looked for the class it predicted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file

OUTPUT_DIR = Path("data/explain")  # beside the pipeline's other outputs, never among the images explained


def default_output(image: Path) -> Path:
    return OUTPUT_DIR / f"{image.stem}.gradcam.png"


def target_layer(model: nn.Module) -> nn.Module | None:
    """The last convolution: the finest map that still sees the whole receptive field (None: no convolutions)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def unavailable_reason(model: nn.Module) -> str | None:
    """Why Grad-CAM cannot run for `model` here (None: it can)."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return "grad-cam is not installed (pip install 'cnnpipe[explain]')"
    return None if target_layer(model) is not None else "the network has no convolution"


def overlays(model: nn.Module, x: torch.Tensor, images: np.ndarray, classes: list[int]) -> np.ndarray:
    """Heat maps of `classes` (one per image) over `images`.

    `x` is the normalized N x C x H x W input, `images` the same images as uint8 N x H x W x C;
    returns uint8 N x H x W x 3.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    maps = to_input_frame(model, x, maps)
    rgb = images.astype(np.float32) / 255.0
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    return np.stack([show_cam_on_image(img, m, use_rgb=True) for img, m in zip(rgb, maps)])


def to_input_frame(model: nn.Module, x: torch.Tensor, maps: np.ndarray) -> np.ndarray:
    """Behind a spatial transformer (fastnet-stn) the last convolution sees the resampled image: carry its maps
    (N x H x W) back through each image's inverse map, so they lie over the image the user sent."""
    from cnnpipe.models.stn import SpatialTransformer

    transformer = next((m for m in model.modules() if isinstance(m, SpatialTransformer)), None)
    if transformer is None:
        return maps
    with torch.no_grad():
        theta = transformer.theta(x).cpu().double()  # transformed -> input coordinates
    last_row = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=theta.dtype).expand(len(theta), 1, 3)
    inverse = torch.linalg.inv(torch.cat([theta, last_row], 1))[:, :2]  # input -> transformed coordinates
    cams = torch.from_numpy(np.asarray(maps, dtype=np.float64)).unsqueeze(1)
    grid = torch.nn.functional.affine_grid(inverse, list(cams.shape), align_corners=False)
    back = torch.nn.functional.grid_sample(cams, grid, padding_mode="zeros", align_corners=False)
    return back.squeeze(1).numpy().astype(np.float32)


def _captioned(picture, caption: str):  # noqa: ANN001, ANN202 - PIL images
    """`picture` under a white strip with `caption` (the class and confidence) in black."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    width = max(picture.width, int(font.getlength(caption)) + 8)
    out = Image.new("RGB", (width, picture.height + 22), (255, 255, 255))
    out.paste(picture, (0, 22))
    ImageDraw.Draw(out).text((4, 3), caption, fill=(0, 0, 0), font=font)
    return out


def explain_image(predictor, image: Path, out: Path, class_name: str | None = None) -> dict:  # noqa: ANN001 - a Predictor
    """Grad-CAM of one image file for its predicted class (or `class_name`): a PNG of the image as the
    model saw it beside the overlay, captioned with the class and confidence; returns the prediction and the
    PNG's path."""
    from PIL import Image

    from cnnpipe.engine.inference import normalize, to_nchw_uint8

    spec = predictor.spec
    skipped = unavailable_reason(predictor.model)
    if skipped:
        raise CnnpipeError(f"explain: {skipped}")
    if class_name is not None and class_name not in spec.classes:
        raise CnnpipeError(f"--class: {class_name!r} is not a class of the model (expected one of: "
                           f"{', '.join(spec.classes[:20])}{', ...' if len(spec.classes) > 20 else ''})")
    if not image.is_file():
        raise CnnpipeError(f"image '{image}' not found")
    pixels = predictor.preprocess([image.read_bytes()])  # exactly what serving feeds the model
    prediction = predictor.predict(pixels, top_k=min(5, len(spec.classes)))[0]
    target = spec.classes.index(class_name) if class_name else prediction["predicted_class_index"]
    x = normalize(to_nchw_uint8(pixels, predictor.device), predictor.mean, predictor.std)
    overlay = overlays(predictor.model, x, pixels, [target])[0]
    seen = np.repeat(pixels[0], 3, axis=-1) if pixels.shape[-1] == 1 else pixels[0]
    scale = max(1, 224 // spec.image_size)  # small inputs shown large enough to see
    side_by_side = np.concatenate([seen, np.full((seen.shape[0], 2, 3), 255, np.uint8), overlay], axis=1)
    picture = Image.fromarray(side_by_side).resize((side_by_side.shape[1] * scale, side_by_side.shape[0] * scale),
                                                  Image.Resampling.NEAREST)
    caption = f"{prediction['predicted_class']} {prediction['confidence']:.1%}"
    if spec.classes[target] != prediction["predicted_class"]:
        probability = next((k["probability"] for k in prediction["top_k"] if k["class"] == spec.classes[target]), None)
        caption = f"{spec.classes[target]} {'' if probability is None else f'{probability:.1%} '}(predicted: {caption})"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        _captioned(picture, caption).save(tmp, format="PNG")
    return {"image": str(image), "output": str(out), "explained_class": spec.classes[target],
            "predicted_class": prediction["predicted_class"], "confidence": prediction["confidence"],
            "top_k": prediction["top_k"]}
