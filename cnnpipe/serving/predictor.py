"""Raw images in, classes out: the preprocessing that training used, travelling with the model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnnpipe.engine.checkpoint import ModelSpec, load_model
from cnnpipe.engine.inference import predict_logits, stats_tensors, to_nchw_uint8
from cnnpipe.errors import CnnpipeError


class Predictor:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: torch.device):
        self.model, self.spec, self.device = model, spec, device
        self.mean, self.std = stats_tensors(spec.mean, spec.std, device)

    @classmethod
    def from_file(cls, path: Path | str, device: str = "cpu") -> Predictor:
        model, spec = load_model(path, device)
        return cls(model, spec, torch.device(device))

    def _to_pil(self, image: bytes | np.ndarray, i: int) -> Image.Image:
        if isinstance(image, (bytes, bytearray)):
            try:
                return Image.open(io.BytesIO(image))
            except (UnidentifiedImageError, OSError) as e:
                raise CnnpipeError(f"image {i}: not a readable image ({e})") from None
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
            raise CnnpipeError(f"image {i}: expected uint8 H x W [x 1|3|4], got {arr.dtype} {arr.shape}")
        return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)

    def preprocess(self, images: list[bytes | np.ndarray]) -> np.ndarray:
        """Decode, convert to the model's channels and resize: uint8 N x S x S x C."""
        size, mode = self.spec.image_size, ("L" if self.spec.in_channels == 1 else "RGB")
        out = np.empty((len(images), size, size, self.spec.in_channels), np.uint8)
        for i, image in enumerate(images):
            pil = self._to_pil(image, i)
            try:
                pil = pil.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            except (OSError, ValueError) as e:  # truncated data only fails when decoded
                raise CnnpipeError(f"image {i}: not a readable image ({e})") from None
            out[i] = np.asarray(pil).reshape(size, size, -1)
        return out

    def predict(self, images: np.ndarray, top_k: int = 5) -> list[dict]:
        """uint8 N x S x S x C -> one dict per image: class, index, confidence and the top k."""
        x = to_nchw_uint8(images, self.device)
        probs = predict_logits(self.model, x, self.mean, self.std).softmax(1).cpu()
        k = min(top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        rows = []
        for p_row, i_row in zip(top_p.tolist(), top_i.tolist()):
            rows.append({
                "predicted_class": self.spec.classes[i_row[0]],
                "predicted_class_index": int(i_row[0]),
                "confidence": float(p_row[0]),
                "top_k": [{"class": self.spec.classes[i], "index": int(i), "probability": float(p)}
                          for p, i in zip(p_row, i_row)],
            })
        return rows
