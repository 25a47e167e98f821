#!/usr/bin/env bash
# Create .venv and install cnnpipe (editable) with DVC, MLflow, kfp, torch and the test tools.
# Safe to re-run: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's warnings about this machine's unused local indexes are noise; errors still show. --no-compile, then one
# compileall on every core: pip compiles the ~23k files on one (2-core AVX2 VM, 2026-12-05: 240 s -> 147 + 43 s).
.venv/bin/pip install --quiet --no-compile --disable-pip-version-check -c constraints.txt -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
# Katib's SDK pins protobuf<5 (kfp and mlflow need 6); its API models, all `compile --tune` uses, work with 6
.venv/bin/pip install --quiet --no-compile --disable-pip-version-check --no-deps -c constraints.txt kubeflow-katib 2> >(grep -v "^WARNING: Location" >&2)
# torch ships one test helper in Python 3.12's syntax (pip skips it too); any other file that fails is named
.venv/bin/python -m compileall -q -j 0 -x "torch/testing/_internal/py312_" .venv/lib/python*/site-packages \
  || echo "setup: some installed files could not be compiled (above); they still import, more slowly" >&2
.venv/bin/cnnpipe --version
