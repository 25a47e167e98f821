"""Training and inference; imports no MLflow, so it runs on a bare GPU box."""
