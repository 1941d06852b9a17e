"""The `world` stage: the built-in small world's annotations (PKU schema), SFT demonstrations,
held-out eval prompts and, when `model.path` is null, a tokenizer and a small Llama."""
from __future__ import annotations

from core.files import write_jsonl
from stages.base import StageResult
from stages.common.builtin_world import World
from stages.common.model_factory import build_small_llama, train_tokenizer


def run(ctx):
    """Generate the world's annotations (PKU schema), SFT demonstrations, held-out eval prompts,
    and (when `model.path` is null) the tokenizer and the small base model."""
    cfg, out = ctx.cfg, ctx.out_dir
    world = World()
    train_pool, eval_pool = world.split_prompts(cfg.ingest.eval_fraction)
    pairs = world.preference_rows(cfg.world.n_pairs, cfg.world.seed, cfg.world.harmful_fraction,
                                  cfg.world.label_noise)
    write_jsonl(out / "pairs.jsonl", pairs)
    sft = world.sft_rows(cfg.world.n_sft, cfg.world.seed, train_pool, cfg.world.harmful_fraction,
                         cfg.world.sft_compliance)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "eval_prompts.jsonl",
                [{"prompt": p.text, "task": p.task, "harmful": p.harmful, "category": p.category} for p in eval_pool])
    outputs = {"pairs": "pairs.jsonl", "sft": "sft.jsonl", "eval_prompts": "eval_prompts.jsonl"}
    unsafe = sum(not r[f"is_response_{i}_safe"] for r in pairs for i in (0, 1))
    metrics = {"pairs": len(pairs), "sft_rows": len(sft), "eval_prompts": len(eval_pool),
               "eval_harmful_prompts": sum(p.harmful for p in eval_pool),
               "unsafe_answer_share": round(unsafe / (2 * len(pairs)), 4),
               "sft_compliance_share": round(sum(r["kind"] == "comply" for r in sft) / len(sft), 4)}
    if cfg.model.path is None:
        ctx.log(f"  training a {cfg.model.small.vocab_size}-token BPE tokenizer and building the small Llama")
        tok = train_tokenizer(world.corpus(), cfg.model.small.vocab_size, out / "base_model")
        model = build_small_llama(cfg.model.small, tok, out / "base_model", seed=cfg.seed)
        outputs["model"] = "base_model"
        metrics.update(vocab_size=len(tok), model_parameters=sum(p.numel() for p in model.parameters()))
    return StageResult(outputs, metrics)
