"""A grpo_lag round on Ray, end to end: the small pipeline's run with its round switched to grpo_lag
and run again as a user resumes it, on the session's test cluster, whose actor table shows which
actors the round started (no critics)."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

ROUND_ACTORS = {"rollout-0": "RolloutWorker", "scorer-reward-0": "Scorer", "scorer-reference-0": "Scorer",
                "scorer-cost-0": "Scorer", "learner-policy-0": "Learner"}


@pytest.fixture(scope="module")
def grpo_round(small_pipeline, ray_cluster, tmp_path_factory):
    """The small pipeline's sft policy and fitted models, round 1 again with grpo_lag (3 steps, groups
    of 4 answers to 4 prompts); the actors it started are the actor table's new rows."""
    run = tmp_path_factory.mktemp("grpo_round") / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"].update(algorithm="grpo_lag", group_size=4, steps_per_round=3)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = {a["actor_id"] for a in ray_cluster.list_actors()}
    proc = run_cli("resume", "--run-dir", run, "--until", "safe_rlhf@1", env=ray_cluster.driver_env, timeout=1200)
    return {"run": run, "proc": proc, "actors": [a for a in ray_cluster.list_actors() if a["actor_id"] not in before]}


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
    assert "skip  fit_cost" in grpo_round["proc"].stderr  # only the round ran again: the fits are the small pipeline's
