# cnnpipe's image: every Kubeflow Pipelines component runs in it, and `cnnpipe` is its CLI.
# Build once, push, and name it when compiling: CNNPIPE_IMAGE=<registry>/cnnpipe:<tag> cnnpipe pipeline compile
#
# BASE_IMAGE: any image with Python >= 3.11 and its venv module. The default is the official one;
# container/build.sh builds a Debian base with debootstrap where no registry is reachable.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# EXTRAS: which of pyproject's extras the image carries. `all` (the default) is the components' image;
# `serve,mlflow` is a torch serving image: the model, the HTTP server and the registry client, no DVC, kfp,
# scikit-learn or matplotlib; `serve-onnx` the lean one: ONNX Runtime on the graph register exported, no torch
# (`cnnpipe serve --backend onnxruntime --host 0.0.0.0 --model <the version's folder or models:/ URI>`).
# Their requirement list is read from pyproject.toml in a stage of its own: the dependency layer copies the list,
# whose content is its cache key, so an edit elsewhere in pyproject.toml (the dev extra, pytest's settings) does
# not reinstall torch (~5 minutes of a 2-core build).
FROM ${BASE_IMAGE} AS requirements
ARG EXTRAS=all
COPY pyproject.toml container/requirements.py /tmp/cnnpipe/
RUN python3 /tmp/cnnpipe/requirements.py "$EXTRAS" /tmp/cnnpipe/pyproject.toml > /tmp/cnnpipe/requirements.txt

FROM ${BASE_IMAGE}

# A venv first on PATH: KFP runs plain `python3`, and a distribution's system Python refuses pip
# installs (PEP 668). No .pyc written at run time by read-only pods; no git needed by MLflow.
RUN python3 -m venv /opt/cnnpipe
ENV PATH=/opt/cnnpipe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    GIT_PYTHON_REFRESH=quiet \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

# Dependencies first, pinned by constraints.txt (torch, when an extra needs it, with its CUDA libraries),
# so changing cnnpipe's code rebuilds only the small layer below. pip's cache is a cache mount: never in
# the image (BuildKit also keeps it between builds).
COPY constraints.txt /tmp/cnnpipe/
COPY --from=requirements /tmp/cnnpipe/requirements.txt /tmp/cnnpipe/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /tmp/cnnpipe/constraints.txt -r /tmp/cnnpipe/requirements.txt

COPY pyproject.toml README.md /tmp/cnnpipe/
COPY cnnpipe /tmp/cnnpipe/cnnpipe
COPY components /tmp/cnnpipe/components
COPY pipeline /tmp/cnnpipe/pipeline
RUN pip install --no-cache-dir --no-deps /tmp/cnnpipe && rm -rf /tmp/cnnpipe \
 && python3 -c "import cnnpipe.cli" \
 && cnnpipe --version

# the project's defaults, so `cnnpipe serve` / `predict` run in /workspace without a params.yaml of the user's
COPY params.yaml /workspace/params.yaml
WORKDIR /workspace
CMD ["cnnpipe", "--help"]
