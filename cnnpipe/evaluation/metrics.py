"""Classification metrics from logits and labels (scikit-learn for the per-class tables)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from cnnpipe.calibration import probabilities

ECE_BINS = 15


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins: count, mean confidence and accuracy of each (the reliability diagram)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(m.sum()),
                     "confidence": float(confidence[m].mean()) if m.any() else 0.0,
                     "accuracy": float(correct[m].mean()) if m.any() else 0.0})
    return out


def expected_calibration_error(bins: list[dict]) -> float:
    """Sum over bins of |accuracy - confidence|, weighted by the bin's share of the samples."""
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins)) if n else float("nan")


def most_confused(cm: np.ndarray, classes: list[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells: (true, predicted, count), most frequent first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    pairs = [np.unravel_index(i, off.shape) for i in flat]
    return [{"true": classes[t], "predicted": classes[p], "count": int(off[t, p])} for t, p in pairs if off[t, p] > 0]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                           temperature: float = 1.0) -> dict:
    """Scalar metrics, the per-class table, the confusion matrix (rows: true, columns: predicted),
    calibration bins and the most-confused pairs, of the probabilities a model with this temperature serves
    (`loss` is their negative log-likelihood)."""
    probs = probabilities(logits, temperature)
    confidence, predicted = probs.max(1)
    y_true, y_pred = labels.cpu().numpy(), predicted.cpu().numpy()
    conf = confidence.cpu().numpy()
    idx = np.arange(len(classes))
    k = min(5, len(classes))
    top5 = (logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(1).float().mean().item()
    bins = calibration_bins(conf, y_true == y_pred)
    scalars = {
        "accuracy": float((y_true == y_pred).mean()),
        "top5_accuracy": top5,
        "loss": F.cross_entropy(logits.float() / temperature, labels).item(),  # from logits: no log(0)
        "error_rate": float((y_true != y_pred).mean()),
        "ece": expected_calibration_error(bins),
    }
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=avg, zero_division=0)
        scalars |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=None, zero_division=0)
    per_class = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, c in enumerate(classes)]
    cm = confusion_matrix(y_true, y_pred, labels=idx)
    return {
        "scalars": scalars,
        "per_class": per_class,
        "confusion": cm,
        "most_confused": most_confused(cm, classes),
        "calibration": bins,
        "y_true": y_true,
        "y_pred": y_pred,
        "confidence": conf,
    }
