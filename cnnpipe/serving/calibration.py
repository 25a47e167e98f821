"""The calibration a served model applies: the temperature T that `evaluate` fitted on the validation split
(probabilities are softmax(logits / T), contract.probabilities).

It travels with the model: `evaluate` writes it into its own folder (evaluation.folder.CALIBRATION_FILE), never
into train's; `register` packages that file as an artifact of the pyfunc model (and records T as a version
tag); the ONNX and SageMaker exports carry T in their metadata. A bare train folder has none: T = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import read_json, write_json

ARTIFACT = "calibration"  # the pyfunc's artifact key of the calibration file
TEMPERATURE_TAG = "cnnpipe.temperature"  # the registered version's tag


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0  # 1: uncalibrated

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature: expected a finite number > 0, got {t!r}")

    @classmethod
    def read(cls, path: Path | str) -> Calibration:
        """The calibration file `evaluate` wrote; a CnnpipeError naming the file when it is not one."""
        d = read_json(path, "calibration file (of `cnnpipe evaluate`)")
        try:
            return cls(d["temperature"])
        except (KeyError, TypeError, ValueError) as e:
            raise CnnpipeError(f"calibration file '{path}': expected {{\"temperature\": T > 0}} ({e})") from None

    def write(self, path: Path | str, **facts: object) -> None:
        """The file, with `facts` (how T was fitted) beside the temperature for people; readers take T only."""
        write_json(path, {"temperature": self.temperature, **facts})


UNCALIBRATED = Calibration()  # T = 1: a bare train folder, or a version registered before calibration existed
