"""What a round starts from (`RoundSetup`: its settings, models, prompts, threshold and
constraints) and where it runs (`RoundPlace`: its folder, log, placement and actor pool). A stage's
context gives both (`from_context`); a sweep trial builds them from its own."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from actors.score_model import score_model_categories
from cluster.weight_sync.checkpoint import sync_dir_for
from core import objectives as O
from core.text import format_prompt, prompt_tokenizer, same_tokenizer
from stages.base import StageContext
from stages.run_config import RunConfig
from stages.safe_rlhf.settings import SafeRLHFConfig

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from cluster.pool import ActorPool


@dataclass(frozen=True)
class RoundPlace:
    """Where and how a round runs: what `train_round` and its roles use of a stage's context."""
    name: str  # the stage's name (safe_rlhf@k, a baseline's, a sweep trial's): its actors' placement group
    cfg: RunConfig
    out_dir: Path  # checkpoints, metrics.jsonl, the exported policy
    sync_dir: Path  # the weight push's folder (cluster/weight_sync/checkpoint.py)
    log: Callable[[str], None] = print
    report: Callable[[dict], None] = lambda metrics: None  # each step's metrics (status, Tune)
    placement: tuple[PlacementGroup, int] | None = None  # (placement group, first bundle), e.g. a Tune trial's
    prefix: str = ""  # starts every actor's name (concurrent sweep trials each have a rollout-0)
    pool: ActorPool | None = None  # the driver's kept actors (safe_rlhf.keep_actors)

    @classmethod
    def from_context(cls, ctx: StageContext) -> "RoundPlace":
        return cls(ctx.name, ctx.cfg, ctx.out_dir, sync_dir_for(ctx.run_dir, ctx.name, ctx.cfg.safe_rlhf.device), ctx.log,
                   ctx.report, ctx.placement, ctx.actor_prefix, ctx.actor_pool)


# ---------------------------------------------------------------------- what the round starts from
@dataclass(frozen=True)
class RoundSetup:
    rl: SafeRLHFConfig  # with a baseline's algorithm applied
    round: int  # k
    steps: int
    threshold: float | None  # d, on the cost model's scale; None: auto, derived once the cost scorer is up
    inputs: dict  # policy, reward_model, cost_model (when used), train_pairs, reference (the first ingest's eval split)
    pool: list  # distinct training prompts, templated
    max_prompt_tokens: int
    max_answer_tokens: int
    # Scorers with their own tokenizer (reward.backbone, cost.backbone) score answers as text: the
    # roles that do, and each pooled prompt's text and earlier turns
    text_scored: tuple = ()
    turns: dict = field(default_factory=dict)
    # safe_rlhf.constraints per_category: the constraints' names, "shared" (the shared cost head) then
    # the cost model's harm categories, in its heads' order; () for the one constraint of the paper
    constraints: tuple = ()

    @classmethod
    def from_context(cls, ctx: StageContext) -> "RoundSetup":
        rl = ctx.cfg.safe_rlhf
        if "algorithm" in ctx.params:  # a baseline run of the same round: ppo or reward_shaping (unconstrained)
            rl = rl.model_copy(update={"algorithm": ctx.params["algorithm"], "constraints": "single"})
        k = ctx.params["round"]
        return cls.for_inputs(ctx.cfg, rl, k, round_inputs(ctx, rl.algorithm))

    @classmethod
    def for_inputs(cls, cfg: RunConfig, rl: SafeRLHFConfig, k: int, inputs: dict) -> "RoundSetup":
        """Round k of `rl` from explicit inputs (policy, reward_model, cost_model, train_pairs, reference)."""
        rcfg = rl.rounds[k - 1]
        if not O.get_algorithm(rl.algorithm).constrained:
            threshold = 0.0  # no Lagrangian constraint (ppo, reward_shaping): logged for completeness
        else:
            threshold = None if rcfg.threshold == "auto" else float(rcfg.threshold)
        turns = prompt_turns(inputs["train_pairs"], prompt_tokenizer(inputs["policy"]))
        text_scored = tuple(r for r in ("reward", "cost") if f"{r}_model" in inputs and not same_tokenizer(inputs[f"{r}_model"], inputs["policy"]))
        return cls(rl, k, rcfg.steps or rl.steps_per_round, threshold, inputs, list(turns),
                   cfg.model.max_prompt_tokens, cfg.model.max_answer_tokens, text_scored, turns if text_scored else {},
                   round_constraints(rl, inputs.get("cost_model")))


def round_constraints(rl: SafeRLHFConfig, cost_model: Path | None) -> tuple:
    """("shared", *the cost model's harm categories) under constraints per_category; () otherwise."""
    if rl.constraints != "per_category":
        return ()
    categories = score_model_categories(cost_model)
    if not categories:
        raise ValueError(f"safe_rlhf.constraints per_category: the cost model {cost_model} has no per-category heads "
                         "(fit it with cost.per_category: true; with too few labelled pairs per category every "
                         "category falls back to the shared head, and the fit's log names them)")
    return ("shared",) + categories


def round_inputs(ctx: StageContext, algorithm: str) -> dict:
    """The previous round's policy (else the SFT model, else model.path), the latest fitted reward
    model and, when the algorithm uses it, cost model; the latest training pairs (for prompts)."""
    k = ctx.params["round"]
    prev = f"safe_rlhf@{k - 1}"
    if prev in ctx.inputs:
        policy = ctx.input(prev, "policy")
    elif "sft" in ctx.inputs:
        policy = ctx.input("sft", "model")
    else:
        policy = Path(ctx.cfg.model.path)
    out = {"policy": policy, "reward_model": ctx.input(ctx.latest("fit_reward"), "model"),
           "train_pairs": ctx.input(ctx.latest("ingest"), "train"), "reference": ctx.input("ingest", "eval")}
    if O.uses_cost_model(algorithm):
        out["cost_model"] = ctx.input(ctx.latest("fit_cost"), "model")
    return out


def prompt_pool(train_parquet: Path, tokenizer=None) -> list[str]:
    """Distinct training prompts (templated for the policy's tokenizer, with their earlier turns),
    in a stable order."""
    return list(prompt_turns(train_parquet, tokenizer))


def prompt_turns(train_parquet: Path, tokenizer=None) -> dict[str, tuple[str, list]]:
    """{templated prompt: (prompt, earlier turns)} for the distinct training prompts, in a stable order."""
    import pyarrow.parquet as pq

    out: dict[str, tuple[str, list]] = {}
    for r in pq.read_table(train_parquet, columns=["prompt", "context"]).to_pylist():
        out.setdefault(format_prompt(r["prompt"], r["context"], tokenizer), (r["prompt"], r["context"] or []))
    return out


def reference_answers(eval_parquet: Path) -> tuple[list[str], list[str], list[bool], list[list[str]]]:
    """The fixed reference set of threshold auto: every labelled answer of the first ingest's
    held-out pairs -> (prompts, answers, is_safe, harm categories). The same answers for every round."""
    import pyarrow.parquet as pq

    prompts, answers, safe, categories = [], [], [], []
    for r in pq.read_table(eval_parquet).to_pylist():
        for i in (0, 1):
            if r[f"is_response_{i}_safe"] is not None:
                prompts.append(r["prompt"])
                answers.append(r[f"response_{i}"])
                safe.append(bool(r[f"is_response_{i}_safe"]))
                categories.append(list(r.get(f"response_{i}_harm_category") or []))
    return prompts, answers, safe, categories


def step_prompts(pool: list[str], step: int, batch: int, seed: int) -> list[str]:
    """Step `step`'s prompts (0-based): epochs of seeded permutations, so they are a function of the step."""
    out = []
    cursor = step * batch
    while len(out) < batch:
        epoch, offset = divmod(cursor, len(pool))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        take = order[offset:offset + batch - len(out)]
        out += [pool[i] for i in take]
        cursor += len(take)
    return out
