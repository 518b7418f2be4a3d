#!/usr/bin/env bash
# Run the parity suite (transformers' rope functions and native-config logits,
# the new methods, every family, the config round trip) against the last
# transformers 4.x, 4.57.6, in .venv-tf4 (gitignored). Idempotent: the venv is
# built on the first run and only checked afterwards (a stamp records what was
# installed; a half-built venv is completed). Not run in CI. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-tf4
PINS='torch==2.13.0
transformers==4.57.6
tokenizers==0.22.2
safetensors==0.8.0
huggingface_hub==0.36.2
accelerate==1.16.0
numpy==2.4.6
pytest==9.2.0'
STAMP=$VENV/.rope_ntk_tf4
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$PINS" ]; then
  printf '%s\n' "$PINS" > "$VENV/constraints.txt"
  # torch first and pinned, so nothing can pull a CUDA build; then transformers 4.x with that torch
  "$VENV/bin/pip" install --quiet -c "$VENV/constraints.txt" torch
  "$VENV/bin/pip" install --quiet -c "$VENV/constraints.txt" transformers numpy pytest accelerate
  printf '%s\n' "$PINS" > "$STAMP"
fi
# the library from this checkout, never an installed copy; one torch thread (tests/conftest.py)
PYTHONPATH="$PWD" exec "$VENV/bin/python" -m pytest -q -m "not real_model" -p no:cacheprovider \
  tests/test_parity_transformers.py tests/test_more_methods.py tests/test_families.py tests/test_roundtrip.py "$@"
