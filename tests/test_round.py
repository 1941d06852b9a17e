"""A Safe RLHF round on Ray: vLLM rollout workers, scorers, DeepSpeed learners, PPO-Lagrangian."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

STEP_METRICS = {"reward_mean", "cost_mean", "episode_cost", "lambda", "kl", "response_length", "policy_loss",
                "reward_critic_loss", "cost_critic_loss", "clip_fraction", "tokens_per_s", "time_generate",
                "time_score", "time_learn", "time_sync", "unsafe_share", "threshold", "logprob_gap"}


def round_metrics(run_dir):
    path = Path(run_dir) / "stages" / "safe_rlhf@1" / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_round_runs_every_role_on_ray_with_vllm_rollouts(small_pipeline):
    err = small_pipeline["proc"].stderr
    assert "engine vllm" in err
    for name in ("rollout-0", "scorer-reward-0", "scorer-reference-0", "scorer-cost-0", "learner-policy-0",
                 "learner-reward_critic-0", "learner-cost_critic-0"):
        assert name in err  # the actors the dashboard lists, named by role
    steps = round_metrics(small_pipeline["run_dir"])
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert STEP_METRICS <= set(steps[0])
    manifest = json.loads((Path(small_pipeline["run_dir"]) / "stages" / "safe_rlhf@1" / "manifest.json").read_text())
    assert (Path(small_pipeline["run_dir"]) / "stages" / "safe_rlhf@1" / "policy" / "model.safetensors").exists()
    assert {"harmful_rate", "helpfulness", "lambda", "episode_cost", "time_generate_mean"} <= set(manifest["metrics"])


def test_lambda_moves_with_episode_cost_against_threshold(small_pipeline):
    steps = round_metrics(small_pipeline["run_dir"])
    lam_prev = 1.0  # lambda_init
    for m in steps:
        if m["episode_cost"] > m["threshold"]:
            assert m["lambda"] > lam_prev or m["lambda"] == 5.0  # rises (up to lambda_max)
        else:
            assert m["lambda"] < lam_prev
        lam_prev = m["lambda"]


def test_vllm_logprobs_match_the_policy_learner(small_pipeline):
    # The learner recomputes the logprobs of the tokens vLLM sampled; at step 1 both hold the SFT
    # weights, so the gap is numerical only.
    first = round_metrics(small_pipeline["run_dir"])[0]
    assert first["logprob_gap"] < 0.02


def test_interrupted_round_resumes_from_its_checkpoint_with_lambda_and_window(small_pipeline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    env = {**os.environ, "SAFE_RLHF_FAULT": "safe_rlhf@1:5"}  # the driver fails after step 5
    proc = subprocess.run([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1 and "injected fault after step 5" in proc.stderr
    state = json.loads((run / "stages" / "safe_rlhf@1" / "ckpt" / "state_step_4.json").read_text())
    assert state["step"] == 4 and len(state["lagrange"]["window"]) == 4 * 16
    out = run_cli("resume", "--run-dir", run, timeout=900)
    assert "resumed round 1 from its checkpoint at step 4" in out.stderr
    steps = round_metrics(run)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # no step lost or duplicated
    reference = round_metrics(small_pipeline["run_dir"])
    # The same trajectory as the uninterrupted run: lambda after resume follows the same path.
    for a, b in zip(steps, reference):
        assert a["lambda"] == pytest.approx(b["lambda"], rel=1e-3, abs=1e-4)
        assert a["episode_cost"] == pytest.approx(b["episode_cost"], abs=0.05)


def test_gloo_weight_transfer_round_follows_the_checkpoint_rounds_trajectory(small_pipeline, tmp_path):
    # weight_sync gloo: the policy learner broadcasts into vLLM through vLLM's weight-transfer API
    # (the NCCL method's protocol) instead of writing a directory. Same weights, so the same round.
    import yaml

    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"]["weight_sync"] = "gloo"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("resume", "--run-dir", run, "--until", "safe_rlhf@1", timeout=900)
    steps, reference = round_metrics(run), round_metrics(small_pipeline["run_dir"])
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(steps, reference):
        # Each step's rollouts were sampled from the weights the learner holds: every transfer landed
        # (~3e-7 here; weights one step stale would show ~1e-2, six steps ~4e-2).
        assert a["logprob_gap"] < 1e-3 and b["logprob_gap"] < 1e-3
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=0.05)
        assert a["lambda"] == pytest.approx(b["lambda"], rel=1e-3, abs=1e-4)
        assert a["time_sync"] > 0
