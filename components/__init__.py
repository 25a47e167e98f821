"""Kubeflow Pipelines v2 components: one per stage, each a thin call of the cnnpipe stage function."""
