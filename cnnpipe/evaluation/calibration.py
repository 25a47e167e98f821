"""Temperature scaling (Guo et al., 2017): one scalar T > 0 that minimizes the negative log-likelihood of
softmax(logits / T) on held-out logits. Argmax, hence accuracy, is unchanged; confidences are rescaled.

Written here (LBFGS over log T, so T stays positive) rather than taken from scikit-learn, whose temperature
scaling is private (`_TemperatureScaling`) and reachable only through CalibratedClassifierCV on an estimator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnpipe.serving.contract import tta_average

LOG_T_BOUND = 5.0  # T within [e^-5, e^5]: beyond that the logits carry no usable confidence


def _minimize_nll(nll_at: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The T > 0 minimizing `nll_at(T)`: LBFGS over log T from T = 1, clamped to [e^-5, e^5]."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll_at(log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(-LOG_T_BOUND, LOG_T_BOUND).exp())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimizing the NLL of softmax(logits / T) against `labels`; 1 when every prediction is right (the
    NLL then falls as T -> 0: no error to calibrate against, and a vanishing T would make every answer certain)."""
    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()
    if bool((logits.argmax(1) == labels).all()):
        return 1.0
    return _minimize_nll(lambda t: F.cross_entropy(logits / t, labels))


def fit_tta_temperature(view_logits: list[torch.Tensor], labels: torch.Tensor, flips: dict[str, list[int]]) -> float:
    """The T minimizing the NLL of the TTA-averaged probabilities (contract.tta_average of every view's
    softmax(logits / T); `view_logits` in contract.tta_views' order). Averaging views that disagree softens the
    answer, so the plain T leaves TTA underconfident. 1 when every averaged prediction is right, as above."""
    view_logits = [z.detach().double().cpu() for z in view_logits]
    labels = labels.detach().cpu()

    def nll_at(t: torch.Tensor) -> torch.Tensor:
        probs = tta_average([(z / t).softmax(1) for z in view_logits], flips)
        return F.nll_loss(probs.clamp_min(1e-300).log(), labels)

    with torch.no_grad():
        if bool((tta_average([z.softmax(1) for z in view_logits], flips).argmax(1) == labels).all()):
            return 1.0
    return _minimize_nll(nll_at)
