#!/usr/bin/env bash
# Create .venv and install cnnpipe (editable) with DVC, MLflow, kfp, torch and the test tools.
# Safe to re-run: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's warnings about this machine's unused local indexes are noise; errors still show
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
# Katib's SDK pins protobuf<5 (kfp and mlflow need 6); its API models, all `compile --tune` uses, work with 6
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt kubeflow-katib 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/cnnpipe --version
