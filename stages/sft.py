"""The `sft` stage: causal-LM fine-tuning on prompt + answer, prompt tokens masked out of the loss.

Runs as a Ray Train `TorchTrainer` with a DeepSpeed engine per worker (cluster/train.py), or in
the round's kept policy learner (stages/common/fit_runner.py, `sft.runner`). In the
built-in world the demonstrations include harmful compliance, so the SFT model is helpful but
unsafe, as Alpaca-7B was in the paper. A quick check in a rollout actor (the rounds' engine; the
round's kept rollout-0 where the driver keeps actors) measures that with the
oracle judge (one answer per held-out prompt: `check_harmful_rate`, `check_helpfulness`; the
`evaluate` stage's figures are the reference), and writes fresh pairs of the model's own samples,
labelled by the oracle, for the fits' `policy_accuracy`.
"""
from __future__ import annotations

from pathlib import Path

from cluster.launch import RemoteEngine
from cluster.train import FitTask, fit, gather_objects
from core.files import read_jsonl, write_jsonl
from core.text import encode_conversation
from stages.base import StageResult
from stages.common.fit_runner import describe, kept_learner, run_fit
from stages.common.judging import answer, judge_with_oracle, oracle_policy_pairs, summarize
from stages.common.model_actors import rollout_actor

EVAL_SHARE = 0.05  # last 5% of demonstrations: held-out loss


def sft_loop(config: dict) -> None:
    """One worker (Ray Train's, or a kept learner: stages/common/fit_runner.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.experience import pad
    from actors.models import enable_gradient_checkpointing

    tok = AutoTokenizer.from_pretrained(config["base_model"])
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)
    if config["train"]["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    rows = read_jsonl(config["data"])
    items = [encode_conversation(tok, r["prompt"], r["answer"], config["max_prompt_tokens"], config["max_answer_tokens"])
             for r in rows]
    n_eval = max(1, int(len(items) * EVAL_SHARE))
    train, held_out = items[:-n_eval], items[-n_eval:]

    def batch(items):
        ids, mask = pad([i for i, _ in items], tok.pad_token_id, side="right")
        labels = ids.clone()
        for row, (_, n_prompt) in enumerate(items):
            labels[row, :n_prompt] = -100  # the prompt is given, not learned
        labels[mask == 0] = -100
        return ids, mask, labels

    def loss(engine, items):
        ids, mask, labels = batch(items)
        dev = engine.device
        out = engine(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev))
        return out.loss, {"tokens": int(mask.sum())}

    @torch.no_grad()
    def evaluate(engine, rank, world):
        mine = held_out[rank::world]
        total, count = 0.0, 0
        for s in range(0, len(mine), 64):
            ids, mask, labels = batch(mine[s:s + 64])
            n = int((labels[:, 1:] != -100).sum())
            out = engine(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device), labels=labels.to(engine.device))
            total, count = total + out.loss.item() * n, count + n
        parts = gather_objects((total, count), world)
        return {"eval_loss": sum(t for t, _ in parts) / max(1, sum(c for _, c in parts))}

    def export(engine, state_dict):
        if state_dict is not None:
            engine.module.save_pretrained(config["output_dir"], state_dict=state_dict, safe_serialization=True)
            tok.save_pretrained(config["output_dir"])

    fit(FitTask(model=model, train_items=train, loss=loss, evaluate=evaluate, export=export,
                tc=config["train"], seed=config["seed"], run_name=config["run_name"],
                log_path=Path(config["log_path"])))


def run(ctx) -> StageResult:
    cfg = ctx.cfg
    base = ctx.input("world", "model") if "model" in ctx.inputs.get("world", {}) else Path(cfg.model.path)
    out_model = ctx.out_dir / "model"
    log_path = ctx.out_dir / "train_log.jsonl"
    loop_config = {"base_model": str(base), "data": str(ctx.input("world", "sft")), "output_dir": str(out_model),
                   "log_path": str(log_path), "seed": cfg.seed, "train": cfg.sft.model_dump(),
                   "max_prompt_tokens": cfg.model.max_prompt_tokens, "max_answer_tokens": cfg.model.max_answer_tokens}
    learner = kept_learner(ctx, cfg.sft, "sft")
    ctx.log(f"  {describe(learner, cfg.sft)}, {cfg.sft.device}, {cfg.sft.precision}, ZeRO-{cfg.sft.zero_stage}")
    run_fit(ctx, learner, sft_loop, loop_config, cfg.sft, "sft")
    end = [e for e in read_jsonl(log_path) if e["event"] == "end"][-1]
    history = end["history"]

    # The SFT policy, in a rollout actor: one answer per held-out prompt judged by the oracle, and
    # fresh oracle-labelled pairs of its own samples. The rounds' engine; with kept actors the
    # round's own rollout-0, which round 1 then finds up with this model loaded.
    prompts = read_jsonl(ctx.input("world", "eval_prompts"))
    max_new = cfg.safe_rlhf.max_new_tokens
    with rollout_actor(cfg, out_model, "sft-check-rollout", cfg.safe_rlhf.engine, max_new, pool=ctx.actor_pool) as actor:
        engine = RemoteEngine(actor)
        rows = answer(engine, prompts, samples=1, max_new_tokens=max_new, seed=cfg.seed,
                      temperature=cfg.safe_rlhf.temperature)
        pairs = oracle_policy_pairs(engine, prompts, max_new, seed=cfg.seed)
    judge_with_oracle(rows)
    check = summarize(rows)
    write_jsonl(ctx.out_dir / "check_samples.jsonl", rows)
    write_jsonl(ctx.out_dir / "policy_pairs.jsonl", pairs)
    ctx.log(f"  SFT policy check (oracle, one answer per prompt): harmful_rate={check['harmful_rate']}, "
            f"helpfulness={check['helpfulness']}")
    metrics = {"check_harmful_rate": check["harmful_rate"], "check_helpfulness": check["helpfulness"],
               "check_answers": len(rows), "eval_loss": history[-1]["eval_loss"], "train_loss": history[-1]["train_loss"],
               "loss_curve": [h["train_loss"] for h in history], "eval_loss_curve": [h["eval_loss"] for h in history],
               "global_steps": end["global_step"], "restarts": end["restarts"], "policy_pairs": len(pairs)}
    return StageResult({"model": "model", "check_samples": "check_samples.jsonl", "policy_pairs": "policy_pairs.jsonl",
                        "train_log": "train_log.jsonl"}, metrics)
