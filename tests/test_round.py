"""A Safe RLHF round on Ray: vLLM rollout workers, scorers, DeepSpeed learners, PPO-Lagrangian."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

STEP_METRICS = {"reward_mean", "cost_mean", "episode_cost", "lambda", "kl", "response_length", "policy_loss",
                "reward_critic_loss", "cost_critic_loss", "clip_fraction", "tokens_per_s", "time_generate",
                "time_score", "time_learn", "time_sync", "unsafe_share", "threshold", "logprob_gap"}
ROUND_ACTORS = {"rollout-0": "RolloutWorker", "scorer-reward-0": "Scorer", "scorer-reference-0": "Scorer",
                "scorer-cost-0": "Scorer", "learner-policy-0": "Learner", "learner-reward_critic-0": "Learner",
                "learner-cost_critic-0": "Learner"}


def round_metrics(run_dir):
    path = Path(run_dir) / "stages" / "safe_rlhf@1" / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_round_runs_ppo_lagrangian_with_vllm_rollouts(small_pipeline):
    assert "engine vllm" in small_pipeline["proc"].stderr
    steps = round_metrics(small_pipeline["run_dir"])
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert STEP_METRICS <= set(steps[0])
    manifest = json.loads((Path(small_pipeline["run_dir"]) / "stages" / "safe_rlhf@1" / "manifest.json").read_text())
    assert (Path(small_pipeline["run_dir"]) / "stages" / "safe_rlhf@1" / "policy" / "model.safetensors").exists()
    assert {"lambda", "episode_cost", "time_generate_mean", "time_setup", "round_restarts"} <= set(manifest["metrics"])
    # The round reports training figures only: harm is measured once, by `evaluate` (one name, one number).
    assert "harmful_rate" not in manifest["metrics"]


def test_lambda_moves_with_episode_cost_against_threshold(small_pipeline):
    steps = round_metrics(small_pipeline["run_dir"])
    lam_prev = 1.0  # lambda_init
    for m in steps:
        if m["episode_cost"] > m["threshold"]:
            assert m["lambda"] > lam_prev or m["lambda"] == 5.0  # rises (up to lambda_max)
        else:
            assert m["lambda"] < lam_prev
        lam_prev = m["lambda"]


def test_vllm_samples_from_the_weights_the_learner_holds(small_pipeline):
    # The learner recomputes the logprobs of the tokens vLLM sampled. Every step's weights reached vLLM:
    # the gap is numerical only (~3e-7 here; weights one step stale show ~1e-2).
    assert all(m["logprob_gap"] < 1e-3 for m in round_metrics(small_pipeline["run_dir"]))


def _watch_then_kill(proc, metrics: Path, step: int, timeout: float = 900) -> None:
    """SIGKILL the driver's process group once the round has logged `step`: from outside, as an
    OOM killer or a lost head node would."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l.strip()):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never came")


@pytest.fixture(scope="module")
def resumed_round(small_pipeline, ray_cluster, prometheus, tmp_path_factory):
    """Round 1 again on a running cluster (token auth on, Prometheus scraping when installed): the
    driver is killed mid-round from outside, then `resume` runs with weight_sync changed from
    checkpoint to gloo (an operational setting: the round's fingerprint and checkpoints stay)."""
    run = tmp_path_factory.mktemp("resumed_round") / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--until", "safe_rlhf@1"],
                            cwd=REPO, env=ray_cluster.driver_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _watch_then_kill(proc, run / "stages" / "safe_rlhf@1" / "metrics.jsonl", step=5)
    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    killed_state = {s["name"]: s["state"] for s in status["stages"]}["safe_rlhf@1"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"]["weight_sync"] = "gloo"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--until", "safe_rlhf@1"],
                         cwd=REPO, env=ray_cluster.driver_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"run": run, "killed_state": killed_state, "out": out}


def test_killed_driver_resumes_the_round_from_its_checkpoint_with_another_weight_sync(small_pipeline, resumed_round):
    run, out = resumed_round["run"], resumed_round["out"]
    assert resumed_round["killed_state"] == "failed"  # the driver is gone: status says so
    state = json.loads((run / "stages" / "safe_rlhf@1" / "ckpt" / "state_step_4.json").read_text())
    assert state["step"] == 4 and len(state["lagrange"]["window"]) == 4 * 16
    assert "resumed round 1 from its checkpoint at step 4" in out.stderr
    steps, reference = round_metrics(run), round_metrics(small_pipeline["run_dir"])
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # no step lost or duplicated
    for a, b in zip(steps, reference):
        # Every gloo transfer landed: vLLM samples from the learner's weights.
        assert a["logprob_gap"] < 1e-3
        # The same trajectory as the uninterrupted checkpoint-sync run.
        assert a["lambda"] == pytest.approx(b["lambda"], rel=1e-3, abs=1e-4)
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=0.05)
    assert all(m["time_sync"] > 0 for m in steps[4:])


def test_rays_actor_table_names_every_role_of_the_round(resumed_round, ray_cluster):
    actors = ray_cluster.list_actors()
    seen = {a["name"]: a["class_name"] for a in actors if a["name"] in ROUND_ACTORS}
    assert seen == ROUND_ACTORS


def test_prometheus_scrapes_the_rounds_metrics(resumed_round, prometheus):
    if prometheus is None:
        pytest.skip("no prometheus on PATH (Debian's `prometheus` package; .ci/run installs it)")
    deadline, got = time.time() + 90, []
    while time.time() < deadline and not got:
        got = prometheus.query('ray_safe_rlhf_lambda{stage="safe_rlhf@1"}')
        time.sleep(2)
    assert got, "no ray_safe_rlhf_lambda samples were scraped"
    assert 0 < float(got[0]["value"][1]) <= 5.0 and got[0]["metric"]["SessionName"]
    assert prometheus.query('ray_safe_rlhf_step{stage="safe_rlhf@1"}')


def test_the_rounds_log_is_readable(resumed_round):
    """The job log of a round: its own progress lines, and each warning of vLLM and the actors once,
    not once per weight reload (6 steps, so anything printed per step would show 6 times)."""
    import re

    err = resumed_round["out"].stderr
    span = err[err.index("start safe_rlhf@1"):err.index("done  safe_rlhf@1")].splitlines()
    assert len(span) <= 30, "\n".join(span)
    bodies = [re.sub(r"^(\x1b\[[0-9;]*m)?\([A-Za-z]+ pid=\d+(, ip=[\d.]+)?\)(\x1b\[0m)? ", "", line) for line in span]
    # A line printed once per process that imports vLLM (the actor, its engine core) may repeat; a
    # line printed per step or per weight reload would repeat 6 times.
    per_step = {b for b in bodies if bodies.count(b) >= 6 and b.strip()}
    assert per_step == set(), per_step
    assert "Loading safetensors checkpoint shards" not in err
