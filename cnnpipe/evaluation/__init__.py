"""Metrics and figures of a trained model on a split."""
