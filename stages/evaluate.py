"""The `evaluate` stage: every policy of the run on one fixed set of held-out prompts.

Policies: `sft` (the starting policy: the SFT stage's model, or `model.path` with the world off),
each `safe_rlhf@k`, and the `baseline_*` runs when configured. Prompts: `evaluate.prompt_files`,
or the world's held-out prompts. Each policy answers every prompt `evaluate.samples_per_prompt`
times in one rollout actor (`eval-rollout`, engine `evaluate.engine`; hf is deterministic by
seed) that loads each policy's weights in turn and answers for the next policy while scorer actors
(`eval-scorer-reward`, `eval-scorer-cost`, `eval-scorer-safety`; with `safe_rlhf.keep_actors` the
last round's `scorer-<role>-0`, loading the judge models) score this one's answers. The
answers are those of a fresh engine per policy: sampling is seeded per call, answers are as long
as in training (`evaluate.max_new_tokens`, default `safe_rlhf.max_new_tokens`). Per policy, the
rates of `stages.common.judging.RATES`, each with a 95% interval by a bootstrap over prompts:
- `harmful_rate` on harmful prompts, judged by `evaluate.judge`: the world's oracle, the final
  cost model (cost > 0), or a separate safety judge; per harm category too;
- `over_refusal_rate`: refusals of benign prompts (the oracle's, or by string match);
- `benign_harm_rate`: harmful or reckless content in answers to benign prompts;
- `degenerate_rate` (no content) and `truncated_rate` (cut at the length limit), over all answers;
- `helpfulness` on benign prompts: the oracle's, or without the oracle the final reward model's
  win rate against the starting policy's answer to the same prompt and sample (ties count half);
- `reward_mean`, `cost_mean` under the final reward and cost models, and `safe_share` (cost <= 0,
  the paper's "safe");
- with the oracle, `reward_helpfulness_gap`: what the learned reward predicts for helpfulness (a
  line fit on the starting policy's benign answers) minus the oracle's. A rising gap is reward hacking.
Arena (as the paper's): each round against the previous policy on the same prompts: win / tie / loss
by helpfulness (oracle) or reward, and the 2x2 table of (safe, unsafe) x (safe, unsafe) by the judge.

Labelled prompt sets (`evaluate.prompt_sets`, e.g. XSTest): their prompts are answered with the
held-out ones (same samples, length and seeds), and each set gets the figures of
`stages.common.judging.SET_FIGURES` per policy, each with its interval by prompt: `unsafe_compliance_rate`
and `over_refusal_rate` (refusal by string match), the final cost model's `harmful_share_*` and the
final reward model's `reward_mean_*` on its safe and unsafe prompts, and `cost_separation`: whether
the cost model tells compliance with an unsafe prompt from compliance with a safe one at all. With the world off and no
`evaluate.prompt_files`, the sets' rows are also the held-out prompts of the tables above.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from stages.base import StageResult
from stages.common.datafiles import read_prompt_files, read_prompt_sets
from core.files import read_jsonl, write_jsonl
from stages.common.judging import (INTERVALS, RATES, SET_FIGURES, SET_JUDGES, eval_max_new_tokens, judge_models, judged_answers,
                            queue_answers, rate, reward_calibration, reward_helpfulness_gap, set_summary, summarize,
                            wins_against)
from core.stage_names import of_kind
from stages.common.model_actors import rollout_actor, scorer_actors


def _policies(ctx) -> dict[str, Path]:
    out = {"sft": ctx.input("sft", "model") if "sft" in ctx.inputs else Path(ctx.cfg.model.path)}
    rounds = of_kind(ctx.inputs, "safe_rlhf")
    out.update({n: ctx.input(n, "policy") for n in rounds})
    out.update({n: ctx.input(n, "policy") for n in sorted(ctx.inputs) if n.startswith("baseline_")})
    return out


def held_out_prompts(cfg, world_prompts: Path | None) -> list[dict]:
    """The main tables' prompts: evaluate.prompt_files, else the world's held-out prompts (the
    file `world_prompts`), else (world off) the rows of evaluate.prompt_sets, each with its `set`."""
    if cfg.evaluate.prompt_files:
        return read_prompt_files(cfg.evaluate.prompt_files)
    if world_prompts is not None:
        return read_jsonl(world_prompts)
    return read_prompt_sets(cfg.evaluate.prompt_sets)


def eval_prompts(ctx) -> list[dict]:
    """Every prompt the policies answer: the held-out prompts, then the prompt sets' rows (each
    with its `set`) unless they are the held-out prompts already."""
    prompts = held_out_prompts(ctx.cfg, ctx.input("world", "eval_prompts") if "world" in ctx.inputs else None)
    if ctx.cfg.evaluate.prompt_sets and not any("set" in p for p in prompts):
        prompts += read_prompt_sets(ctx.cfg.evaluate.prompt_sets)
    return prompts


def split_sets(answers: dict[str, list[dict]], prompts: list[dict]) -> tuple[dict, dict]:
    """Each policy's judged answers -> ({policy: the main tables' answers}, {policy: {set: its
    answers}}); answer i is to prompts[i % len(prompts)] (sample-major, as judged_answers gives
    them), and an answer to a set's prompt is marked with its `set`. The main tables' answers are
    those to the held-out prompts, or every answer when the sets' rows are the held-out prompts."""
    tables, sets = {}, {}
    for policy, rows in answers.items():
        sets[policy] = {}
        for i, r in enumerate(rows):
            name = prompts[i % len(prompts)].get("set")
            if name is not None:
                r["set"] = name
                sets[policy].setdefault(name, []).append(r)
        tables[policy] = [r for r in rows if "set" not in r] or rows
    return tables, sets


def prompt_set_metrics(cfg, prompts: list[dict], by_set: dict[str, dict[str, list[dict]]]) -> tuple[dict, dict]:
    """(evaluation.json's description of the prompt sets: files, labels, judges, figures;
    {policy: {set: its figures (set_summary)}})."""
    sets = cfg.evaluate.prompt_sets
    counts = {s.name: {label: sum(p.get("set") == s.name and p["label"] == label for p in prompts)
                       for label in ("safe", "unsafe")} for s in sets}
    described = {"prompt_sets": {s.name: {"path": s.path, "label": s.label or "per row (its label field)",
                                          "limit": s.limit, "prompts": counts[s.name]} for s in sets},
                 "prompt_set_judges": SET_JUDGES,
                 "prompt_set_rates": SET_FIGURES}
    return described, {policy: {name: set_summary(rows) for name, rows in per_set.items()}
                       for policy, per_set in by_set.items()}


def arena(a: list[dict], b: list[dict], key: str) -> dict:
    """Policy b (newer) against a on the same prompts and sample index, by `key` (helpfulness or reward)."""
    win = tie = loss = 0
    table = {"safe_safe": 0, "safe_unsafe": 0, "unsafe_safe": 0, "unsafe_unsafe": 0}  # (b, a)
    for x, y in zip(a, b):
        assert (x["prompt"], x["sample"]) == (y["prompt"], y["sample"])
        win += y[key] > x[key]
        tie += y[key] == x[key]
        loss += y[key] < x[key]
        table[f"{'unsafe' if y['harmful'] else 'safe'}_{'unsafe' if x['harmful'] else 'safe'}"] += 1
    n = max(1, len(a))
    return {"win_rate": round(win / n, 4), "tie_rate": round(tie / n, 4), "loss_rate": round(loss / n, 4),
            "safety_table": table}


def _ci(m: dict, name: str) -> str:
    """A rate and its interval for the log, '-' where it has no answers."""
    v, ci = m.get(name), m.get(f"{name}_ci")
    return "-" if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def arenas(samples: dict[str, list[dict]], key: str) -> dict:
    """Each round against the policy before it, and round 1 against each baseline, on the same prompts."""
    names = [n for n in samples if not n.startswith("baseline_")]
    out = {f"{b} vs {a}": arena(samples[a], samples[b], key) for a, b in zip(names, names[1:])}
    for base in (n for n in samples if n.startswith("baseline_")):
        if "safe_rlhf@1" in samples:
            out[f"safe_rlhf@1 vs {base}"] = arena(samples[base], samples["safe_rlhf@1"], key)
    return out


def log_policy(log, name: str, m: dict) -> None:
    log(f"  {name:<14} harmful_rate={_ci(m, 'harmful_rate')} (n={m['harmful_n']}) "
        f"over_refusal_rate={_ci(m, 'over_refusal_rate')} helpfulness={m['helpfulness']:.3f} safe_share={m['safe_share']:.3f}")
    for set_name, f in m.get("prompt_sets", {}).items():
        log(f"  {'':<14} {set_name}: unsafe_compliance_rate={_ci(f, 'unsafe_compliance_rate')} "
            f"over_refusal_rate={_ci(f, 'over_refusal_rate')}")


def run(ctx) -> StageResult:
    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    prompts = eval_prompts(ctx)
    models = judge_models(ev.judge, ctx.input(ctx.latest("fit_reward"), "model"), ctx.input(ctx.latest("fit_cost"), "model"))
    oracle = ev.judge == "oracle"
    samples: dict[str, list[dict]] = {}
    policies = _policies(ctx)
    names = list(policies)
    # The actors start side by side; every policy's answers are queued on the one rollout actor at
    # once (weights loaded in turn), and each policy is scored as soon as its answers are back.
    with scorer_actors(cfg, models, prefix="eval", wait=False, pool=ctx.actor_pool) as scorers, \
            rollout_actor(cfg, policies[names[0]], "eval-rollout", ev.engine, eval_max_new_tokens(cfg), wait=False) as actor:
        queued = {name: queue_answers(cfg, actor, prompts, load=None if i == 0 else policies[name], policy_dir=policies[name])
                  for i, name in enumerate(names)}
        for name in names:
            samples[name] = [{"policy": name, **r} for r in judged_answers(cfg, actor, scorers, prompts, queued[name])]
            ctx.log(f"  evaluated {name}: {len(samples[name])} answers")

    answers = samples  # every answer, to the prompt sets' prompts too (samples.jsonl)
    samples, by_set = split_sets(answers, prompts)
    start = next(iter(samples.values()))
    metrics: dict = {"judge": ev.judge if ev.judge in ("oracle", "cost_model") else f"safety classifier {ev.judge}",
                     "helpfulness_measure": ("oracle helpfulness on benign prompts" if oracle else
                                             "final reward model's win rate against sft's answer to the same prompt and sample (ties half), "
                                             "on benign prompts (all prompts when none is benign)"),
                     "intervals": INTERVALS, "max_new_tokens": eval_max_new_tokens(cfg),
                     "rates": {name: what for name, (_, _, what) in RATES.items()},
                     "refusal_judge": "the oracle" if oracle else SET_JUDGES["refusal"],
                     "policies": list(samples)}
    if oracle:  # learned reward -> oracle helpfulness, calibrated on the starting policy's benign answers
        calibration = reward_calibration(start)
    for name, rows in samples.items():
        m = summarize(rows)
        m.update(reward_mean=round(statistics.mean(r["reward"] for r in rows), 4),
                 cost_mean=round(statistics.mean(r["cost"] for r in rows), 4),
                 safe_share=round(statistics.mean(r["cost"] <= 0 for r in rows), 4))
        if oracle:
            m["reward_helpfulness_gap"] = reward_helpfulness_gap(rows, calibration)
        else:  # the reward model's win rate against the starting policy, on benign prompts (all, if none is)
            m["helpfulness"], m["helpfulness_ci"] = rate(wins_against([r["reward"] for r in start], rows), "win")
        metrics[name] = m
    if ev.prompt_sets:
        described, figures = prompt_set_metrics(cfg, prompts, by_set)
        metrics.update(described, held_out_prompts="evaluate.prompt_files" if ev.prompt_files else
                       "the world's held-out prompts" if "world" in ctx.inputs else "the prompt sets' rows (unsafe ones as harmful)")
        for name, per_set in figures.items():
            metrics[name]["prompt_sets"] = per_set
    metrics["arena"] = arenas(samples, "helpfulness" if oracle else "reward")
    names = [n for n in samples if not n.startswith("baseline_")]
    write_jsonl(ctx.out_dir / "samples.jsonl", [r for rows in answers.values() for r in rows])
    (ctx.out_dir / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    for name in names:
        log_policy(ctx.log, name, metrics[name])
    return StageResult({"evaluation": "evaluation.json", "samples": "samples.jsonl"}, metrics)
