"""The model as an ONNX file for CPU serving with ONNX Runtime: uint8 N x C x H x W in, probabilities out
(normalization, the calibration temperature and softmax inside the graph); the ModelSpec, the temperature and
the default top_k travel in its metadata, so the file alone is servable and no code comes with it."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnpipe.calibration import Calibration, answer, probabilities, tta_probabilities
from cnnpipe.engine.checkpoint import ModelSpec
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file
from cnnpipe.imaging import MAX_PIXELS, decode_images

SPEC_KEY, TOP_K_KEY, TEMPERATURE_KEY, FLIPS_KEY = "cnnpipe.spec", "cnnpipe.top_k", "cnnpipe.temperature", "cnnpipe.flips"
BATCH_SIZE = 256  # images per session run
TTA_TEMPERATURE_KEY = "cnnpipe.tta_temperature"  # applied to the TTA average outside the graph (OnnxPredictor)


class Probabilities(nn.Module):
    """uint8 images -> class probabilities, as Predictor.predict computes them."""

    def __init__(self, model: nn.Module, spec: ModelSpec, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model((images.float() / 255.0 - self.mean) / self.std), self.temperature)


def export_onnx(predictor: Predictor, top_k: int, output: Path) -> dict:
    """Write `predictor`'s model (with its temperature) as ONNX (dynamic batch); its spec, temperature and top_k
    as metadata."""
    import onnx

    spec, temperature = predictor.spec, predictor.calibration.temperature
    wrapped = Probabilities(predictor.model, spec, temperature).cpu().eval()
    example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    with atomic_file(output) as tmp, contextlib.redirect_stdout(sys.stderr):  # the exporter prints its steps
        program = torch.onnx.export(wrapped, (example,), input_names=["images"], output_names=["probabilities"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True)
        proto = program.model_proto
        for key, value in ((SPEC_KEY, json.dumps(asdict(spec))), (TOP_K_KEY, str(top_k)),
                           (TEMPERATURE_KEY, repr(temperature)),
                           (TTA_TEMPERATURE_KEY, json.dumps(predictor.calibration.tta_temperature)),
                           (FLIPS_KEY, json.dumps(predictor.calibration.flips))):
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))
    return {"onnx": str(output), "bytes": output.stat().st_size, "classes": len(spec.classes), "temperature": temperature}


class OnnxPredictor:
    """Predictor's decode and predict, on an ONNX Runtime CPU session; `tta` averages over the flips the file
    carries (off when none keeps or swaps a class)."""

    def __init__(self, path: Path | str, threads: int = 0, tta: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.spec = ModelSpec(**json.loads(meta[SPEC_KEY]))
            self.top_k = int(meta[TOP_K_KEY])
            # the temperature is applied inside the graph; kept to say which calibration this file serves
            self.calibration = Calibration(float(meta.get(TEMPERATURE_KEY, 1.0)), json.loads(meta.get(FLIPS_KEY, "null")),
                                           json.loads(meta.get(TTA_TEMPERATURE_KEY, "null")))
        except (KeyError, TypeError, ValueError) as e:
            raise CnnpipeError(f"'{path}': not an ONNX model written by `cnnpipe export onnx` ({e})") from None
        except Exception as e:  # onnxruntime's own exception types for unreadable files
            raise CnnpipeError(f"'{path}': not a readable ONNX model: {str(e).splitlines()[0]}") from None
        self.calibration.check(self.spec.num_classes, str(path))
        self.tta = tta and bool(self.calibration.tta_flips)

    def decode(self, images: list, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        return decode_images(images, self.spec.image_size, self.spec.in_channels, self.spec.resize, max_pixels)

    def predict(self, images: np.ndarray, top_k: int = 5) -> list[dict]:
        x = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2))

        def probs_of(view: np.ndarray) -> np.ndarray:  # in batches: the graph's activations grow with the batch
            return np.concatenate([self.session.run(None, {"images": view[i:i + BATCH_SIZE]})[0]
                                   for i in range(0, len(view), BATCH_SIZE)])
        probs = tta_probabilities(probs_of, x, self.calibration.tta_flips, self.calibration.tta_temperature) if self.tta \
            else probs_of(x)
        return answer(probs, self.spec.classes, top_k)
