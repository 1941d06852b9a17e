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
                "time_score", "time_learn", "time_sync", "time_step", "unsafe_share", "threshold", "logprob_gap",
                "rollout_staleness"}
# Figures that measure time, not the computation.
TIMINGS = {"tokens_per_s", "time_generate", "time_score", "time_learn", "time_sync", "time_step"}
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
    # The user's default (keep_actors on CPU): the three learners are the ones SFT and the fits ran
    # in (reward/cost/sft.runner auto), rollout-0 the one SFT's check answered in, the three scorers
    # were started ahead while the fits ran, and the round borrowed all seven.
    err = small_pipeline["proc"].stderr
    assert (manifest["metrics"]["actors_started_ahead"], manifest["metrics"]["actors_kept"]) == (3, 4)
    ahead = err.index("prestart safe_rlhf@1's actors (3, no models yet)")
    assert err.index("done  sft") < ahead < err.index("start safe_rlhf@1")
    assert "(4 kept from the last stage, 3 started ahead)" in err
    for stage, learner in (("sft", "policy"), ("fit_reward", "reward_critic"), ("fit_cost", "cost_critic")):
        assert f"[{stage}] in the kept learner learner-{learner}-0 (no Ray Train processes)" in err


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


def _round_again(small_pipeline, tmp_path_factory, name: str, **settings) -> tuple[Path, list[str]]:
    """A copy of the small pipeline's run without its round, `settings` set under safe_rlhf ->
    (the run directory, the command that resumes it up to the round)."""
    run = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    _set_round(run, **settings)
    return run, [sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--until", "safe_rlhf@1"]


def _set_round(run: Path, **settings) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"].update(settings)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def _start_killed_at_step_5(command: list[str], run: Path, env: dict) -> None:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _watch_then_kill(proc, run / "stages" / "safe_rlhf@1" / "metrics.jsonl", step=5)


@pytest.fixture(scope="module")
def resumed_round(small_pipeline, ray_cluster, prometheus, tmp_path_factory):
    """Round 1 again on a running cluster (token auth on, Prometheus scraping when installed), with
    a step's calls dispatched one by one (dispatch_together: false) and its scorers inside the
    learners (layout: colocated): the driver is killed mid-round from outside, then `resume` runs
    with weight_sync changed from checkpoint to gloo (operational settings: the round's fingerprint
    and checkpoints stay)."""
    run, command = _round_again(small_pipeline, tmp_path_factory, "resumed_round", dispatch_together=False,
                                layout="colocated")
    before = {a["actor_id"] for a in ray_cluster.list_actors()}
    t0 = time.time()
    _start_killed_at_step_5(command, run, ray_cluster.driver_env)
    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    killed_state = {s["name"]: s["state"] for s in status["stages"]}["safe_rlhf@1"]
    _set_round(run, weight_sync="gloo")
    out = subprocess.run(command, cwd=REPO, env=ray_cluster.driver_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    started = [a for a in ray_cluster.list_actors() if a["actor_id"] not in before]
    return {"run": run, "killed_state": killed_state, "out": out, "window": (t0, time.time()), "started": started}


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


def _same_tensors(a, b, where: str) -> int:
    """Assert two nested checkpoint structures hold the same tensors, bit for bit; -> tensors compared."""
    import torch

    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(_same_tensors(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        return sum(_same_tensors(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    return 0


def test_calls_dispatched_one_by_one_give_the_same_bits_as_dispatched_together(small_pipeline, resumed_round):
    """Steps 1-4 of the resumed run come from its first attempt, whose scorers (inside the learners:
    layout colocated), forwards and learner updates went out one after another; the small
    pipeline's round (layout split) sent them together, to scorer actors of their own."""
    import torch

    one_by_one, together = round_metrics(resumed_round["run"])[:4], round_metrics(small_pipeline["run_dir"])[:4]
    for a, b in zip(one_by_one, together, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    compared = 0
    for role in ("policy", "reward_critic", "cost_critic"):
        files = [Path(r) / "stages" / "safe_rlhf@1" / "ckpt" / role / "step_4" / "mp_rank_00_model_states.pt"
                 for r in (resumed_round["run"], small_pipeline["run_dir"])]
        a, b = (torch.load(f, map_location="cpu", weights_only=False) for f in files)
        compared += _same_tensors({k: a[k] for k in ("module", "optimizer")},
                                  {k: b[k] for k in ("module", "optimizer")}, role)
    assert compared > 50  # weights and both Adam moments of three models


STEP_CALLS = {"Scorer.score", "Scorer.logprobs", "Learner.score_with", "Learner.forward", "Learner.train_step"}


def step_calls(ray_cluster, window: tuple[float, float]) -> list[dict]:
    """Every scoring, forward and update call the round's actors ran within `window`, from Ray's
    task table."""
    lo, hi = window[0] * 1000, window[1] * 1000
    return [t for t in ray_cluster.list_tasks(STEP_CALLS)
            if t.get("start_time_ms") and t.get("end_time_ms") and lo <= t["start_time_ms"] <= hi]


def step_call_spans(ray_cluster, window: tuple[float, float]) -> list[tuple[int, int]]:
    """(start, end) in ms of the step calls within `window`, sorted by start."""
    return sorted((t["start_time_ms"], t["end_time_ms"]) for t in step_calls(ray_cluster, window))


def test_calls_dispatched_one_by_one_never_run_at_the_same_time(resumed_round, ray_cluster):
    """Ray's own record of the one-by-one round: no scoring, forward or update call started before
    the one before it had ended (dispatched together, they overlap: the next test)."""
    spans = step_call_spans(ray_cluster, resumed_round["window"])
    # six steps of six scoring calls and three updates; an actor killed with its driver takes its
    # last second of task events with it (Ray reports them every second): 48-60 seen
    assert len(spans) >= 3 * 9
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))


def test_calls_dispatched_together_run_at_the_same_time(overlapped_round, ray_cluster):
    spans = step_call_spans(ray_cluster, overlapped_round["window"])
    assert len(spans) >= 3 * 9
    overlapping = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlapping >= len(spans) // 3  # a step's scoring calls run side by side, and its updates


def test_rays_actor_table_names_every_role_of_the_round(overlapped_round, ray_cluster):
    actors = ray_cluster.list_actors()
    seen = {a["name"]: a["class_name"] for a in actors if a["name"] in ROUND_ACTORS}
    assert seen == ROUND_ACTORS


def test_a_colocated_round_scores_inside_its_learners_and_starts_no_scorer_actor(resumed_round, ray_cluster):
    """Ray's own tables for the colocated round: its scoring ran as the learners' `score_with`
    calls, on the three learners, and no scorer actor ran a call or was started in its window."""
    calls = step_calls(ray_cluster, resumed_round["window"])
    names = [t["name"] for t in calls]
    assert not [n for n in names if n.startswith("Scorer.")]
    hosts = {t["actor_id"] for t in calls if t["name"] == "Learner.score_with"}
    assert names.count("Learner.score_with") >= 3 * 3 and len(hosts) >= 3  # reference, reward and cost, each its host
    made = sorted(a["name"] for a in resumed_round["started"])  # the actor table's new rows: both attempts' actors
    assert made == sorted(["rollout-0", "learner-policy-0", "learner-reward_critic-0", "learner-cost_critic-0"] * 2), made


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


@pytest.fixture(scope="module")
def overlapped_round(small_pipeline, ray_cluster, tmp_path_factory):
    """Round 1 again with overlap_generation on, killed from outside once step 5 is logged (its
    checkpoint is step 4's, which holds step 5's rollouts), then resumed."""
    run, command = _round_again(small_pipeline, tmp_path_factory, "overlapped_round", overlap_generation=True)
    t0 = time.time()
    _start_killed_at_step_5(command, run, ray_cluster.driver_env)
    before = round_metrics(run)
    state = json.loads((run / "stages" / "safe_rlhf@1" / "ckpt" / "state_step_4.json").read_text())
    out = subprocess.run(command, cwd=REPO, env=ray_cluster.driver_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"run": run, "before": before, "state": state, "out": out, "window": (t0, time.time())}


def test_overlapped_generation_trains_on_rollouts_one_step_stale(small_pipeline, overlapped_round):
    steps = round_metrics(overlapped_round["run"])
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    # step 1 samples from the start; every later step from the weights of the step before last
    assert [m["rollout_staleness"] for m in steps] == [0, 1, 1, 1, 1, 1]
    # the engine's logprobs against the learner's current policy: one update of drift shows, where
    # the same round without overlap shows numerical noise only (< 1e-3, test above)
    assert all(m["logprob_gap"] > 1e-3 for m in steps[1:]), [m["logprob_gap"] for m in steps]
    assert steps[0]["logprob_gap"] < 1e-3
    # step 1 is the same computation with or without overlap, except for the behaviour logprobs
    # (the engine's instead of the learner's recomputation; equal to ~1e-6 on CPU)
    plain = round_metrics(small_pipeline["run_dir"])[0]
    assert steps[0]["reward_mean"] == plain["reward_mean"] and steps[0]["response_length"] == plain["response_length"]
    # with the engine's own weights one step old, the trajectory departs from the plain round's
    assert any(a["reward_mean"] != b["reward_mean"] for a, b in zip(steps[2:], round_metrics(small_pipeline["run_dir"])[2:]))


def test_an_overlapped_round_resumes_exactly_with_the_rollouts_its_checkpoint_holds(overlapped_round):
    run, before, state = overlapped_round["run"], overlapped_round["before"], overlapped_round["state"]
    assert state["step"] == 4 and state["next_rollout"]["weights_step"] == 3
    assert len(state["next_rollout"]["gen"]["response_ids"]) == 16  # step 5's rollouts, already sampled
    assert "resumed round 1 from its checkpoint at step 4" in overlapped_round["out"].stderr
    after = round_metrics(run)
    # Step 5 ran twice: straight on from step 4 in the killed attempt, and from the checkpoint in
    # the resumed one. The same trajectory, to every figure the round logs.
    first, again = before[4], after[4]
    assert first["step"] == again["step"] == 5
    assert {k: v for k, v in first.items() if k not in TIMINGS} == {k: v for k, v in again.items() if k not in TIMINGS}
    assert after[:4] == before[:4]  # steps before the checkpoint kept as logged
