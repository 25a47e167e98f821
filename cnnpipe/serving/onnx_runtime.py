"""The ONNX file `cnnpipe export onnx` and `register` write, run with ONNX Runtime: uint8 N x C x H x W in,
probabilities out (normalization, the calibration temperature and softmax inside the graph). The ModelSpec,
the calibration and the default top_k travel in its metadata, so the file alone is servable, no code comes with
it, and serving it needs no torch: this module imports only numpy, onnxruntime and cnnpipe's torch-free modules
(the same decoding and answer as the torch Predictor)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnpipe.calibration import Calibration, answer, tta_probabilities
from cnnpipe.engine.spec import ModelSpec
from cnnpipe.errors import CnnpipeError
from cnnpipe.imaging import MAX_PIXELS, decode_images

SPEC_KEY, TOP_K_KEY, TEMPERATURE_KEY, FLIPS_KEY = "cnnpipe.spec", "cnnpipe.top_k", "cnnpipe.temperature", "cnnpipe.flips"
TTA_TEMPERATURE_KEY = "cnnpipe.tta_temperature"  # applied to the TTA average outside the graph (OnnxPredictor)
ONNX_FILE = "model.onnx"  # the graph's name in a registered version (artifact verified_model.ONNX) and a served folder
BATCH_SIZE = 256  # images per session run


class OnnxPredictor:
    """Predictor's decode and predict, on an ONNX Runtime CPU session; `tta` averages over the flips the file
    carries (off when none keeps or swaps a class)."""

    def __init__(self, path: Path | str, threads: int = 0, tta: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        self.path = Path(path)
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
        """uint8 N x S x S x C -> one dict per image: class, index, confidence and the top k."""
        return answer(self.probabilities(images), self.spec.classes, top_k)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x C -> the served probabilities: calibrated, averaged over the flips with TTA."""
        x = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2))

        def probs_of(view: np.ndarray) -> np.ndarray:  # in batches: the graph's activations grow with the batch
            return np.concatenate([self.session.run(None, {"images": np.ascontiguousarray(view[i:i + BATCH_SIZE])})[0]
                                   for i in range(0, len(view), BATCH_SIZE)])
        return tta_probabilities(probs_of, x, self.calibration.tta_flips, self.calibration.tta_temperature) if self.tta \
            else probs_of(x)
