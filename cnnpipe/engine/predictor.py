"""Raw images in, classes out: a torch model with the preprocessing that training used and the calibration
evaluate fitted, travelling together. Evaluation scores through it (the served protocol), every torch serving
path answers through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnpipe.calibration import UNCALIBRATED, Calibration, answer, probabilities, tta_probabilities
from cnnpipe.engine.checkpoint import ModelSpec, load_model
from cnnpipe.engine.inference import predict_logits, stats_tensors, to_nchw_uint8
from cnnpipe.errors import CnnpipeError, RequestError
from cnnpipe.imaging import MAX_PIXELS, BoxedImage, decode_images


class Predictor:
    """A model with its preprocessing and calibration; `tta`: average over the calibration's flips (off when it
    has none that keep or swap a class)."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: torch.device,
                 calibration: Calibration = UNCALIBRATED, tta: bool = False):
        calibration.check(spec.num_classes, "calibration")
        self.model, self.spec, self.device, self.calibration = model, spec, device, calibration
        self.tta = tta and bool(calibration.tta_flips)
        self.mean, self.std = stats_tensors(spec.mean, spec.std, device)

    @classmethod
    def from_file(cls, path: Path | str, device: str = "cpu", calibration: Calibration = UNCALIBRATED,
                  tta: bool = False) -> Predictor:
        model, spec = load_model(path, device)
        return cls(model, spec, torch.device(device), calibration, tta)

    def decode(self, images: list[bytes | np.ndarray | BoxedImage], max_pixels: int = MAX_PIXELS) -> np.ndarray:
        return decode_images(images, self.spec.image_size, self.spec.in_channels, self.spec.resize, max_pixels)

    def preprocess(self, images: list[bytes | np.ndarray | BoxedImage]) -> np.ndarray:
        """What the server does to a request's images, with a CnnpipeError for a bad one."""
        try:
            return self.decode(images)
        except RequestError as e:
            raise CnnpipeError(str(e)) from None

    def predict(self, images: np.ndarray, top_k: int = 5) -> list[dict]:
        """uint8 N x S x S x C -> one dict per image: class, index, confidence and the top k."""
        return answer(self.probabilities(to_nchw_uint8(images, self.device)).cpu(), self.spec.classes, top_k)

    def probabilities(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """uint8 N x C x H x W -> the served probabilities: calibrated, averaged over the flips with TTA."""
        def probs_of(view: torch.Tensor) -> torch.Tensor:
            logits = predict_logits(self.model, view, self.mean, self.std, batch_size)
            return probabilities(logits, self.calibration.temperature)
        return tta_probabilities(probs_of, x, self.calibration.tta_flips, self.calibration.tta_temperature) if self.tta \
            else probs_of(x)
