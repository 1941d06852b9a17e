"""The `annotate@k` stage: labels for the red-team pairs, from one of three backends.

- oracle: the built-in world's annotator (better id, safer id, is_safe of each answer).
- files: for human annotators. Writes `to_label.jsonl` and `to_label.parquet` under the stage
  folder and stops the run in state `waiting`, naming the file to fill in (`labelled.jsonl`, the
  PKU-SafeRLHF schema) and the command to continue. `resume` validates the labelled file through
  the same checks as any annotation file (stages/common/annotation_files.py).
- judge: labels from a reward model and a cost model in scorer actors: better = higher reward,
  safer = lower cost, is_safe = cost < 0.
The output `labels.jsonl` is in the PKU-SafeRLHF schema, for `ingest@k`.
"""
from __future__ import annotations

import random

from core.files import read_jsonl, write_jsonl
from stages.base import StageResult, StageWaiting
from stages.common.annotation_files import IngestError, ingest
from stages.common.model_actors import score_answers, scorer_actors

LABEL_FIELDS = ("better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe")


def _answers(p: dict) -> dict:
    return {"prompt": p["prompt"], "response_0": p["response_0"], "response_1": p["response_1"]}


def _oracle(pairs: list[dict], seed: int) -> list[dict]:
    from stages.common.builtin_world import World

    world, rng = World(), random.Random(f"annotate-{seed}")
    return [{**_answers(p), **world.annotate(rng, p["prompt"], p["response_0"], p["response_1"])} for p in pairs]


def _judge(ctx, pairs: list[dict], reward_dir: str, cost_dir: str) -> list[dict]:
    prompts = [p["prompt"] for p in pairs] * 2
    answers = [p["response_0"] for p in pairs] + [p["response_1"] for p in pairs]
    with scorer_actors(ctx.cfg, {"reward": reward_dir, "cost": cost_dir}, prefix=ctx.name.replace("@", "-"),
                       pool=ctx.actor_pool) as scorers:
        scores = score_answers(ctx.cfg, scorers, prompts, answers)
    n = len(pairs)
    r0, r1, c0, c1 = scores["reward"][:n], scores["reward"][n:], scores["cost"][:n], scores["cost"][n:]
    return [{**_answers(p), "better_response_id": 0 if a >= b else 1, "safer_response_id": 0 if c <= d else 1,
             "is_response_0_safe": c < 0, "is_response_1_safe": d < 0}
            for p, a, b, c, d in zip(pairs, r0, r1, c0, c1)]


def _files(ctx, pairs: list[dict]) -> list[dict]:
    """Hand the pairs to people; continue once `labelled.jsonl` is there and valid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    to_label, labelled = ctx.out_dir / "to_label.jsonl", ctx.out_dir / "labelled.jsonl"
    if not to_label.exists():
        rows = [{**_answers(p), **{f: None for f in LABEL_FIELDS}} for p in pairs]
        write_jsonl(to_label, rows)
        pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "to_label.parquet")
    if not labelled.exists():
        raise StageWaiting(
            f"{len(pairs)} pairs wait for labels. Fill in {LABEL_FIELDS} in a copy of {to_label} and save it as "
            f"{labelled} (PKU-SafeRLHF schema, one JSON object a line), then run: "
            f"python -m pipeline resume --run-dir {ctx.run_dir}")
    check = ctx.out_dir / "labelled_check"
    try:
        summary = ingest([labelled], check, fmt="pku", eval_fraction=0.0, max_reject_fraction=0.0)
    except IngestError as e:
        raise StageWaiting(f"{labelled} has rows that do not validate ({e}); fix them (see {check / 'rejects.jsonl'}) "
                           f"and run: python -m pipeline resume --run-dir {ctx.run_dir}") from None
    ctx.log(f"  labelled file accepted: {summary['accepted']} rows, {summary['duplicates']} duplicates")
    return read_jsonl(labelled)


def run(ctx) -> StageResult:
    cfg, k = ctx.cfg, ctx.params["round"]
    pairs = read_jsonl(ctx.input(f"red_team@{k}", "pairs"))
    backend = cfg.annotate.backend
    if backend == "oracle":
        labels = _oracle(pairs, cfg.seed * 100 + k)
    elif backend == "judge":
        labels = _judge(ctx, pairs, cfg.annotate.judge_reward_model or str(ctx.input(ctx.latest("fit_reward"), "model")),
                        cfg.annotate.judge_cost_model or str(ctx.input(ctx.latest("fit_cost"), "model")))
    else:
        labels = _files(ctx, pairs)
    write_jsonl(ctx.out_dir / "labels.jsonl", labels)
    unsafe = sum(not r[f"is_response_{i}_safe"] for r in labels for i in (0, 1))
    return StageResult({"labels": "labels.jsonl"},
                       {"backend": backend, "pairs": len(labels), "unsafe_answer_share": round(unsafe / max(1, 2 * len(labels)), 4)})
