"""What a served model applies beyond its weights, and the maths of it, in one place.

- Temperature scaling (Guo et al., 2017): one scalar T > 0, fitted by `evaluate` on the validation split's
  logits (NLL), and served as softmax(logits / T). Argmax, hence accuracy, is unchanged.
- Test-time augmentation over the class-aware flip tables of the augment policy the model was trained with:
  the views' probabilities averaged per class, with TTA's own temperature on the log of the average.
- The answer: each image's class, confidence and top k, the same dict from every server.
- `Calibration`: T, the flips and TTA's T as they travel with the model. `evaluate` writes it into its own
  folder (evaluation.folder.CALIBRATION_FILE); `register` packages the file with the pyfunc model and records T
  as a version tag; the ONNX and SageMaker exports carry it in their metadata. A bare train folder has none.

Torch-free at import: the maths take numpy arrays or torch tensors (and give back the same kind), so the lean
ONNX Runtime server and SageMaker's handler use this very file; only `fit_temperature` (evaluate) needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.errors import CnnpipeError, RequestError
from cnnpipe.fsio import read_json, write_json

ARTIFACT = "calibration"  # the pyfunc's artifact key of the calibration file
TEMPERATURE_TAG = "cnnpipe.temperature"  # the registered version's tag
LOG_T_BOUND = 5.0  # T within [e^-5, e^5]: beyond that the logits carry no usable confidence
FLIP_DIMS = {"hflip": (-1,), "vflip": (-2,), "rot180": (-2, -1)}  # the augment policy's flips: N x C x H x W dims


def _is_torch(a: Any) -> bool:  # noqa: ANN401 - an array of either kind
    return hasattr(a, "detach")


def probabilities(logits: Any, temperature: float = 1.0) -> Any:  # noqa: ANN401 - N x C numpy array or torch tensor
    """Class probabilities of the served model: softmax(logits / T), T the temperature evaluate fitted on the
    validation split (1: uncalibrated). Every path from logits to an answer goes through here (torch, the ONNX
    graph, pyfunc, SageMaker's handler); a positive T never changes the argmax."""
    if _is_torch(logits):
        return (logits.float() / temperature).softmax(1)
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def usable_flips(flips: dict | None) -> dict[str, list[int]]:
    """The flip tables that keep or swap at least one class (entry c: the class an image of class c becomes
    when flipped, -1: never flipped): the views test-time augmentation may add."""
    return {name: list(table) for name, table in (flips or {}).items()
            if name in FLIP_DIMS and any(t >= 0 for t in table)}


def tta_probabilities(probs_of: Callable[[Any], Any], x: Any, flips: dict[str, list[int]],  # noqa: ANN401
                      temperature: float | None = None) -> Any:  # noqa: ANN401
    """Test-time augmentation over class-aware flips: `probs_of` (N x C x H x W images -> N x K probabilities)
    of the original view and of each flipped view. A flipped view's probability of class table[c] is its vote
    for class c of the original (a swap pair's columns are permuted back); each class averages the views in
    which it is defined (table[c] >= 0; the original always), and the result is renormalized.

    Views that disagree soften the average, so it has its own temperature (evaluate fits it on val, None: 1):
    softmax(log(average) / temperature), which never moves the argmax. `x` and the result: numpy or torch alike."""
    def as_numpy(p: Any) -> np.ndarray:  # noqa: ANN401
        return p.detach().cpu().double().numpy() if _is_torch(p) else np.asarray(p, dtype=np.float64)

    total = as_numpy(probs_of(x))
    views = np.ones_like(total)
    for name, table in usable_flips(flips).items():
        index = np.asarray(table)
        kept = (index >= 0).astype(np.float64)
        view = x.flip(FLIP_DIMS[name]) if _is_torch(x) else np.ascontiguousarray(np.flip(x, FLIP_DIMS[name]))
        total = total + as_numpy(probs_of(view))[:, index.clip(min=0)] * kept
        views = views + kept
    mean = total / views
    mean = mean / mean.sum(1, keepdims=True)
    out = mean if temperature is None else probabilities(np.log(np.maximum(mean, 1e-30)), temperature)
    if _is_torch(x):
        import torch

        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
    return np.asarray(out, dtype=np.float32)


def answer(probs, classes: list[str], top_k: int) -> list[dict]:  # noqa: ANN001 - N x C numpy array or torch tensor
    """One dict per image: class, index, confidence and the k most probable classes (ties: the lower index)."""
    if top_k < 1:  # one check for every way in: query, params, pyfunc, SageMaker
        raise RequestError(f"top_k: expected an integer >= 1, got {top_k}")
    p = np.asarray(probs.detach().cpu().float() if hasattr(probs, "detach") else probs, dtype=np.float32)
    top_i = np.argsort(-p, axis=1, kind="stable")[:, :min(top_k, p.shape[1])]
    top_p = np.take_along_axis(p, top_i, 1)
    return [{"predicted_class": classes[i_row[0]], "predicted_class_index": int(i_row[0]), "confidence": float(p_row[0]),
             "top_k": [{"class": classes[i], "index": int(i), "probability": float(q)} for q, i in zip(p_row, i_row)]}
            for p_row, i_row in zip(top_p.tolist(), top_i.tolist())]


def fit_temperature(logits: Any, labels: Any) -> float:  # noqa: ANN401 - N x C and N torch tensors
    """The T minimizing the NLL of softmax(logits / T) against `labels`; 1 when every prediction is right (the
    NLL then falls as T -> 0: no error to calibrate against, and a vanishing T would make every answer certain).

    LBFGS over log T (so T stays positive) rather than scikit-learn, whose temperature scaling is private
    (`_TemperatureScaling`) and reachable only through CalibratedClassifierCV on an estimator."""
    import torch
    import torch.nn.functional as F

    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()
    if bool((logits.argmax(1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().clamp(-LOG_T_BOUND, LOG_T_BOUND).exp())


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

    @classmethod
    def fit(cls, val_logits: Any, val_labels: Any, flips: dict | None, averaged_of: Callable[[Calibration], Any],  # noqa: ANN401
            calibrate: bool = True) -> Calibration:
        """T from the validation split's logits (1 without `calibrate`); with usable flips, TTA's own T from the log
        of `averaged_of(calibration)`, the views' averaged probabilities of val under the plain calibration."""
        calibration = cls(fit_temperature(val_logits, val_labels) if calibrate else 1.0, flips)
        if not (calibrate and calibration.tta_flips):
            return calibration
        averaged = averaged_of(calibration)
        return cls(calibration.temperature, flips, fit_temperature(averaged.clamp_min(1e-30).log(), val_labels))

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
                               f"\"tta_temperature\": T > 0 or null}} ({e})") from None

    def write(self, path: Path | str, **facts: object) -> None:
        """The file, with `facts` (how it was found) beside it for people; readers take temperature and flips."""
        write_json(path, {"temperature": self.temperature, "flips": self.flips, "tta_temperature": self.tta_temperature,
                          **facts})


UNCALIBRATED = Calibration()  # T = 1, no flips: a bare train folder, or a version registered before calibration
