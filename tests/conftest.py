import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"

# Keep tests independent of what lies in the home directory (Ray auth tokens, caches).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def small_config(**overrides):
    """A fast variant of configs/tiny.yaml for tests."""
    from pipeline.config import parse_config

    data = {"name": "test", "world": {"n_pairs": 300, "n_sft": 200},
            "model": {"small": {"vocab_size": 600}}}
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, "<test>")


def run_cli(*args, cwd=None, check=True, timeout=600):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
