#!/usr/bin/env bash
# Create .venv and install cnnpipe (editable) with DVC, MLflow, kfp, torch and the test tools.
# Safe to re-run: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's warnings about this machine's unused local indexes are noise; errors still show. --no-compile and one
# compileall over both cores afterwards: pip compiles ~23k files on one core (240 s -> 147 + 43 s here, 2 cores).
.venv/bin/pip install --quiet --no-compile --disable-pip-version-check -c constraints.txt -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
# Katib's SDK pins protobuf<5 (kfp and mlflow need 6); its API models, all `compile --tune` uses, work with 6
.venv/bin/pip install --quiet --no-compile --disable-pip-version-check --no-deps -c constraints.txt kubeflow-katib 2> >(grep -v "^WARNING: Location" >&2)
# Best effort, as pip's own: a file in a newer Python's syntax (torch ships one for 3.12) stays source-only
.venv/bin/python -m compileall -qq -j 0 .venv/lib/python*/site-packages || true
.venv/bin/cnnpipe --version
