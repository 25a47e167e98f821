"""Classification metrics from logits and labels (scikit-learn for the per-class tables)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Scalar metrics, the per-class table and the confusion matrix (rows: true, columns: predicted)."""
    y_true = labels.cpu().numpy()
    y_pred = logits.argmax(1).cpu().numpy()
    idx = np.arange(len(classes))
    k = min(5, len(classes))
    top5 = (logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(1).float().mean().item()
    scalars = {
        "accuracy": float((y_true == y_pred).mean()),
        "top5_accuracy": top5,
        "loss": F.cross_entropy(logits, labels).item(),
        "error_rate": float((y_true != y_pred).mean()),
    }
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=avg, zero_division=0)
        scalars |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=None, zero_division=0)
    per_class = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, c in enumerate(classes)]
    return {
        "scalars": scalars,
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=idx),
        "y_true": y_true,
        "y_pred": y_pred,
    }
