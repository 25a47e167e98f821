"""The Kubeflow Pipelines v2 pipeline: ingest -> augment -> train -> evaluate -> register."""
