"""Raw images in, classes out: the preprocessing that training used, travelling with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnpipe.engine.checkpoint import ModelSpec, load_model
from cnnpipe.engine.inference import predict_logits, stats_tensors, to_nchw_uint8
from cnnpipe.errors import CnnpipeError
from cnnpipe.serving.contract import RequestError, answer, to_array


class Predictor:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: torch.device):
        self.model, self.spec, self.device = model, spec, device
        self.mean, self.std = stats_tensors(spec.mean, spec.std, device)

    @classmethod
    def from_file(cls, path: Path | str, device: str = "cpu") -> Predictor:
        model, spec = load_model(path, device)
        return cls(model, spec, torch.device(device))

    def preprocess(self, images: list[bytes | np.ndarray]) -> np.ndarray:
        """Decode, convert to the model's channels and resize: uint8 N x S x S x C."""
        size, channels = self.spec.image_size, self.spec.in_channels
        try:
            return np.stack([to_array(img, size, channels, i, self.spec.resize) for i, img in enumerate(images)])
        except RequestError as e:
            raise CnnpipeError(str(e)) from None

    def predict(self, images: np.ndarray, top_k: int = 5) -> list[dict]:
        """uint8 N x S x S x C -> one dict per image: class, index, confidence and the top k."""
        x = to_nchw_uint8(images, self.device)
        probs = predict_logits(self.model, x, self.mean, self.std).softmax(1).cpu()
        return answer(probs, self.spec.classes, top_k)
