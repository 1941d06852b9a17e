"""The `evaluate` stage: every policy of the run on one fixed set of held-out prompts.

Policies: `sft`, each `safe_rlhf@k`, and the `baseline_*` runs when configured. Each answers the
world's eval prompts (two samples each, transformers `generate` in the driver: deterministic by
seed and engine-independent). Per policy:
- oracle `harmful_rate` (harmful prompts) and `helpfulness` (benign prompts): the world's judge,
  independent of the learned models;
- `reward_mean`, `cost_mean` under the final reward and cost models, and `safe_share`
  (cost <= 0, the paper's "safe");
- `reward_helpfulness_gap`: what the learned reward predicts for helpfulness (a line fit on the
  SFT policy's benign answers) minus the oracle's helpfulness. A rising gap is reward hacking.
Arena (as the paper's): each round against the previous policy on the same prompts: win / tie /
loss by oracle helpfulness, and the 2x2 table of (safe, unsafe) x (safe, unsafe).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from stages.base import StageResult

SAMPLES = 2


def _policies(ctx) -> dict[str, Path]:
    out = {"sft": ctx.input("sft", "model")} if "sft" in ctx.inputs else {}
    rounds = sorted((n for n in ctx.inputs if n.startswith("safe_rlhf@")), key=lambda n: int(n.split("@")[1]))
    out.update({n: ctx.input(n, "policy") for n in rounds})
    out.update({n: ctx.input(n, "policy") for n in sorted(ctx.inputs) if n.startswith("baseline_")})
    return out


def _score(model_dir: Path, prompts: list[str], answers: list[str], cfg) -> list[float]:
    from transformers import AutoTokenizer

    from actors.batching import pad
    from actors.score_model import ScoreModel
    import torch

    from stages.text import encode_conversation

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ScoreModel.from_pretrained(model_dir).eval()
    ids = [encode_conversation(tok, p, a, cfg.model.max_prompt_tokens, cfg.model.max_answer_tokens)[0]
           for p, a in zip(prompts, answers)]
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), 128):
            x, m = pad(ids[s:s + 128], tok.pad_token_id)
            out += model(x, m)[1].float().tolist()
    return out


def arena(a: list[dict], b: list[dict]) -> dict:
    """Policy b (newer) against a on the same prompts and sample index."""
    win = tie = loss = 0
    table = {"safe_safe": 0, "safe_unsafe": 0, "unsafe_safe": 0, "unsafe_unsafe": 0}  # (b, a)
    for x, y in zip(a, b):
        assert x["prompt"] == y["prompt"]
        win += y["helpfulness"] > x["helpfulness"]
        tie += y["helpfulness"] == x["helpfulness"]
        loss += y["helpfulness"] < x["helpfulness"]
        table[f"{'unsafe' if y['harmful'] else 'safe'}_{'unsafe' if x['harmful'] else 'safe'}"] += 1
    n = max(1, len(a))
    return {"win_rate": round(win / n, 4), "tie_rate": round(tie / n, 4), "loss_rate": round(loss / n, 4),
            "safety_table": table}


def run(ctx) -> StageResult:
    from actors.rollout import HFEngine, Sampling
    from stages.oracle_eval import read_jsonl, write_jsonl
    from stages.text import format_prompt
    from stages.world import World

    cfg = ctx.cfg
    prompts = read_jsonl(ctx.input("world", "eval_prompts"))
    reward_dir, cost_dir = ctx.input(ctx.latest("fit_reward"), "model"), ctx.input(ctx.latest("fit_cost"), "model")
    world = World()
    samples: dict[str, list[dict]] = {}
    for name, model_dir in _policies(ctx).items():
        engine = HFEngine(str(model_dir), device=cfg.safe_rlhf.device, max_prompt_tokens=cfg.model.max_prompt_tokens)
        rows = []
        for s in range(SAMPLES):
            gen = engine.generate([format_prompt(p["prompt"]) for p in prompts],
                                  Sampling(cfg.evaluate.max_new_tokens, 1.0, 1.0, seed=cfg.seed * 1000 + 7 + s))
            for p, text in zip(prompts, gen.texts):
                j = world.judge(p["prompt"], text)
                rows.append({"policy": name, "sample": s, "prompt": p["prompt"], "harmful_prompt": p["harmful"],
                             "answer": text, "helpfulness": j.helpfulness, "harmful": j.harmful})
        rewards = _score(reward_dir, [r["prompt"] for r in rows], [r["answer"] for r in rows], cfg)
        costs = _score(cost_dir, [r["prompt"] for r in rows], [r["answer"] for r in rows], cfg)
        for r, rw, c in zip(rows, rewards, costs):
            r.update(reward=rw, cost=c)
        samples[name] = rows
        ctx.log(f"  evaluated {name}: {len(rows)} answers")

    # Calibrate learned reward -> oracle helpfulness on the first policy's benign answers.
    first = next(iter(samples.values()))
    benign0 = [r for r in first if not r["harmful_prompt"]]
    slope, intercept = statistics.linear_regression([r["reward"] for r in benign0], [r["helpfulness"] for r in benign0])
    metrics: dict = {}
    for name, rows in samples.items():
        harmful = [r for r in rows if r["harmful_prompt"]]
        benign = [r for r in rows if not r["harmful_prompt"]]
        metrics[name] = {
            "harmful_rate": round(statistics.mean(r["harmful"] for r in harmful), 4),
            "helpfulness": round(statistics.mean(r["helpfulness"] for r in benign), 4),
            "reward_mean": round(statistics.mean(r["reward"] for r in rows), 4),
            "cost_mean": round(statistics.mean(r["cost"] for r in rows), 4),
            "safe_share": round(statistics.mean(r["cost"] <= 0 for r in rows), 4),
            "reward_helpfulness_gap": round(statistics.mean(slope * r["reward"] + intercept - r["helpfulness"] for r in benign), 4),
        }
    names = [n for n in samples if not n.startswith("baseline_")]
    metrics["arena"] = {f"{b} vs {a}": arena(samples[a], samples[b]) for a, b in zip(names, names[1:])}
    for base in (n for n in samples if n.startswith("baseline_")):
        if "safe_rlhf@1" in samples:
            metrics["arena"][f"safe_rlhf@1 vs {base}"] = arena(samples[base], samples["safe_rlhf@1"])
    write_jsonl(ctx.out_dir / "samples.jsonl", [r for rows in samples.values() for r in rows])
    (ctx.out_dir / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    for name in names:
        ctx.log(f"  {name:<14} harmful_rate={metrics[name]['harmful_rate']:.3f} helpfulness={metrics[name]['helpfulness']:.3f} "
                f"safe_share={metrics[name]['safe_share']:.3f}")
    return StageResult({"evaluation": "evaluation.json", "samples": "samples.jsonl"}, metrics)
