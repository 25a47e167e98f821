"""The MLflow pyfunc model: a DataFrame column `image` (base64 PNG/JPEG/PPM; optionally a `box` column,
[x1, y1, x2, y2] or null per row) or uint8 arrays in."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from cnnpipe import calibration
from cnnpipe.calibration import UNCALIBRATED, Calibration
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.serving.contract import RequestError, decode_value, with_box
from cnnpipe.serving.trusted import CHECKPOINT

EXPECTED_SHAPES = ('Expected a column "image" of base64 PNG/JPEG/PPM/BMP/WebP images or uint8 H x W [x C] pixel '
                   'arrays, e.g. {"dataframe_split": {"columns": ["image"], "data": [[b64], ...]}}, '
                   '{"instances": [b64, ...]} or {"inputs": {"image": [b64, ...]}}')


def _decode(value: Any, box: Any, i: int) -> Any:
    try:
        return with_box(decode_value(value, i), None if box is None or _is_na(box) else box, i)
    except RequestError as e:
        raise CnnpipeError(str(e)) from None


def _is_na(value: Any) -> bool:
    return np.ndim(value) == 0 and bool(pd.isna(value))


def to_images(model_input: Any) -> list[bytes | np.ndarray]:
    """The raw images in `model_input`: a DataFrame with an `image` column, or a uint8 N x H x W x C array."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise CnnpipeError(f"input: expected a column 'image', got {list(model_input.columns)}")
        # `mlflow models serve` turns {"instances": [b64, ...]} and {"inputs": {"image": [b64, ...]}} into
        # one row holding the whole list: a cell of texts is that many images (boxes need the column form)
        boxes = model_input["box"] if "box" in model_input.columns else [None] * len(model_input)
        items = []
        for cell, box in zip(model_input["image"], boxes):
            if isinstance(cell, (list, np.ndarray)) and len(cell) and all(isinstance(x, str) for x in cell):
                items += [(v, None) for v in cell]
            else:
                items.append((cell, box))
        return [_decode(v, b, i) for i, (v, b) in enumerate(items)]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype != np.uint8 or model_input.ndim not in (3, 4):
            raise CnnpipeError(f"input: expected a uint8 N x H x W [x C] array, got {model_input.dtype} {model_input.shape}")
        return list(model_input)
    raise CnnpipeError(f"input: expected a DataFrame with an 'image' column or a uint8 array, got {type(model_input).__name__}")


def predict_frame(predictor: Predictor, model_input: Any, top_k: int = 5) -> pd.DataFrame:
    """One row per image: predicted_class, predicted_class_index, confidence, top_k."""
    return pd.DataFrame(predictor.predict(predictor.preprocess(to_images(model_input)), top_k=top_k))


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Holds no state when logged: the model file and its calibration come in as artifacts at load time."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        found = context.artifacts.get(calibration.ARTIFACT)  # absent in versions registered before calibration
        self.predictor = Predictor.from_file(context.artifacts[CHECKPOINT],
                                             calibration=Calibration.read(found) if found else UNCALIBRATED)

    # model_input is left unannotated: MLflow reads a type hint there as a schema of its own (it then
    # warns once that hints are missing; the logged signature does that job)
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input,  # noqa: ANN001
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        try:
            return predict_frame(self.predictor, model_input, int((params or {}).get("top_k", 5)))
        except CnnpipeError as e:  # MLflow's scoring server shows an MlflowException's text, not others'
            raise MlflowException.invalid_parameter_value(f"{e}. {EXPECTED_SHAPES}") from None
