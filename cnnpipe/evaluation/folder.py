"""The evaluation folder that evaluate writes and register, the KFP components and dvc.yaml read."""

from __future__ import annotations

METRICS_FILE = "metrics.json"  # {"val": {...}, "test": {...}, ...}: every score; register's tags
TRAINED_VAL = "val_trained"  # metrics.json's name for the val split of a model trained on it (train.train_on_val)
HEADLINE_FILE = "headline.json"  # tracking.HEADLINE_METRICS of metrics.json, nested: `dvc metrics show`
CALIBRATION_FILE = "calibration.json"  # {"temperature": T, ...}: cnnpipe.calibration; register packages it
CONFUSION_JSON = "confusion_matrix.json"  # {"categories", "matrix"}: KFP's ClassificationMetrics
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS_FILE = "predictions.csv"  # one actual,predicted row per test image: DVC's `confusion` template
MOST_CONFUSED_FILE = "most_confused.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"  # self-contained: KFP's HTML artifact


def per_class_file(split: str) -> str:
    return f"per_class_{split}.csv"
