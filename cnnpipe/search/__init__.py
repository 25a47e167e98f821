"""Hyperparameter search around the pipeline: grids (sweep) and sampled studies (tune)."""
