#!/usr/bin/env bash
# Run the parity tests against the last transformers 4.x (4.57.6) in .venv-tf4.
# Idempotent: the venv is built once. Not run in CI. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-tf4
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  # torch pinned first so nothing pulls a CUDA build; transformers 4.x with the same torch
  printf 'torch==2.13.0\ntransformers==4.57.6\n' > "$VENV/constraints.txt"
  "$VENV/bin/pip" install --quiet -c "$VENV/constraints.txt" torch
  "$VENV/bin/pip" install --quiet -c "$VENV/constraints.txt" transformers numpy pytest accelerate
fi
# the library from this checkout, never an installed copy
PYTHONPATH="$PWD" exec "$VENV/bin/python" -m pytest -q -m "not real_model" \
  tests/test_parity_transformers.py tests/test_more_methods.py tests/test_families.py "$@"
