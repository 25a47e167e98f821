"""Temperature scaling (Guo et al., 2017): one scalar T > 0 that minimizes the negative log-likelihood of
softmax(logits / T) on held-out logits. Argmax, hence accuracy, is unchanged; confidences are rescaled.

Written here (LBFGS over log T, so T stays positive) rather than taken from scikit-learn, whose temperature
scaling is private (`_TemperatureScaling`) and reachable only through CalibratedClassifierCV on an estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOG_T_BOUND = 5.0  # T within [e^-5, e^5]: beyond that the logits carry no usable confidence


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimizing the NLL of softmax(logits / T) against `labels`; 1 when every prediction is right (the
    NLL then falls as T -> 0: no error to calibrate against, and a vanishing T would make every answer certain)."""
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
