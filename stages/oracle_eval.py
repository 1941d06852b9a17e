"""Judging a policy with the built-in world's oracle (independent of learned reward/cost models).

Shared by the stages that evaluate a policy: SFT (its harmful rate), the fits (`policy_accuracy`
on fresh pairs of the policy's own samples), the rounds and the final evaluation.
"""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from stages.text import format_prompt
from stages.world import World


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def judge_policy(engine, prompts: list[dict], sampling, world: World | None = None) -> tuple[dict, list[dict]]:
    """Sample one answer per prompt and judge it. prompts: rows of eval_prompts.jsonl.

    -> (metrics: harmful_rate on harmful prompts, helpfulness on benign prompts, ...; samples)
    """
    world = world or World()
    gen = engine.generate([format_prompt(p["prompt"]) for p in prompts], sampling)
    samples = []
    for p, text, ids in zip(prompts, gen.texts, gen.response_ids):
        j = world.judge(p["prompt"], text)
        samples.append({"prompt": p["prompt"], "harmful_prompt": p["harmful"], "answer": text,
                        "helpfulness": j.helpfulness, "harmful": j.harmful, "refusal": j.refusal,
                        "tokens": len(ids)})
    harmful = [s for s in samples if s["harmful_prompt"]]
    benign = [s for s in samples if not s["harmful_prompt"]]
    metrics = {
        "harmful_rate": round(statistics.mean(s["harmful"] for s in harmful), 4) if harmful else None,
        "helpfulness": round(statistics.mean(s["helpfulness"] for s in benign), 4) if benign else None,
        "harmful_prompt_helpfulness": round(statistics.mean(s["helpfulness"] for s in harmful), 4) if harmful else None,
        "benign_refusal_rate": round(statistics.mean(s["refusal"] for s in benign), 4) if benign else None,
        "response_length": round(statistics.mean(s["tokens"] for s in samples), 2),
    }
    return metrics, samples


def policy_pairs(engine, prompts: list[dict], sampling, seed: int, repeats: int = 2,
                 world: World | None = None) -> list[dict]:
    """Fresh pairs of the policy's own answers (two samples per prompt, `repeats` times),
    labelled by the oracle annotator, in the PKU schema plus the oracle's tie flags.

    A pair whose answers the judge rates equally helpful (or equally safe) has a coin-flip label;
    `better_is_tie` / `safer_is_tie` mark those so accuracy is measured where a label means
    something.
    """
    world = world or World()
    rng = random.Random(f"policy-pairs-{seed}")
    rows = []
    for r in range(repeats):
        texts = [format_prompt(p["prompt"]) for p in prompts]
        a = engine.generate(texts, sampling.__class__(**{**sampling.__dict__, "seed": seed * 100 + 2 * r}))
        b = engine.generate(texts, sampling.__class__(**{**sampling.__dict__, "seed": seed * 100 + 2 * r + 1}))
        for p, t0, t1 in zip(prompts, a.texts, b.texts):
            j0, j1 = world.judge(p["prompt"], t0), world.judge(p["prompt"], t1)
            labels = world.annotate(rng, p["prompt"], t0, t1)
            rows.append({"prompt": p["prompt"], "response_0": t0, "response_1": t1, **labels,
                         "better_is_tie": j0.helpfulness == j1.helpfulness,
                         "safer_is_tie": j0.harmful == j1.harmful and j0.severity == j1.severity})
    return rows
