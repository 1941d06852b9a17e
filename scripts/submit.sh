#!/usr/bin/env bash
# Submits `python -m pipeline ARGS...` as a Ray job to a running cluster (default address
# http://127.0.0.1:8265), in token mode when a Ray token is at hand, with no environment set by hand.
#   bash scripts/submit.sh [--address URL] [--no-wait] -- run --config configs/tiny.yaml --run-dir /shared/runs/tiny
# Prints the job id and the dashboard page; without --no-wait follows the job's log and exits with
# the pipeline's exit code. See `python -m pipeline submit --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline submit "$@"
