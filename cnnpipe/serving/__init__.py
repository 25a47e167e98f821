"""Prediction on raw images: the predictor (torch only) and its MLflow pyfunc wrapper."""
