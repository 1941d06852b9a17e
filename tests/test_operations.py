"""What a user runs the system by: the files hand-off, ray job submit, faults, evaluation, report."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMALL_PIPELINE, ctrl_c, run_cli

pytestmark = pytest.mark.slow


def _two_round_config(tmp_path, **annotate):
    cfg = json.loads(json.dumps(SMALL_PIPELINE))
    cfg["safe_rlhf"]["rounds"].append({"threshold": "auto", "lambda_init": 0.5, "lambda_lr": 0.5, "steps": 3})
    cfg["red_team"] = {"prompts": 32}
    cfg["annotate"] = {"backend": "files", **annotate}
    cfg["reward"].update(refit="warm", refit_lr=5e-4)  # the cost model refits from scratch: both ways after a round
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
    from stages.common.builtin_world import World

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
    # the reward model refits warm: from fit_reward's model, on the labelled pairs and 4x as many earlier ones
    import pyarrow.parquet as pq

    def reward_pairs(stage):
        rows = pq.read_table(run / "stages" / stage / "train.parquet").to_pylist()
        return {r["pair_id"] for r in rows if r["better_response_id"] is not None}

    new_ids = reward_pairs("ingest@1") - reward_pairs("ingest")  # the labelled pairs that reached training
    refit = [r["pair_id"] for r in pq.read_table(run / "stages" / "fit_reward@2" / "refit_train.parquet").to_pylist()]
    assert new_ids and new_ids <= set(refit) and len(refit) == 5 * len(new_ids) == len(set(refit))
    assert (f"warm refit from fit_reward: {len(new_ids)} new reward pairs and {4 * len(new_ids)} earlier ones "
            f"(refit_replay 4), 2 epoch(s) at lr 0.0005") in final.stderr  # refit_lr, not the fit's 1e-3
    log = [json.loads(l) for l in (run / "stages" / "fit_reward@2" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["total_steps"] == 2 * max(1, len(refit) // 32)  # two epochs of the refit's pairs, not of all
    assert not (run / "stages" / "fit_cost@2" / "refit_train.parquet").exists()  # scratch: every pair
    report = (run / "report.md").read_text()
    assert "| safe_rlhf@2 |" in report and "fit_cost@2" in report
    for png in ("harm_helpfulness.png", "score_distributions.png", "lambda_episode_cost.png"):
        assert (run / "stages" / "report" / png).read_bytes()[:4] == b"\x89PNG"


def test_ray_job_submit_of_a_short_pipeline(ray_cluster, tmp_path):
    """A real `ray job submit --working-dir .` to a running cluster with token auth on, and the job's log."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"name": "job", "world": {"n_pairs": 200, "n_sft": 100},
                                   "model": {"small": {"vocab_size": 600}}}))
    job = subprocess.run([ray_cluster.bin, "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", str(REPO), "--",
                          "python", "-m", "pipeline", "run", "--config", str(cfg), "--run-dir",
                          str(tmp_path / "job_run"), "--until", "ingest"],
                         env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "done  world" in job.stdout + job.stderr and "done  ingest" in job.stdout + job.stderr
    assert "succeeded" in (job.stdout + job.stderr).lower()
    status = json.loads(run_cli("status", "--run-dir", tmp_path / "job_run", "--json").stdout)
    assert [s["state"] for s in status["stages"][:2]] == ["done", "done"]


def test_ctrl_c_on_submit_stops_following_and_the_job_runs_on(ray_cluster, tmp_path):
    """`python -m pipeline submit` follows the job's log; Ctrl-C there (SIGINT to the client's
    process group) ends the following, with the commands to follow or stop the job, not the job."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"name": "job", "world": {"n_pairs": 200, "n_sft": 100},
                                   "model": {"small": {"vocab_size": 600}}}))
    proc, out, err, _ = ctrl_c("submit", "--address", ray_cluster.dashboard, "--", "run", "--config", cfg, "--run-dir",
                               tmp_path / "job_run", "--until", "ingest", env=ray_cluster.env,
                               ready=lambda out, err: "\ndashboard: " in out)  # "job ID submitted to ...", then its page
    job_id = out.split()[1]
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and f"stopped following job {job_id}; it runs on" in err, err[-3000:]
    assert f"RAY_AUTH_MODE=token ray job stop --address {ray_cluster.dashboard} {job_id}" in err  # the cluster has token auth
    deadline, status = time.time() + 300, ""
    while time.time() < deadline and not any(word in status for word in ("succeeded", "failed", "stopped")):
        time.sleep(1)
        status = subprocess.run([ray_cluster.bin, "job", "status", "--address", ray_cluster.dashboard, job_id],
                                env=ray_cluster.env, capture_output=True, text=True, timeout=60).stdout.lower()
    assert f"job '{job_id.lower()}' succeeded" in status, status  # not stopped by the Ctrl-C


# ---------------------------------------------------------------------- faults from outside
def _round_with_a_kill(small_pipeline, ray_cluster, tmp_path, victim: str, after_step: int, weight_sync: str = "checkpoint",
                       engine: str = "hf", layout: str = "split"):
    """Run round 1 again on the test cluster; once it has logged `after_step`, SIGKILL the victim
    actor's process by its PID from Ray's actor table, at whatever the round is doing then."""
    import threading

    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"]["weight_sync"] = weight_sync
    cfg["safe_rlhf"]["engine"] = engine  # hf where the engine is not what is killed: it starts sooner
    cfg["safe_rlhf"]["layout"] = layout
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = run / "stages" / "safe_rlhf@1" / "metrics.jsonl"
    killed = {}

    def killer():
        deadline, pid = time.time() + 900, None
        while time.time() < deadline and pid is None:  # the victim's PID, from Ray's actor table
            alive = ray_cluster.list_actors(name=victim, state="ALIVE")
            pid = int(alive[0]["pid"]) if alive else None
        while time.time() < deadline:  # then wait for the step, and kill whatever the round is doing
            if metrics.exists() and any(json.loads(l)["step"] >= after_step for l in metrics.read_text().splitlines() if l.strip()):
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, at=time.time())
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--until", "safe_rlhf@1"],
                          cwd=REPO, env=ray_cluster.driver_env, capture_output=True, text=True, timeout=1500)
    thread.join(timeout=5)
    if os.environ.get("SAFE_RLHF_TEST_DUMP"):
        Path(os.environ["SAFE_RLHF_TEST_DUMP"]).write_text(f"killed at {killed}\n" + proc.stderr)
    assert killed, "the victim was never killed"
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(l) for l in metrics.read_text().splitlines()]
    manifest = json.loads((run / "stages" / "safe_rlhf@1" / "manifest.json").read_text())["metrics"]
    return proc, steps, manifest


@pytest.mark.parametrize("victim, weight_sync, engine, layout", [("rollout-0", "gloo", "vllm", "colocated"),
                                                                  ("scorer-cost-0", "checkpoint", "hf", "split")])
def test_rollout_worker_or_scorer_killed_from_outside_is_retried_in_place(small_pipeline, ray_cluster, tmp_path,
                                                                           victim, weight_sync, engine, layout):
    proc, steps, manifest = _round_with_a_kill(small_pipeline, ray_cluster, tmp_path, victim, 2, weight_sync, engine,
                                               layout)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # no step duplicated or missing
    assert manifest["round_restarts"] == 0 and manifest["retries_in_place"] >= 1
    assert f"{victim} died" in proc.stderr and "retrying" in proc.stderr and "restarting round" not in proc.stderr
    # The restarted worker got the current weights back (gloo: a re-formed transfer group) before
    # the retried call: every step's rollouts match what the learner holds.
    assert all(m["logprob_gap"] < 1e-3 for m in steps)


def test_learner_killed_from_outside_restarts_the_round_from_its_checkpoint(small_pipeline, ray_cluster, tmp_path):
    """layout colocated: the policy learner hosts the reference scorer, which dies and comes back
    with it (the restarted round builds it again from the round's start model)."""
    proc, steps, manifest = _round_with_a_kill(small_pipeline, ray_cluster, tmp_path, "learner-policy-0", 3,
                                               layout="colocated")
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert manifest["round_restarts"] == 1
    assert "learner-policy-0 died" in proc.stderr and "restarting round 1 from its last checkpoint (restart 1 of 2)" in proc.stderr
    assert "resumed round 1 from its checkpoint at step" in proc.stderr
    assert all(m["logprob_gap"] < 1e-3 for m in steps)


def test_ctrl_c_mid_round_stops_the_run_in_seconds_and_resume_continues_from_the_checkpoint(small_pipeline, tmp_path):
    """As a terminal's Ctrl-C: SIGINT to the whole process group of `resume` (and of the local Ray
    cluster it started), once round 1 has passed its first checkpoint, at whatever it is doing then.
    The round used to run on to its end, and the command to end with a raw KeyboardInterrupt."""
    from tests.conftest import session_left

    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    for stage in ("safe_rlhf@1", "evaluate", "report"):
        shutil.rmtree(run / "stages" / stage)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"].update(steps_per_round=12, layout="colocated")  # the default run's layout
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    stage = run / "stages" / "safe_rlhf@1"
    metrics = stage / "metrics.jsonl"
    proc, out, err, stopped_in = ctrl_c("resume", "--run-dir", run, "--until", "safe_rlhf@1",  # past step 2's checkpoint
                                        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                                        ready=lambda out, err: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    assert proc.returncode == 130, err[-4000:]
    assert stopped_in < 15, stopped_in
    assert not any(word in out + err for word in ("Traceback", "KeyboardInterrupt")), (out + err)[-4000:]
    assert err.strip().splitlines()[-2].endswith(f"run stopped: interrupted during safe_rlhf@1. `python -m pipeline resume "
                                                 f"--run-dir {run}` continues it from its last checkpoint"), err[-2000:]
    assert session_left(proc.pid) == []  # the local cluster and the round's actors are gone too
    steps = [json.loads(l)["step"] for l in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] < 12 and not (stage / "manifest.json").exists()  # the round was stopped, not run to its end
    state = json.loads((stage / "state.json").read_text())
    started = [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
               if e["stage"] == "safe_rlhf@1" and e["event"] == "start"][-1]
    assert (state["state"], state["fingerprint"]) == ("failed", started["fingerprint"])  # kept: resume uses its folder
    assert state["error"].startswith("interrupted (Ctrl-C)")
    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    assert {s["name"]: s["state"] for s in status["stages"]}["safe_rlhf@1"] == "failed"

    resumed = run_cli("resume", "--run-dir", run, "--until", "safe_rlhf@1", timeout=900)
    at = int(resumed.stderr.split("resumed round 1 from its checkpoint at step ")[1].split()[0])
    assert 2 <= at <= steps[-1]
    assert json.loads((stage / "manifest.json").read_text())["metrics"]["steps"] == 12


def _events(run) -> set[tuple[str, str]]:
    path = run / "events.jsonl"
    return {(e["stage"], e["event"]) for e in map(json.loads, path.read_text().splitlines())} if path.exists() else set()


@pytest.mark.long("CI runs borrowed actors on the default path (small_pipeline, test_claim) and "
                  "outside kills of a round's actors in the tests above; this one runs the run twice")
def test_later_stages_borrow_the_rounds_actors_and_answer_as_fresh_ones_would(small_pipeline, ray_cluster, tmp_path):
    """safe_rlhf.keep_actors, on by default on CPU: red teaming, round 2 and evaluation borrow round
    1's actor processes (Ray's actor table: one record per name for the run), except two SIGKILLed
    while parked, during the fits: rollout-0 (Ray restarts it, but with part of its restart budget
    spent it is not lent again) and learner-policy-0 (dead). Both are replaced by new ones. Red
    teaming and round 2 run again with fresh actors give the same results."""
    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    shutil.rmtree(run / "stages" / "safe_rlhf@1")  # round 1 runs in this driver, so its actors can be kept
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"]["rounds"].append({"threshold": "auto", "lambda_init": 0.5, "lambda_lr": 0.5, "steps": 3})
    cfg["red_team"] = {"prompts": 32}
    cfg["evaluate"] = {"samples_per_prompt": 2}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = {a["actor_id"] for a in ray_cluster.list_actors()}
    ours = lambda: [a for a in ray_cluster.list_actors() if a["actor_id"] not in before]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run)], cwd=REPO,
                            env=ray_cluster.driver_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, pids = time.time() + 900, {}
    while len(pids) < 2:  # the victims' PIDs, from Ray's actor table, while round 1 runs
        assert proc.poll() is None and time.time() < deadline, "round 1's actors never showed up"
        pids = {a["name"]: int(a["pid"]) for a in ours() if a["state"] == "ALIVE" and a["name"] in ("rollout-0", "learner-policy-0")}
    while ("red_team@1", "done") not in _events(run):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    assert ("safe_rlhf@2", "start") not in _events(run)  # parked: the fits of round 2 are running
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err[-4000:]

    by_name: dict[str, list[dict]] = {}
    for a in ours():
        by_name.setdefault(a["name"], []).append(a)
    # one process per role for the whole run, the killed learner's replacement aside
    for name in ("scorer-reward-0", "scorer-cost-0", "scorer-reference-0", "learner-reward_critic-0",
                 "learner-cost_critic-0"):
        assert len(by_name[name]) == 1, (name, by_name[name])
    assert len(by_name["learner-policy-0"]) == 2 and len(by_name["rollout-0"]) == 2
    assert sorted(int(a["num_restarts"]) for a in by_name["rollout-0"]) == [0, 1]  # the restarted one, replaced
    assert not [n for n in by_name if n.startswith(("redteam-rollout", "eval-scorer"))], sorted(by_name)
    m2 = json.loads((run / "stages" / "safe_rlhf@2" / "manifest.json").read_text())["metrics"]
    assert m2["actors_kept"] == 5 and m2["round_restarts"] == 0 and m2["retries_in_place"] == 0

    kept = {"red_team": (run / "stages" / "red_team@1" / "pairs_to_label.jsonl").read_text(),
            "round": (run / "stages" / "safe_rlhf@2" / "metrics.jsonl").read_text()}
    cfg["safe_rlhf"]["keep_actors"] = False  # operational: the stages' fingerprints do not change
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for stage in ("red_team@1", "safe_rlhf@2"):
        run_cli("resume", "--run-dir", run, "--only-stage", stage, env=ray_cluster.driver_env)
    assert (run / "stages" / "red_team@1" / "pairs_to_label.jsonl").read_text() == kept["red_team"]
    untimed = lambda text: [{k: v for k, v in json.loads(l).items() if not k.startswith(("time_", "tokens_per_s"))}
                            for l in text.splitlines()]
    assert untimed((run / "stages" / "safe_rlhf@2" / "metrics.jsonl").read_text()) == untimed(kept["round"])
    assert json.loads((run / "stages" / "safe_rlhf@2" / "manifest.json").read_text())["metrics"]["actors_kept"] == 0


def test_worker_node_lost_mid_round_the_round_continues_on_the_head(small_pipeline, tmp_path):
    """Two Ray nodes on this machine: a head and a worker node (`ray start --address`). The round's
    actors start on the worker node (a detached blocker actor holds the head's CPUs until then);
    mid-round the worker node is stopped (its processes SIGKILLed) and the blocker goes. The round
    continues on the head: its learners died with the node, so it restarts from its checkpoint."""
    from tests.conftest import RayTestCluster

    cluster = RayTestCluster(tmp_path / "cluster", num_cpus=2)
    try:
        worker = cluster.add_worker_node(num_cpus=2)
        blocker = ("import ray, time\n"
                   f"ray.init(address={cluster.gcs_address!r})\n"
                   "@ray.remote(num_cpus=2)\nclass Blocker:\n    def ready(self): return True\n"
                   "b = Blocker.options(name='head-blocker', lifetime='detached').remote()\nray.get(b.ready.remote())\n")
        deadline = time.time() + 120
        while len([n for n in cluster.list_nodes() if n["state"] == "ALIVE"]) < 2:
            assert time.time() < deadline, "the worker node never joined"
            time.sleep(1)
        subprocess.run([sys.executable, "-c", blocker], env=cluster.env, check=True, timeout=120, capture_output=True)
        (blocker_actor,) = cluster.list_actors(name="head-blocker", state="ALIVE")
        head_node = blocker_actor["node_id"]

        run = tmp_path / "run"
        shutil.copytree(small_pipeline["run_dir"], run)
        shutil.rmtree(run / "stages" / "safe_rlhf@1")
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["safe_rlhf"]["engine"] = "hf"  # the node's loss is the point, not the engine: hf restarts sooner
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        metrics = run / "stages" / "safe_rlhf@1" / "metrics.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--until", "safe_rlhf@1"],
                                cwd=REPO, env=cluster.driver_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 900
        while not (metrics.exists() and any(json.loads(l)["step"] >= 3 for l in metrics.read_text().splitlines() if l.strip())):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        on_worker = [a for a in cluster.list_actors(state="ALIVE") if a["name"] in ("rollout-0", "learner-policy-0")]
        assert on_worker and all(a["node_id"] != head_node for a in on_worker)  # the round ran on the worker node
        cluster.stop_node(worker)  # the node is lost: raylet and every worker process on it, SIGKILLed
        os.kill(int(blocker_actor["pid"]), signal.SIGKILL)  # and the head has room again
        _, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-4000:]
        steps = [json.loads(l) for l in metrics.read_text().splitlines()]
        assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
        assert all(m["logprob_gap"] < 1e-3 for m in steps)
        manifest = json.loads((run / "stages" / "safe_rlhf@1" / "manifest.json").read_text())["metrics"]
        assert manifest["round_restarts"] == 1
        assert "restarting round 1 from its last checkpoint" in err
        survivors = [a for a in cluster.list_actors(name="learner-policy-0")]
        assert any(a["node_id"] == head_node for a in survivors)  # the restarted round ran on the head
    finally:
        cluster.stop()
