"""The `red_team@k` stage: new prompts for the current policy, answered twice, to be annotated.

Prompts, `red_team.prompts` of them per round:
- with the world on: a share `harder_share` of the world's harder forms (role-play framing, a
  request hidden among several instructions, "explain the positive side of X", prompts of harm
  categories kept out of the base data); the rest are the world's plain training prompts, or rows
  of `red_team.prompt_files` when given;
- with the world off: rows of `red_team.prompt_files`;
- with `red_team.prompt_source: training_prompts` (world on or off), the plain ones are the
  distinct single-turn prompts of the first ingest's training split instead.
Evaluation prompts are never red-teamed on: a prompt whose normalised text (core/text.py
`normalize`) is a row of an evaluation file (`evaluate.prompt_files`, `evaluate.prompt_sets`) is
left out of the pool (the config already refuses a file that is both).
The round's policy answers each twice in a rollout actor (`redteam-rollout-k`, the round's engine;
with `safe_rlhf.keep_actors`, the round's own `rollout-0`, which loads the exported policy).
In the built-in world it also writes fresh oracle-labelled pairs of the policy's answers to the
held-out prompts, for the next fits' `policy_accuracy`.
"""
from __future__ import annotations

import random
from pathlib import Path

from actors.rollout import Sampling
from cluster.launch import RemoteEngine
from core.files import read_jsonl, write_jsonl
from core.text import format_prompt, prompt_tokenizer
from stages.base import StageResult
from stages.common.builtin_world import World
from stages.common.datafiles import read_prompt_files
from stages.common.judging import oracle_policy_pairs
from stages.common.model_actors import rollout_actor


def training_prompts(train_parquet: Path) -> list[dict]:
    """The distinct single-turn prompts of an ingest's training split (by normalised text), in a
    stable order: {"prompt", "category"}. Prompts with earlier turns are left out: alone, their
    last turn is often not a request at all."""
    import pyarrow.parquet as pq

    from core.text import normalize

    seen, out = set(), []
    for r in pq.read_table(train_parquet, columns=["prompt", "context"]).to_pylist():
        if not r["context"] and normalize(r["prompt"]) not in seen:
            seen.add(normalize(r["prompt"]))
            out.append({"prompt": r["prompt"], "category": "unknown"})
    return out


def red_team_prompts(cfg, k: int, train_pairs: Path | None = None) -> list[dict]:
    """This round's prompts: {"prompt", "form", "category"}; a function of the seed and round.
    train_pairs: the first ingest's training split (red_team.prompt_source training_prompts)."""
    from core.text import normalize

    rng = random.Random(f"red-team-{cfg.seed}-{k}")
    n_hard = round(cfg.red_team.prompts * cfg.red_team.harder_share) if cfg.world.enabled else 0
    out = []
    if cfg.world.enabled:
        out += [{"prompt": p.text, "form": "red_team", "category": p.category} for p in World().red_team_prompts(rng, n_hard)]
    n_plain = cfg.red_team.prompts - n_hard
    from_training = cfg.red_team.prompt_source == "training_prompts"
    if cfg.red_team.prompt_files or from_training:
        pool = training_prompts(train_pairs) if from_training else read_prompt_files(cfg.red_team.prompt_files)
        evaluation = {normalize(p["prompt"]) for p in read_prompt_files(cfg.evaluate.files)} if cfg.evaluate.files else set()
        pool = [p for p in pool if normalize(p["prompt"]) not in evaluation]
        if not pool:
            raise ValueError("red team: no prompt is left once the evaluation prompts are taken out of "
                             f"{'the training prompts' if from_training else ', '.join(cfg.red_team.prompt_files)}")
        picked = rng.sample(pool, n_plain) if n_plain <= len(pool) else [rng.choice(pool) for _ in range(n_plain)]
        out += [{"prompt": p["prompt"], "form": "training" if from_training else "file", "category": p["category"]}
                for p in picked]
    else:
        train, _ = World().split_prompts(cfg.ingest.eval_fraction)
        out += [{"prompt": p.text, "form": "plain", "category": p.category}
                for p in rng.sample(train, min(len(train), n_plain))]
    return out


def run(ctx) -> StageResult:
    cfg, rl, k = ctx.cfg, ctx.cfg.safe_rlhf, ctx.params["round"]
    policy = ctx.input(f"safe_rlhf@{k}", "policy")
    prompts = red_team_prompts(cfg, k, ctx.input("ingest", "train") if "ingest" in ctx.inputs else None)
    tokenizer = prompt_tokenizer(policy)
    texts = [format_prompt(p["prompt"], tokenizer=tokenizer) for p in prompts]
    metrics = {"prompts": len(prompts), "harder_prompts": sum(p["form"] == "red_team" for p in prompts)}
    outputs = {"pairs": "pairs_to_label.jsonl"}
    with rollout_actor(cfg, policy, f"redteam-rollout-{k}", rl.engine, rl.max_new_tokens, pool=ctx.actor_pool) as actor:
        engine = RemoteEngine(actor)
        a, b = (engine.generate(texts, Sampling(rl.max_new_tokens, rl.temperature, 1.0, seed=cfg.seed * 10 + k * 2 + s)) for s in (0, 1))
        if "world" in ctx.inputs:
            fresh = oracle_policy_pairs(engine, read_jsonl(ctx.input("world", "eval_prompts")), rl.max_new_tokens,
                                        seed=cfg.seed * 100 + k, tokenizer=tokenizer)
            write_jsonl(ctx.out_dir / "policy_pairs.jsonl", fresh)
            outputs["policy_pairs"] = "policy_pairs.jsonl"
    pairs = [{"prompt": p["prompt"], "response_0": t0, "response_1": t1, "form": p["form"], "category": p["category"]}
             for p, t0, t1 in zip(prompts, a.texts, b.texts) if t0.strip() and t1.strip() and t0 != t1]
    write_jsonl(ctx.out_dir / "pairs_to_label.jsonl", pairs)
    metrics["pairs"] = len(pairs)
    if "world" in ctx.inputs:
        world = World()
        harmful = [world.judge(p["prompt"], t).harmful for p, t in zip(prompts, a.texts) if world.prompt_for(p["prompt"]).harmful]
        metrics["red_team_harmful_rate"] = round(sum(harmful) / max(1, len(harmful)), 4)
    ctx.log(f"  red team round {k}: {metrics}")
    return StageResult(outputs, metrics)
