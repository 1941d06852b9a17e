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


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """The world's tokenizer (one token per world word) and a small untrained Llama, as one HF directory."""
    from pipeline.config import SmallModelConfig
    from stages.model_factory import build_small_llama, train_tokenizer
    from stages.world import World

    out = tmp_path_factory.mktemp("small_model")
    tok = train_tokenizer(World().corpus(), 1536, out)
    build_small_llama(SmallModelConfig(vocab_size=1536), tok, out, seed=0)
    return out


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


SMALL_PIPELINE = {
    "name": "small",
    "world": {"n_pairs": 1000, "n_sft": 2000},
    "model": {"small": {"vocab_size": 1024}},
    "sft": {"epochs": 3, "lr": 3e-3, "checkpoint_every_steps": 50},
    "reward": {"epochs": 2, "checkpoint_every_steps": 10},
    "cost": {"epochs": 2, "checkpoint_every_steps": 10},
    "safe_rlhf": {"engine": "vllm", "rounds": [{"threshold": "auto", "lambda_init": 1.0, "lambda_lr": 0.5}],
                  "steps_per_round": 6, "prompts_per_step": 16, "max_new_tokens": 40, "actor_lr": 5e-5,
                  "critic_lr": 5e-5, "checkpoint_every_steps": 2, "max_num_seqs": 64},
    "ray": {"num_cpus": 2, "include_dashboard": False},
}
SMALL_STAGES = ["world", "ingest", "sft", "fit_reward", "fit_cost", "safe_rlhf@1", "evaluate", "report"]


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory):
    """One full small pipeline, run as a user runs it (`python -m pipeline run`, its own local
    Ray cluster); the CLI, fitting and resume tests read or copy its run directory."""
    import time

    root = tmp_path_factory.mktemp("small_pipeline")
    cfg = write_yaml(root / "small.yaml", SMALL_PIPELINE)
    t0 = time.time()
    proc = run_cli("run", "--config", cfg, "--run-dir", root / "run", timeout=1200)
    return {"config": cfg, "run_dir": root / "run", "proc": proc, "seconds": time.time() - t0}
