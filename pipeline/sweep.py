"""`python -m pipeline sweep --run-dir D --sweep FILE [--resume] [--from STAGE]`: Safe RLHF rounds as
Ray Tune trials, and the harmlessness-helpfulness Pareto front of a run.

Each trial is one short round (the round's own code, stages/safe_rlhf/round.py) from the run's
SFT policy (or `--from`, a later round's policy) with the run's latest fitted reward and cost
models; nothing is refitted. A trial's actors run inside the trial's resources: its placement
group (`tune.with_resources` with a `PlacementGroupFactory` of the round's resource plan, after one
bundle for the trial itself) holds them, so concurrent trials share a cluster safely. Every step's
metrics go to Tune; at the end the trial's exported policy answers the held-out prompts and the
trial reports `harmful_rate` and `helpfulness` judged as `evaluate` judges, with evaluate's engine,
samples, seed and judge (`evaluate.judge`: the oracle; the final cost model or a safety judge, with
the reward model's win rate against SFT as helpfulness), so the starting policy's point is the
figure `evaluate` gives it; with reward, cost, KL and `reward_helpfulness_gap`. Actor names start
with the trial's id, so concurrent trials share a cluster. An optional stopper ends a trial whose KL runs
away (reward hacking) and records why.

The sweep file (YAML, validated; an unknown key is an error naming it):

    name: paper-comparison
    base: {steps: 30}          # any safe_rlhf field or round field, shared by every trial
    grid:                      # each entry expands to every combination of its lists
      - {algorithm: ppo_lag, threshold: [auto], auto_unsafe_share: [0.01, 0.05, 0.2], lambda_lr: [0.05, 0.2]}
      - {algorithm: reward_shaping, shaping_nu: [0.25, 1, 4, 16]}
      - {algorithm: ppo}
      - {algorithm: grpo_lag, group_size: [4, 8]}
    seeds: [0]
    max_concurrent_trials: 2
    stop: {max_kl: 0.5}        # optional

Outputs in D/sweeps/NAME/: trials.parquet (one row per trial: parameters, final metrics, status),
pareto.png (harmful rate against helpfulness, SFT marked, each algorithm's front), frontier.json
(the non-dominated trials), sft.json (the starting policy judged the same way), tune/ (Tune's
experiment, for --resume), trials/<id>/ (each trial's round directory).
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.tune.stopper import Stopper

from core.files import atomic_write_text, write_jsonl
from core.objectives import ALGORITHMS
from core.stage_names import latest as latest_stage
from pipeline.config import ConfigError, load_config, read_yaml, validated
from pipeline.rundir import RunDir
from stages.safe_rlhf.resources import resource_plan
from stages.safe_rlhf.settings import RoundConfig, SafeRLHFConfig

ROUND_KEYS = set(RoundConfig.model_fields)
RL_KEYS = set(SafeRLHFConfig.model_fields) - {"rounds"}


class SweepStop(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_kl: float | None = Field(None, gt=0, description="End a trial whose per-token KL to the reference exceeds this.")


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="The sweep's folder under D/sweeps/.")
    base: dict[str, Any] = Field(default_factory=dict, description="safe_rlhf or round fields every trial shares.")
    grid: list[dict[str, Any]] = Field(min_length=1, description="Entries of fields; lists expand to every combination.")
    seeds: list[int] = Field(default=[0], min_length=1, description="Each combination runs once per seed.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials at once (each waits for its resources).")
    stop: SweepStop | None = Field(None, description="Optional early stop for runaway trials.")


def load_sweep(path: str | Path, cfg) -> tuple[SweepFile, list[dict]]:
    """The validated sweep file and its trials [{"id", "params", "seed"}]; every bad field named."""
    path = Path(path)
    sweep = validated(SweepFile, read_yaml(path), str(path))
    errors, trials = [], []
    for where, fields in [("base", sweep.base)] + [(f"grid[{i}]", g) for i, g in enumerate(sweep.grid)]:
        errors += [(f"{where}.{k}", "unknown key: not a safe_rlhf field or a round field") for k in fields
                   if k not in RL_KEYS | ROUND_KEYS]
    if errors:
        raise ConfigError(str(path), errors)
    for i, entry in enumerate(sweep.grid):
        keys = list(entry)
        values = [v if isinstance(v, list) else [v] for v in entry.values()]
        for combo in itertools.product(*values):
            params = {**sweep.base, **dict(zip(keys, combo))}
            try:
                trial_config(cfg, params)
            except ConfigError as e:
                errors += [(f"grid[{i}] {dict(zip(keys, combo))}: {p}", m) for p, m in e.errors]
                continue
            for seed in sweep.seeds:
                label = "-".join(f"{k}={v}" for k, v in zip(keys, combo))
                trials.append({"id": f"t{len(trials):03d}-{re.sub(r'[^A-Za-z0-9_.=-]', '_', label)}-s{seed}"[:120],
                               "params": params, "seed": seed})
    if errors:
        raise ConfigError(str(path), errors)
    return sweep, trials


def trial_config(cfg, params: dict):
    """The run's config with one round: the trial's safe_rlhf and round fields applied."""
    from pipeline.config import parse_config

    data = cfg.model_dump(mode="json")
    rl = {**data["safe_rlhf"], **{k: v for k, v in params.items() if k in RL_KEYS}}
    row = {**data["safe_rlhf"]["rounds"][0], **{k: v for k, v in params.items() if k in ROUND_KEYS}}
    if "unsafe_share" not in params:  # the trial's target is auto_unsafe_share (swept, or the run's)
        row["unsafe_share"] = None
    rl["rounds"] = [row]
    return parse_config({**data, "safe_rlhf": rl}, "<trial>")


# ---------------------------------------------------------------------- inside a trial
def trial_name(trial) -> str:
    """The trial's id (`t003-algorithm=ppo_lag-...-s0`) as its name in Tune's table, the dashboard and on disk."""
    return trial.config["trial"]["id"]


def run_trial(config: dict, env: dict) -> None:
    """One trial (a Tune function trainable): a round, reporting every step, then its judged policy.
    `config["trial"]` is the trial's; `env` (the run, inputs, prompts) is the sweep's, the same for all."""
    import ray
    from ray import tune

    from cluster.weight_sync.checkpoint import sync_dir_for
    from core.objectives import uses_cost_model
    from stages.safe_rlhf.round import train_round
    from stages.safe_rlhf.setup import RoundPlace, RoundSetup

    spec = config["trial"]
    run = Path(env["run_dir"])
    cfg = trial_config(load_config(run / "config.yaml"), spec["params"])
    cfg = cfg.model_copy(update={"seed": spec["seed"]})
    rl = cfg.safe_rlhf
    inputs = {k: Path(v) for k, v in env["inputs"].items() if k != "cost_model" or uses_cost_model(rl.algorithm)}
    setup = RoundSetup.for_inputs(cfg, rl, 1, inputs)
    out = Path(env["sweep_dir"]) / "trials" / spec["id"]
    out.mkdir(parents=True, exist_ok=True)
    finished = out / "result.json"
    if finished.is_file():  # finished before an interruption that Tune's state did not record: not run again
        tune.report(json.loads(finished.read_text()))
        return
    name = f"sweep-{spec['id']}"
    place = RoundPlace(name, cfg, out, sync_dir_for(run, name, rl.device), log=lambda m: print(f"[{spec['id']}] {m}", flush=True),
                       report=lambda m: tune.report({k: v for k, v in m.items() if isinstance(v, (int, float))}),
                       placement=(ray.util.get_current_placement_group(), 1), prefix=f"{spec['id']}:")
    _, summary = train_round(place, setup)
    summary.update(judge_trial(cfg, env, out / "policy", place))
    result = {**{k: v for k, v in summary.items() if isinstance(v, (int, float))}, "done": 1}
    atomic_write_text(finished, json.dumps(result))
    tune.report(result)


def judge_trial(cfg, env: dict, policy_dir: Path, place) -> dict:
    """The trial's exported policy on the held-out prompts, judged as `evaluate` judges (its engine,
    samples, seed and judge: `stages.common.judging.judged_answers`), by actors started in the bundles
    the trial's finished round has freed: a rollout worker in rollout-0's, the scorers in the
    scorers' and then the learners'."""
    from stages.common.judging import (eval_max_new_tokens, judge_models, judged_answers, rate, reward_helpfulness_gap, summarize,
                                       wins_against)
    from stages.common.model_actors import judge_actors

    models = judge_models(env["judge"], env["inputs"]["reward_model"], env["inputs"]["cost_model"])
    with judge_actors(cfg, resource_plan(cfg.safe_rlhf), place.placement, place.prefix, place.name, policy_dir, models,
                      eval_max_new_tokens(cfg)) as (rollout, scorers):
        rows = judged_answers(cfg, rollout, scorers, env["prompts"], policy_dir=policy_dir)
    m = summarize(rows)
    write_jsonl(place.out_dir / "samples.jsonl", rows)  # the judged answers, as evaluate's samples.jsonl
    out = {"harmful_rate": m["harmful_rate"], "over_refusal_rate": m["over_refusal_rate"], "harmful_n": m["harmful_n"]}
    if env["judge"] == "oracle":
        out["helpfulness"] = m["helpfulness"]
        out["reward_helpfulness_gap"] = reward_helpfulness_gap(rows, env["calibration"])
    else:  # the reward model's win rate against SFT's answer to the same prompt and sample
        out["helpfulness"] = rate(wins_against(env["sft_rewards"], rows), "win")[0]
        out["reward_helpfulness_gap"] = 0.0
    return out


# ---------------------------------------------------------------------- the sweep
def pareto_front(points: list[dict]) -> list[dict]:
    """The non-dominated points: no other point has a harmful rate as low and helpfulness as high,
    and one of them strictly better."""
    def dominates(a, b):
        return (a["harmful_rate"] <= b["harmful_rate"] and a["helpfulness"] >= b["helpfulness"]
                and (a["harmful_rate"] < b["harmful_rate"] or a["helpfulness"] > b["helpfulness"]))

    return sorted((p for p in points if not any(dominates(q, p) for q in points)), key=lambda p: p["harmful_rate"])


class KLStopper(Stopper):
    """Ends a trial whose per-token KL to the reference runs past max_kl (reward hacking)."""

    def __init__(self, max_kl: float | None):
        self.max_kl, self.reasons = max_kl, {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.max_kl is not None and result.get("kl", 0.0) > self.max_kl:
            self.reasons[trial_id] = f"stopped: kl {result['kl']:.3g} > {self.max_kl} at step {result.get('step')}"
            return True
        return False

    def stop_all(self) -> bool:
        return False


def sweep_inputs(run: Path, cfg, from_stage: str | None) -> dict:
    """Where every trial starts: a policy, the latest fitted reward and cost models, the latest
    training prompts, and threshold auto's reference set (the first ingest's eval split)."""
    def done(n):
        return (run / "stages" / n / "manifest.json").is_file()

    def latest(base):
        name = latest_stage(RunDir(run).finished_stages(), base)
        if name is None:
            raise ValueError(f"{run} has no finished {base} stage; run the pipeline (at least through {base}) first")
        return name

    start = from_stage or ("sft" if cfg.world.enabled else None)
    if start == "sft":
        policy = run / "stages" / "sft" / "model"
    elif start is None:
        policy = Path(cfg.model.path)
    else:
        policy = run / "stages" / start / "policy"
    if not policy.exists() or (start not in (None, "sft") and not done(start)):
        raise ValueError(f"--from {start}: no finished policy at {policy}")
    return {"policy": str(policy), "reward_model": str(run / "stages" / latest("fit_reward") / "model"),
            "cost_model": str(run / "stages" / latest("fit_cost") / "model"),
            "train_pairs": str(run / "stages" / latest("ingest") / "train.parquet"),
            "reference": str(run / "stages" / "ingest" / "eval.parquet"), "start": start or "model.path"}


def judge_start(cfg, run: Path, inputs: dict, prompts: list[dict], log, sweep_dir: Path) -> dict:
    """The starting policy judged as the trials are (and as `evaluate` judges it: the same figures):
    its point on the plot, the reward -> oracle helpfulness line the trials' reward_helpfulness_gap
    uses, and its rewards for the win rate. Its judged answers go to SWEEP_DIR/start_samples.jsonl."""
    from stages.common.judging import eval_max_new_tokens, judge_models, judged_answers, reward_calibration, summarize
    from stages.common.model_actors import rollout_actor, scorer_actors

    ev = cfg.evaluate
    log(f"judging the starting policy ({inputs['start']}) on {len(prompts)} prompts x {ev.samples_per_prompt}")
    with scorer_actors(cfg, judge_models(ev.judge, inputs["reward_model"], inputs["cost_model"]), "sweep") as scorers:
        with rollout_actor(cfg, inputs["policy"], "sweep-start-rollout", ev.engine, eval_max_new_tokens(cfg)) as actor:
            rows = judged_answers(cfg, actor, scorers, prompts, policy_dir=inputs["policy"])
    m = summarize(rows)
    write_jsonl(sweep_dir / "start_samples.jsonl", rows)  # the starting policy's judged answers
    out = {"harmful_rate": m["harmful_rate"], "over_refusal_rate": m["over_refusal_rate"], "harmful_n": m["harmful_n"],
           "sft_rewards": [r["reward"] for r in rows],
           "calibration": [0.0, 0.0], "helpfulness": 0.5}
    if ev.judge == "oracle":
        out["calibration"] = list(reward_calibration(rows))
        out["helpfulness"] = m["helpfulness"]
    return out


def tuner(cfg, spec: SweepFile, trials: list[dict], env: dict, stopper: "KLStopper", out: Path, resume: bool, log):
    """The Tune experiment of the sweep's trials (each in a placement group of its round's plan), or
    the interrupted one restored, its finished trials kept."""
    from ray import tune

    def resources(config):
        rl = trial_config(cfg, config["trial"]["params"]).safe_rlhf
        return tune.PlacementGroupFactory([{"CPU": 0.01}] + resource_plan(rl).bundles(), strategy="PACK")

    # env goes through the object store once (with_parameters), not into every trial's config
    trainable = tune.with_resources(tune.with_parameters(run_trial, env=env), resources)
    storage = out / "tune"
    experiment = storage / "safe_rlhf_sweep"
    if resume and experiment.is_dir():
        log(f"resuming {experiment}: finished trials are kept")
        return tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    return tune.Tuner(trainable, param_space={"trial": tune.grid_search(trials)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials,
                                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name),
                      run_config=tune.RunConfig(name="safe_rlhf_sweep", storage_path=str(storage), stop=stopper, verbose=1))


class SweepInterrupted(Exception):
    """Ctrl-C stopped the sweep: Tune ended its trials and saved its state; `--resume` continues it."""


def fit_watching_ctrl_c(tuner) -> tuple[Any, bool]:
    """(tuner.fit()'s results, whether Ctrl-C stopped it). Tune takes the first Ctrl-C itself: it
    ends the trials, saves the experiment and puts back the SIGINT handler it found, this one, which
    only Tune's handling of a Ctrl-C puts back (and a second Ctrl-C raises KeyboardInterrupt)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # no signals here, nor in Tune
        return tuner.fit(), False

    def again(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, again)
    try:
        results = tuner.fit()
        return results, signal.getsignal(signal.SIGINT) is again
    finally:
        signal.signal(signal.SIGINT, previous)


def trial_row(result, cfg, stopper: "KLStopper") -> dict:
    """One row of trials.parquet: the trial, how it ended, and its judged figures."""
    trial, m = result.config["trial"], result.metrics or {}
    status = ("error: " + str(result.error).splitlines()[0][:200] if result.error else
              stopper.reasons.get(m.get("trial_id"), "done" if m.get("done") else "stopped"))
    return {"trial": trial["id"], "seed": trial["seed"], "algorithm": trial["params"].get("algorithm", cfg.safe_rlhf.algorithm),
            "constraints": trial["params"].get("constraints", cfg.safe_rlhf.constraints),
            "params": json.dumps(trial["params"], sort_keys=True), "status": status,
            **{k: m.get(k) for k in ("harmful_rate", "over_refusal_rate", "helpfulness", "reward_helpfulness_gap", "reward_mean",
                                     "cost_mean", "kl", "lambda", "threshold", "steps")}}


def sweep(run_dir: str | Path, sweep_file: str | Path, resume: bool = False, from_stage: str | None = None,
          log=print) -> dict:
    """Run (or continue) a sweep; write trials.parquet, frontier.json and pareto.png; -> a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.ray_session import connect, disconnect
    from stages.evaluate import held_out_prompts

    run = Path(run_dir).resolve()
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    spec, trials = load_sweep(sweep_file, cfg)
    out = run / "sweeps" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    inputs = sweep_inputs(run, cfg, from_stage)
    judge = cfg.evaluate.judge
    prompts = held_out_prompts(cfg, run / "stages" / "world" / "eval_prompts.jsonl" if cfg.world.enabled else None)
    owns = connect(cfg.ray)
    try:
        start_file = out / "start.json"
        if resume and start_file.is_file():
            start = json.loads(start_file.read_text())
        else:
            start = judge_start(cfg, run, inputs, prompts, log, out)
            atomic_write_text(start_file, json.dumps(start))
        env = {"run_dir": str(run), "sweep_dir": str(out), "inputs": inputs, "prompts": prompts, "judge": judge,
               "calibration": start["calibration"], "sft_rewards": start["sft_rewards"]}

        stopper = KLStopper(spec.stop.max_kl if spec.stop else None)
        results, interrupted = fit_watching_ctrl_c(tuner(cfg, spec, trials, env, stopper, out, resume, log))
    finally:
        if owns:
            disconnect()
    if interrupted:  # no trials.parquet or front from part of the trials
        finished = sum(bool((r.metrics or {}).get("done")) for r in results)
        raise SweepInterrupted(f"interrupted (Ctrl-C) with {finished} of {len(trials)} trials finished")
    rows = sorted((trial_row(r, cfg, stopper) for r in results), key=lambda x: x["trial"])
    pq.write_table(pa.Table.from_pylist(rows), out / "trials.parquet")
    judged = [r for r in rows if r["harmful_rate"] is not None and r["helpfulness"] is not None]
    front = pareto_front(judged)
    (out / "frontier.json").write_text(json.dumps({"judge": judge, "start": {k: start.get(k) for k in ("harmful_rate", "over_refusal_rate", "helpfulness")},
                                                   "frontier": front}, indent=2))
    plot_pareto(out / "pareto.png", judged, start, judge)
    log(f"{len(rows)} trials ({sum(r['status'] == 'done' for r in rows)} done); front: "
        + "; ".join(f"{r['trial']} ({r['harmful_rate']:.3f}, {r['helpfulness']:.3f})" for r in front))
    return {"trials": len(rows), "done": sum(r["status"] == "done" for r in rows), "frontier": [r["trial"] for r in front],
            "outputs": [str(out / n) for n in ("trials.parquet", "frontier.json", "pareto.png")]}


def plot_pareto(path: Path, rows: list[dict], start: dict, judge: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = {name: alg.colour for name, alg in ALGORITHMS.items()}  # each algorithm's, from its registration
    # one front per algorithm and constraint set; per-category constraints: the algorithm's colour, triangles
    for alg, constraints in sorted({(r["algorithm"], r.get("constraints", "single")) for r in rows}):
        pts = [r for r in rows if r["algorithm"] == alg and r.get("constraints", "single") == constraints]
        label = "Safe RLHF (ppo_lag)" if alg == "ppo_lag" else alg
        per_category = constraints == "per_category"
        ax.scatter([p["harmful_rate"] for p in pts], [p["helpfulness"] for p in pts], color=colours.get(alg), alpha=0.7,
                   marker="^" if per_category else "o", label=label + (", per category" if per_category else ""))
        front = pareto_front(pts)
        ax.plot([p["harmful_rate"] for p in front], [p["helpfulness"] for p in front], color=colours.get(alg), lw=1,
                ls="--" if per_category else "-")
    ax.scatter([start["harmful_rate"]], [start["helpfulness"]], marker="*", s=200, color="k", label="SFT (start)")
    ax.set_xlabel(f"harmful rate ({judge})")
    ax.set_ylabel("helpfulness")
    ax.set_title("harmlessness-helpfulness trade-off (up and left is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
