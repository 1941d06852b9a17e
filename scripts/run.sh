#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole pipeline on the default config (configs/tiny.yaml)
# on a local Ray cluster. Extra arguments go to `python -m pipeline run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline run "$@"
