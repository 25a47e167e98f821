"""What a served model applies beyond its weights, as `evaluate` found it: the temperature T fitted on the
validation split (probabilities are softmax(logits / T), contract.probabilities), and the class-aware flip
tables of the augment policy the model was trained with, the views test-time augmentation averages
(contract.tta_probabilities; used when serving asks for TTA).

It travels with the model: `evaluate` writes it into its own folder (evaluation.folder.CALIBRATION_FILE), never
into train's; `register` packages that file as an artifact of the pyfunc model (and records T as a version
tag); the ONNX and SageMaker exports carry it in their metadata. A bare train folder has none: T = 1, no TTA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import read_json, write_json
from cnnpipe.serving.contract import FLIP_DIMS, usable_flips

ARTIFACT = "calibration"  # the pyfunc's artifact key of the calibration file
TEMPERATURE_TAG = "cnnpipe.temperature"  # the registered version's tag


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0  # 1: uncalibrated
    flips: dict[str, list[int]] | None = None  # name (hflip, vflip, rot180) -> class after the flip, -1 = never
    # TTA's own: softmax(log(the views' average) / tta_temperature); averaging views that disagree softens the
    # answer, which the views' T cannot undo (None: 1, a file from before it was fitted)
    tta_temperature: float | None = None

    def __post_init__(self) -> None:
        for name in ("temperature",) if self.tta_temperature is None else ("temperature", "tta_temperature"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"{name}: expected a finite number > 0, got {t!r}")
        for name, table in (self.flips or {}).items():
            if name not in FLIP_DIMS or not isinstance(table, list) or \
                    not all(isinstance(c, int) and not isinstance(c, bool) and c >= -1 for c in table):
                raise ValueError(f"flips: expected {'/'.join(FLIP_DIMS)} -> a list of class indices (-1 = never "
                                 f"flipped), got {name!r}")

    @property
    def tta_flips(self) -> dict[str, list[int]]:
        """The flips test-time augmentation can use ({}: none, TTA is not possible)."""
        return usable_flips(self.flips)

    def check(self, num_classes: int, where: str) -> None:
        """A CnnpipeError when the flip tables do not fit a model of `num_classes` classes."""
        for name, table in (self.flips or {}).items():
            if len(table) != num_classes or max(table, default=-1) >= num_classes:
                raise CnnpipeError(f"{where}: flip table {name!r} does not fit a model of {num_classes} classes")

    @classmethod
    def read(cls, path: Path | str) -> Calibration:
        """The calibration file `evaluate` wrote; a CnnpipeError naming the file when it is not one."""
        d = read_json(path, "calibration file (of `cnnpipe evaluate`)")
        try:
            return cls(d["temperature"], d.get("flips"), d.get("tta_temperature"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CnnpipeError(f"calibration file '{path}': expected {{\"temperature\": T > 0, \"flips\": ..., "
                               f"\"tta_temperature\": T > 0 or null}} "
                               f"({e})") from None

    def write(self, path: Path | str, **facts: object) -> None:
        """The file, with `facts` (how it was found) beside it for people; readers take temperature and flips."""
        write_json(path, {"temperature": self.temperature, "flips": self.flips, "tta_temperature": self.tta_temperature,
                          **facts})


UNCALIBRATED = Calibration()  # T = 1, no flips: a bare train folder, or a version registered before calibration
