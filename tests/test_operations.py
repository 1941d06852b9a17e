"""What a user runs the system by: the files hand-off, ray job submit, faults, evaluation, report."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMALL_PIPELINE, run_cli

pytestmark = pytest.mark.slow


def _two_round_config(tmp_path, **annotate):
    cfg = json.loads(json.dumps(SMALL_PIPELINE))
    cfg["safe_rlhf"]["rounds"].append({"threshold": "auto", "lambda_init": 0.5, "lambda_lr": 0.5, "steps": 3})
    cfg["red_team"] = {"prompts": 32}
    cfg["annotate"] = {"backend": "files", **annotate}
    path = tmp_path / "two_rounds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_files_annotation_hand_off_then_resume_runs_round_two_evaluate_and_report(small_pipeline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    cfg = _two_round_config(tmp_path)
    first = run_cli("run", "--config", cfg, "--run-dir", run, check=False, timeout=1200)
    assert first.returncode == 3, first.stderr[-3000:]  # waiting for a person
    assert "skip  safe_rlhf@1" in first.stderr  # round 1 is unchanged by adding round 2
    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    annotate = next(s for s in status["stages"] if s["name"] == "annotate@1")
    to_label = run / "stages" / "annotate@1" / "to_label.jsonl"
    labelled = run / "stages" / "annotate@1" / "labelled.jsonl"
    assert annotate["state"] == "waiting" and str(labelled) in annotate["message"] and "resume" in annotate["message"]
    assert (run / "stages" / "annotate@1" / "to_label.parquet").exists()

    # A person labels the pairs (here: the world's annotator), with one mistake first.
    from stages.world import World

    world, rng = World(), random.Random(0)
    rows = [json.loads(l) for l in to_label.read_text().splitlines()]
    done = [{**r, **{k: v for k, v in world.annotate(rng, r["prompt"], r["response_0"], r["response_1"]).items()
                     if k in ("better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe")}}
            for r in rows]
    bad = [dict(d) for d in done]
    bad[0]["better_response_id"] = 2
    labelled.write_text("".join(json.dumps(d) + "\n" for d in bad))
    again = run_cli("resume", "--run-dir", run, check=False, timeout=600)
    assert again.returncode == 3 and "do not validate" in again.stderr  # the same checks as any annotation file
    labelled.write_text("".join(json.dumps(d) + "\n" for d in done))
    final = run_cli("resume", "--run-dir", run, timeout=1800)
    for stage in ("annotate@1", "ingest@1", "fit_reward@2", "fit_cost@2", "safe_rlhf@2", "evaluate", "report"):
        assert f"done  {stage}" in final.stderr

    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    assert all(s["state"] == "done" for s in status["stages"])
    evaluation = next(s for s in status["stages"] if s["name"] == "evaluate")["metrics"]
    for policy in ("sft", "safe_rlhf@1", "safe_rlhf@2"):
        assert set(evaluation[policy]) >= {"harmful_rate", "helpfulness", "reward_mean", "cost_mean", "safe_share"}
    assert set(evaluation["arena"]) == {"safe_rlhf@1 vs sft", "safe_rlhf@2 vs safe_rlhf@1"}
    ingest1 = json.loads((run / "stages" / "ingest@1" / "manifest.json").read_text())["metrics"]
    assert ingest1["read"] == 1000 + len(done)  # all data so far: the world's pairs and the new labels
    report = (run / "report.md").read_text()
    assert "| safe_rlhf@2 |" in report and "fit_cost@2" in report
    for png in ("harm_helpfulness.png", "score_distributions.png", "lambda_episode_cost.png"):
        assert (run / "stages" / "report" / png).read_bytes()[:4] == b"\x89PNG"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_of_a_short_pipeline(tmp_path):
    """A cluster the test starts (`ray start --head --block`, stopped by killing that process
    group), a real `ray job submit --working-dir .`, and the job's log."""
    import tempfile

    # As a user with the venv activated: the job's `python` is the project's interpreter.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    gcs, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                             f"--temp-dir={ray_tmp}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()[-3000:]
            time.sleep(2)
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump({"name": "job", "world": {"n_pairs": 200, "n_sft": 100},
                                       "model": {"small": {"vocab_size": 600}}}))
        job = subprocess.run([ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                              "python", "-m", "pipeline", "run", "--config", str(cfg), "--run-dir",
                              str(tmp_path / "job_run"), "--until", "ingest"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "done  world" in job.stdout + job.stderr and "done  ingest" in job.stdout + job.stderr
        assert "succeeded" in (job.stdout + job.stderr).lower()
        status = json.loads(run_cli("status", "--run-dir", tmp_path / "job_run", "--json").stdout)
        assert [s["state"] for s in status["stages"][:2]] == ["done", "done"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _round_again(small_pipeline, tmp_path, kill: str, weight_sync: str = "checkpoint"):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"]["weight_sync"] = weight_sync
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SAFE_RLHF_KILL": kill, "SAFE_RLHF_KILL_MARKER": str(tmp_path / "killed")}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--until", "safe_rlhf@1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "killed").exists()  # the actor really died
    steps = [json.loads(l)["step"] for l in (run / "stages" / "safe_rlhf@1" / "metrics.jsonl").read_text().splitlines()]
    return proc, steps


@pytest.mark.parametrize("victim, weight_sync", [("rollout-0:generate:3", "checkpoint"),
                                                 ("scorer-cost-0:score:4", "checkpoint"),
                                                 ("rollout-0:generate:3", "gloo")])
def test_dead_rollout_worker_or_scorer_is_restarted_and_the_step_retried(small_pipeline, tmp_path, victim, weight_sync):
    proc, steps = _round_again(small_pipeline, tmp_path, victim, weight_sync)
    assert steps == [1, 2, 3, 4, 5, 6]  # no step duplicated or missing
    assert f"{victim.split(':')[0]} died" in proc.stderr and "retrying step" in proc.stderr
    metrics = [json.loads(l) for l in (tmp_path / "run" / "stages" / "safe_rlhf@1" / "metrics.jsonl").read_text().splitlines()]
    # The restarted worker got the current weights back (gloo: a re-formed transfer group) before
    # the retried step: its rollouts match what the learner holds.
    assert all(m["logprob_gap"] < 1e-3 for m in metrics)


def test_dead_learner_restarts_the_round_from_its_checkpoint(small_pipeline, tmp_path):
    proc, steps = _round_again(small_pipeline, tmp_path, "learner-policy-0:train_step:5")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "restarting round 1 from its last checkpoint (attempt 2" in proc.stderr
    assert "resumed round 1 from its checkpoint at step 4" in proc.stderr
