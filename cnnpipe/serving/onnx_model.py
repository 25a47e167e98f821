"""Export a torch model to the ONNX file that cnnpipe.serving.onnx_runtime serves without torch: uint8
N x C x H x W in, probabilities out (normalization, the calibration temperature and softmax inside the graph);
the ModelSpec, the calibration and the default top_k in its metadata."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnpipe.calibration import probabilities
from cnnpipe.engine.spec import ModelSpec
from cnnpipe.engine.inference import to_nchw_uint8
from cnnpipe.engine.predictor import Predictor
from cnnpipe.fsio import atomic_file
from cnnpipe.serving.onnx_runtime import FLIPS_KEY, SPEC_KEY, TEMPERATURE_KEY, TOP_K_KEY, TTA_TEMPERATURE_KEY



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


def registered_graph(predictor: Predictor, top_k: int, output: Path, images: np.ndarray,
                     tolerance: float = 1e-5) -> Path | None:
    """The ONNX graph `register` ships with a version (the torch-free serving path), checked to answer as
    `predictor` does on `images` (uint8 N x S x S x C: top-1 identical, probabilities within `tolerance`); None,
    with one line on stderr, when the model cannot be exported or its graph answers otherwise: the version then
    serves with torch only."""
    from cnnpipe.serving.onnx_runtime import OnnxPredictor

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the exporter's step-by-step report: the line below says it
            export_onnx(predictor, top_k, output)
        want = predictor.probabilities(to_nchw_uint8(images, predictor.device)).cpu().numpy()
        got = OnnxPredictor(output, threads=1).probabilities(images)
    except Exception as e:  # the exporter and ONNX Runtime raise many types (an unsupported operator, say)
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split(". ")[0].splitlines()
        print(f"register: {predictor.spec.arch} cannot be exported to ONNX ({type(e).__name__}"
              f"{': ' + why[0] if why else ''}): this version serves with torch only", file=sys.stderr)
        output.unlink(missing_ok=True)
        return None
    gap = float(np.abs(want - got).max())
    if gap > tolerance or (want.argmax(1) != got.argmax(1)).any():
        print(f"register: {predictor.spec.arch}'s ONNX graph answers differently from torch (probabilities up to "
              f"{gap:.2g} apart): not shipped; this version serves with torch only", file=sys.stderr)
        return None
    return output
