"""A grpo_lag round on Ray, end to end on a tiny world: the pipeline as a user runs it, joined to a
test cluster whose actor table shows which actors the round started (no critics)."""
import json
from pathlib import Path

import pytest

from tests.conftest import RayTestCluster, run_cli, write_yaml

pytestmark = pytest.mark.slow

GRPO = {
    "name": "grpo",
    "world": {"n_pairs": 300, "n_sft": 200},
    "model": {"small": {"vocab_size": 600}},
    "sft": {"epochs": 1, "lr": 3e-3},
    "reward": {"epochs": 1},
    "cost": {"epochs": 1},
    "safe_rlhf": {"algorithm": "grpo_lag", "group_size": 4, "engine": "vllm", "max_num_seqs": 16, "steps_per_round": 3,
                  "prompts_per_step": 8, "max_new_tokens": 16, "actor_lr": 5e-5, "checkpoint_every_steps": 2,
                  "rounds": [{"threshold": "auto", "lambda_init": 1.0, "lambda_lr": 0.5}]},
}
ROUND_ACTORS = {"rollout-0": "RolloutWorker", "scorer-reward-0": "Scorer", "scorer-reference-0": "Scorer",
                "scorer-cost-0": "Scorer", "learner-policy-0": "Learner"}


@pytest.fixture(scope="module")
def grpo_round(tmp_path_factory):
    """world -> ingest -> sft -> fits -> safe_rlhf@1 with grpo_lag, on a Ray cluster of the test's own."""
    root = tmp_path_factory.mktemp("grpo_round")
    cluster = RayTestCluster(root / "ray")
    try:
        cfg = write_yaml(root / "grpo.yaml", GRPO)
        proc = run_cli("run", "--config", cfg, "--run-dir", root / "run", "--until", "safe_rlhf@1",
                       env=cluster.driver_env, timeout=1200)
        yield {"run": root / "run", "proc": proc, "actors": cluster.list_actors()}
    finally:
        cluster.stop()


def test_grpo_lag_round_starts_no_critic(grpo_round):
    named = {a["name"]: a["class_name"] for a in grpo_round["actors"] if a["name"]}
    round_actors = {n: c for n, c in named.items() if n.split("-")[0] in ("rollout", "scorer", "learner")}
    assert round_actors == ROUND_ACTORS  # five processes: no reward or cost critic learner ever started
    assert not [n for n in named if "critic" in n]


def test_grpo_lag_round_trains_a_policy_with_a_moving_lambda(grpo_round):
    stage = Path(grpo_round["run"]) / "stages" / "safe_rlhf@1"
    assert (stage / "policy" / "model.safetensors").exists()
    steps = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert {"reward_mean", "cost_mean", "lambda", "episode_cost", "policy_loss", "kl", "threshold"} <= set(steps[0])
    assert not {"reward_critic_loss", "cost_critic_loss"} & set(steps[0])
    # the four answers to one prompt differ (vLLM samples each request with its own seed): groups have spread
    assert all(m["reward_group_std"] > 0 for m in steps)
    assert len({m["lambda"] for m in steps}) == 3  # lambda moves every step (lambda_lr 0.5)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 3 and "lambda" in manifest["metrics"]
    assert "round 1: grpo_lag" in grpo_round["proc"].stderr
