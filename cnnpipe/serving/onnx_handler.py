"""SageMaker's handler functions for the ONNX Runtime archive (`cnnpipe export sagemaker --backend onnxruntime`):
`export` copies this file into model.tar.gz as code/inference.py, beside model.onnx (the graph `register`
exported; its metadata holds classes, preprocessing and calibration) and the torch-free cnnpipe modules it imports.
The request bodies and answers are the contract's, the decoding and the answer the same code as every other
serving path. Needs numpy, Pillow and onnxruntime: no torch, so it runs in a lean container."""

from __future__ import annotations

import json
import os

from cnnpipe.serving.contract import check_top_k, input_fn, output_fn
from cnnpipe.serving.onnx_runtime import ONNX_FILE, OnnxPredictor

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn"]  # the four functions SageMaker's toolkit calls
SETTINGS_FILE = "serving.json"  # {"tta": bool}: what `export` chose


def model_fn(model_dir: str) -> OnnxPredictor:
    with open(os.path.join(model_dir, SETTINGS_FILE)) as f:
        settings = json.load(f)
    return OnnxPredictor(os.path.join(model_dir, ONNX_FILE), tta=bool(settings.get("tta")))


def predict_fn(input_data: dict, model: OnnxPredictor) -> list[dict]:
    classes = len(model.spec.classes)
    top_k = input_data["top_k"]
    top_k = check_top_k(top_k, classes) if top_k is not None else min(model.top_k, classes)
    return model.predict(model.decode(input_data["images"]), top_k)
