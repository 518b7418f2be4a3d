#!/usr/bin/env bash
# The main job: set up (idempotent), then sweep methods x lengths for
# perplexity and passkey on the bundled model and text. Re-running resumes.
# Extra arguments go to eval/sweep.py (see --help), e.g. --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python eval/sweep.py "$@"
