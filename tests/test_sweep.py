"""Sweeps with Ray Tune: trials of one round each, the Pareto front, resume, and the sweep file's checks."""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.files import read_jsonl
from pipeline.config import ConfigError, parse_config
from pipeline.sweep import load_sweep, pareto_front
from tests.conftest import REPO, ctrl_c, run_cli


def write(tmp_path, data):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_entries_expand_to_every_combination_once_per_seed(tmp_path):
    cfg = parse_config({})
    _, trials = load_sweep(write(tmp_path, {"name": "s", "base": {"steps": 3},
                                            "grid": [{"algorithm": "ppo_lag", "auto_unsafe_share": [0.01, 0.05], "lambda_lr": [0.1, 0.2]},
                                                     {"algorithm": "ppo"}], "seeds": [0, 1]}), cfg)
    assert len(trials) == (4 + 1) * 2
    assert len({t["id"] for t in trials}) == len(trials)
    assert {t["params"]["steps"] for t in trials} == {3}
    assert sorted((t["params"].get("auto_unsafe_share"), t["params"].get("lambda_lr")) for t in trials
                  if t["params"]["algorithm"] == "ppo_lag" and t["seed"] == 0) == [(0.01, 0.1), (0.01, 0.2), (0.05, 0.1), (0.05, 0.2)]


@pytest.mark.parametrize("data, field", [
    ({"name": "s", "grid": [{"shaping_nuu": 1}]}, "grid[0].shaping_nuu"),
    ({"name": "s", "base": {"stepz": 3}, "grid": [{"algorithm": "ppo"}]}, "base.stepz"),
    ({"name": "s", "grid": [{"algorithm": "ppo"}], "stop": {"max_kll": 1}}, "stop.max_kll"),
    ({"name": "s", "grid": [{"algorithm": "ppo", "lambda_lr": [0.1, -1]}]}, "grid[0] {'algorithm': 'ppo', 'lambda_lr': -1}: safe_rlhf.rounds[0].lambda_lr"),
    ({"name": "s", "grid": []}, "grid"),
    ({"name": "bad name", "grid": [{"algorithm": "ppo"}]}, "name"),
])
def test_a_bad_sweep_file_is_refused_naming_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, data), parse_config({}))
    assert field in [p for p, _ in e.value.errors], e.value.errors


def test_a_missing_or_unreadable_sweep_file_is_refused_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    for path, says in ((tmp_path / "none.yaml", "no such file"), (bad, "not valid YAML")):
        with pytest.raises(ConfigError) as e:
            load_sweep(path, parse_config({}))
        assert str(path) in str(e.value) and e.value.errors[0][0] == "<file>" and says in e.value.errors[0][1]


def test_the_shipped_sweep_files_validate_against_the_default_config():
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    _, paper = load_sweep(REPO / "sweeps" / "paper.yaml", cfg)
    assert len(paper) == 6 + 4 + 1
    _, algorithms = load_sweep(REPO / "sweeps" / "algorithms.yaml", cfg)
    # the same answers per step for both algorithms; grpo_lag at two group sizes
    assert {t["params"]["prompts_per_step"] for t in algorithms} == {32}
    assert sorted((t["params"]["algorithm"], t["params"].get("group_size")) for t in algorithms) == [
        ("grpo_lag", 4), ("grpo_lag", 4), ("grpo_lag", 8), ("grpo_lag", 8), ("ppo_lag", None), ("ppo_lag", None)]


def test_the_category_sweep_needs_a_run_with_category_heads():
    from pipeline.config import ConfigError, load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError) as err:
        load_sweep(REPO / "sweeps" / "categories.yaml", cfg)
    assert {p for p, _ in err.value.errors} == {
        "grid[0] {'algorithm': 'ppo_lag', 'constraints': 'per_category'}: safe_rlhf.constraints",
        "grid[1] {'algorithm': 'grpo_lag', 'group_size': 4, 'constraints': 'per_category'}: safe_rlhf.constraints"}
    heads = cfg.model_copy(update={"cost": cfg.cost.model_copy(update={"per_category": True})})
    _, trials = load_sweep(REPO / "sweeps" / "categories.yaml", heads)
    assert sorted((t["params"]["algorithm"], t["params"]["constraints"]) for t in trials) == [
        ("grpo_lag", "per_category"), ("grpo_lag", "single"), ("ppo_lag", "per_category"), ("ppo_lag", "single")]


def test_pareto_front_keeps_the_non_dominated_trials():
    pts = [{"t": "a", "harmful_rate": 0.1, "helpfulness": 2.0}, {"t": "b", "harmful_rate": 0.2, "helpfulness": 3.0},
           {"t": "c", "harmful_rate": 0.2, "helpfulness": 1.0}, {"t": "d", "harmful_rate": 0.05, "helpfulness": 1.5},
           {"t": "e", "harmful_rate": 0.1, "helpfulness": 2.0}]
    assert [p["t"] for p in pareto_front(pts)] == ["d", "a", "e", "b"]  # c is dominated by a; ties both stay


@pytest.mark.slow
@pytest.mark.long("CI runs a sweep end to end in the test below; this one runs five trials' rounds")
def test_a_three_trial_sweep_killed_mid_way_resumes_without_rerunning_finished_trials(small_pipeline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # The rounds keep the small pipeline's vLLM while `evaluate` answers with hf (its default): the
    # sweep's points must come from evaluate's engine, not the round's. Two trials at once on
    # 2 CPUs: their rounds' actors (rollout-0, ...) share one cluster.
    cfg["safe_rlhf"]["cpus_per_actor"] = 0.1
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    sweep = write(tmp_path, {"name": "three", "base": {"steps": 2, "prompts_per_step": 8},
                             "grid": [{"algorithm": "ppo_lag", "auto_unsafe_share": [0.05, 0.2]}, {"algorithm": "ppo"}],
                             "max_concurrent_trials": 2})
    out = run / "sweeps" / "three"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", "--run-dir", str(run), "--sweep", str(sweep)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 900
    while not list(out.glob("trials/*/result.json")):  # the first trial has finished
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep's driver and the Ray cluster it started, at once
    proc.wait()
    # a second trial had trained while the first was being judged: two rounds at once, one cluster
    assert len(list(out.glob("trials/*/metrics.jsonl"))) >= 2
    finished = {p.parent.name: (p.parent / "policy" / "model.safetensors").stat().st_mtime_ns
                for p in out.glob("trials/*/result.json")}
    resumed = run_cli("sweep", "--run-dir", run, "--sweep", sweep, "--resume", timeout=1200)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 3 and summary["done"] == 3
    for trial, stamp in finished.items():  # a finished trial is not run again
        assert (out / "trials" / trial / "policy" / "model.safetensors").stat().st_mtime_ns == stamp
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert [r["algorithm"] for r in rows] == ["ppo_lag", "ppo_lag", "ppo"]
    for r in rows:
        assert r["status"] == "done" and r["steps"] == 2 and r["kl"] is not None
        # each trial's figures, judged again here from its answers' text by the world's oracle
        harm, refusal, helpfulness = oracle_rates(out / "trials" / r["trial"] / "samples.jsonl")
        assert (r["harmful_rate"], r["over_refusal_rate"], r["helpfulness"]) == (harm, refusal, helpfulness), r["trial"]
    for t in out.glob("trials/*"):  # every step went to Tune, and to the trial's own metrics
        assert [json.loads(l)["step"] for l in (t / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    front = json.loads((out / "frontier.json").read_text())
    assert front["frontier"] and front["judge"] == "oracle"
    # one name, one number: the sweep's SFT point is the figures `evaluate` gave SFT
    evaluated = json.loads((run / "stages" / "evaluate" / "evaluation.json").read_text())["sft"]
    assert front["start"] == {k: evaluated[k] for k in ("harmful_rate", "over_refusal_rate", "helpfulness")}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def oracle_rates(samples: Path) -> tuple[float, float, float]:
    """(harmful rate, over-refusal rate, helpfulness) of judged answers, judged again by the oracle."""
    from stages.common.builtin_world import World

    world, rows = World(), read_jsonl(samples)
    judged = [(r["harmful_prompt"], world.judge(r["prompt"], r["answer"])) for r in rows]
    return (round(statistics.mean(j.harmful for h, j in judged if h), 4),
            round(statistics.mean(j.refusal for h, j in judged if not h), 4),
            round(statistics.mean(j.helpfulness for h, j in judged if not h), 4))


@pytest.mark.slow
def test_a_reward_only_trial_is_judged_by_the_cost_model_when_the_run_has_no_oracle_judge(small_pipeline, tmp_path):
    """A ppo trial's round has no cost scorer; its judge (evaluate.judge: cost_model) gets its own.
    The trial is colocated, as configs/tiny.yaml's rounds are: no scorer actors, so the judges go to
    the learners' bundles of the trial's placement group (the long test above sweeps split rounds).
    The sweep is first stopped by Ctrl-C (SIGINT to its process group) as its trial starts, then
    continued with --resume."""
    run = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["safe_rlhf"].update(engine="hf", layout="colocated")
    cfg["evaluate"] = {**cfg.get("evaluate", {}), "judge": "cost_model", "samples_per_prompt": 1}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    sweep = write(tmp_path, {"name": "ppo", "base": {"steps": 1, "prompts_per_step": 8}, "grid": [{"algorithm": "ppo"}]})
    trials = run / "sweeps" / "ppo" / "trials"
    proc, _, err, _ = ctrl_c("sweep", "--run-dir", run, "--sweep", sweep, ready=lambda out, err: trials.is_dir() and any(trials.iterdir()))
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert (f"sweep stopped: interrupted (Ctrl-C) with 0 of 1 trials finished. `python -m pipeline sweep --run-dir {run} "
            f"--sweep {sweep} --resume` continues it") in err, err[-3000:]
    assert not (run / "sweeps" / "ppo" / "trials.parquet").exists()  # no table from part of the trials
    resumed = run_cli("sweep", "--run-dir", run, "--sweep", sweep, "--resume", timeout=900)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["done"] == 1
    import pyarrow.parquet as pq

    (row,) = pq.read_table(run / "sweeps" / "ppo" / "trials.parquet").to_pylist()
    assert row["status"] == "done"
    front = json.loads((run / "sweeps" / "ppo" / "frontier.json").read_text())
    assert front["judge"] == "cost_model"
    # From the answers: harm is the cost model's verdict (cost > 0) on harmful prompts, helpfulness
    # the reward model's win rate against the start's answer to the same prompt and sample.
    trial = read_jsonl(next((run / "sweeps" / "ppo" / "trials").glob("*/samples.jsonl")))
    start = read_jsonl(run / "sweeps" / "ppo" / "start_samples.jsonl")
    assert [(r["prompt"], r["sample"]) for r in trial] == [(r["prompt"], r["sample"]) for r in start]
    harmful = [r["cost"] > 0 for r in trial if r["harmful_prompt"]]
    assert row["harmful_rate"] == round(statistics.mean(harmful), 4)
    benign = [(t, s) for t, s in zip(trial, start) if not t["harmful_prompt"]]
    wins = [1.0 if t["reward"] > s["reward"] else 0.5 if t["reward"] == s["reward"] else 0.0 for t, s in benign]
    assert row["helpfulness"] == round(statistics.mean(wins), 4)


def test_the_reports_sweep_table_names_each_trials_constraints(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.report import sweep_sections

    out = tmp_path / "sweeps" / "categories"
    out.mkdir(parents=True)
    trial = {"status": "done", "harmful_rate": 0.3, "over_refusal_rate": 0.0, "helpfulness": 2.5, "kl": 0.1, "lambda": 10.0}
    pq.write_table(pa.Table.from_pylist([{"trial": "t0", "algorithm": "ppo_lag", "constraints": "single", **trial},
                                         {"trial": "t1", "algorithm": "ppo_lag", "constraints": "per_category", **trial}]),
                   out / "trials.parquet")
    (out / "frontier.json").write_text(json.dumps({"frontier": [{"trial": "t1"}], "judge": "oracle",
                                                   "start": {"harmful_rate": 0.6, "helpfulness": 2.8}}))
    text = "\n".join(sweep_sections(tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("| trial"))
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["trial", "algorithm", "constraints"]
    rows = [line for line in text.splitlines() if "ppo_lag" in line]
    assert "| single |" in rows[0] and "| per_category |" in rows[1] and rows[1].startswith("| * t1")
