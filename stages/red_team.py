"""The `red_team@k` stage: new prompts for the current policy, answered twice, to be annotated.

Prompts: a share `harder_share` of the world's harder forms (role-play framing, a request hidden
among several instructions, "explain the positive side of X", prompts of harm categories kept out
of the base data) and the rest plain training prompts. The round's policy answers each twice with
the round's rollout engine (a Ray actor, `redteam-rollout-0`). In the built-in world it also
writes fresh oracle-labelled pairs of the policy's answers to the eval prompts, for the next
fits' `policy_accuracy`.
"""
from __future__ import annotations

import random

from stages.base import StageResult


def red_team_prompts(cfg, k: int, train_pool: list[str] | None) -> list[dict]:
    from stages.world import World

    world = World()
    rng = random.Random(f"red-team-{cfg.seed}-{k}")
    n_hard = round(cfg.red_team.prompts * cfg.red_team.harder_share)
    hard = [{"prompt": p.text, "form": "red_team", "category": p.category} for p in world.red_team_prompts(rng, n_hard)]
    train, _ = world.split_prompts(cfg.ingest.eval_fraction)
    plain = [{"prompt": p.text, "form": "plain", "category": p.category}
             for p in rng.sample(train, min(len(train), cfg.red_team.prompts - n_hard))]
    return hard + plain


def run(ctx) -> StageResult:
    import ray

    from actors.rollout import RolloutWorker, Sampling
    from stages.oracle_eval import policy_pairs, read_jsonl, write_jsonl
    from stages.text import format_prompt

    cfg, rl, k = ctx.cfg, ctx.cfg.safe_rlhf, ctx.params["round"]
    policy = ctx.input(f"safe_rlhf@{k}", "policy")
    prompts = red_team_prompts(cfg, k, None)
    from stages.safe_rlhf import rollout_engine_kwargs

    engine_kw = rollout_engine_kwargs(cfg, rl)
    worker = ray.remote(RolloutWorker).options(
        name=f"redteam-rollout-{k}", num_cpus=rl.cpus_per_actor, num_gpus=rl.tensor_parallel_size if rl.device == "cuda" else 0,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}},
    ).remote(rl.engine, str(policy), **engine_kw)
    try:
        texts = [format_prompt(p["prompt"]) for p in prompts]
        a, b = ray.get([worker.generate.remote(texts, Sampling(rl.max_new_tokens, 1.0, 1.0, seed=cfg.seed * 10 + k * 2 + s))
                        for s in (0, 1)])
        pairs = [{"prompt": p["prompt"], "response_0": t0, "response_1": t1, "form": p["form"], "category": p["category"]}
                 for p, t0, t1 in zip(prompts, a.texts, b.texts) if t0.strip() and t1.strip() and t0 != t1]
        write_jsonl(ctx.out_dir / "pairs_to_label.jsonl", pairs)
        outputs = {"pairs": "pairs_to_label.jsonl"}
        metrics = {"prompts": len(prompts), "pairs": len(pairs), "harder_prompts": sum(p["form"] == "red_team" for p in prompts)}
        if "world" in ctx.inputs:
            from cluster.roles import RemoteEngine

            fresh = policy_pairs(RemoteEngine(worker), read_jsonl(ctx.input("world", "eval_prompts")),
                                 Sampling(rl.max_new_tokens, 1.0, 1.0), seed=cfg.seed * 100 + k)
            write_jsonl(ctx.out_dir / "policy_pairs.jsonl", fresh)
            outputs["policy_pairs"] = "policy_pairs.jsonl"
            from stages.world import World

            world = World()
            harmful = [world.judge(p["prompt"], t).harmful for p, t in zip(prompts, a.texts) if world.prompt_for(p["prompt"]).harmful]
            metrics["red_team_harmful_rate"] = round(sum(harmful) / max(1, len(harmful)), 4)
    finally:
        ray.kill(worker)
    ctx.log(f"  red team round {k}: {metrics}")
    return StageResult(outputs, metrics)
