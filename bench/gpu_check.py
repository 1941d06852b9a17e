"""The GPU path without Ray or vLLM: the pipeline's own learner, reference scorer and hf engine on
one accelerator, timed. Needs only torch, transformers and DeepSpeed (runs where a GPU is lent).

    python bench/gpu_check.py [--size 1b|3b|7b] [--batch 8] [--prompt 256] [--response 256]
                              [--device cuda] [--peak-tflops 989] [--out DIR]

Builds a Llama of the size from its config with random weights, saved in bf16, then:
- learner train step: `actors.learner.Learner` (policy role: DeepSpeed ZeRO-0, bf16, PPO loss on a
  random minibatch), with gradient checkpointing off and on, and ZeRO-3 with checkpointing; after the
  first and the ZeRO-3 one, `Learner.export` (the pipeline's weight path) is timed;
- reference forward: `actors.scorer.Scorer("reference")`, chunked log-probabilities;
- generation: `actors.rollout.HFEngine` (transformers generate).
Prints tokens/s, MFU against --peak-tflops (bf16 dense; H100/H200 SXM: 989) and the peak GPU
memory of each. FLOPs: 6 x params x tokens for a train step (recomputation not counted, as MFU is
usually reported), 2 x params x tokens for a forward.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PORT = None  # one single-rank process group for every learner of the run (set in main)
SIZES = {  # hidden, layers, heads, intermediate (Llama-style, vocabulary 32000)
    "tiny": (128, 2, 4, 352),
    "1b": (2048, 16, 16, 5632),
    "3b": (3200, 26, 32, 8640),
    "7b": (4096, 32, 32, 11008),
}


def build(size: str, out: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    hidden, layers, heads, inter = SIZES[size]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(32000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2").save_pretrained(out)
    return n


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


HELD = 0  # bytes still allocated when a check starts (an earlier engine not yet freed), not its own


def peak_gib(device: str) -> float:
    """The check's own peak: the peak allocated since reset less what was already held then."""
    return (torch.cuda.max_memory_allocated() - HELD) / 2**30 if device == "cuda" else float("nan")


def reset(device: str) -> None:
    import gc

    gc.collect()  # the last check's engine and optimizer states must be gone before the next one builds
    if device == "cuda":
        global HELD
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        HELD = torch.cuda.memory_allocated()


def timed(step, args, flops_per_token: int) -> dict:
    """One warm-up call of `step`, then the mean of --repeats calls; MFU from the FLOPs per token."""
    step()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        step()
    sync(args.device)
    dt = (time.perf_counter() - t0) / args.repeats
    tokens = args.batch * (args.prompt + args.response)
    return {"seconds": dt, "tokens_per_s": tokens / dt, "mfu": flops_per_token * tokens / dt / (args.peak_tflops * 1e12),
            "peak_gib": peak_gib(args.device)}


def minibatch(batch: int, prompt: int, response: int):
    from actors.experience import PolicyMinibatch, SequenceBatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (batch, prompt + response), generator=g)
    seqs = SequenceBatch(ids, torch.ones_like(ids), prompt)
    adv = torch.randn(batch, response, generator=g)
    return seqs, PolicyMinibatch(seqs, torch.full((batch, response), -10.0), adv, None, 0.0)


def time_learner(model_dir: Path, args, checkpointing: bool, params: int, zero_stage: int = 0,
                 export: bool = False) -> dict:
    from actors.learner import Learner

    reset(args.device)
    settings = {"device": args.device, "precision": "bf16", "zero_stage": zero_stage, "seed": 0,
                "micro_batch": args.batch, "clip_ratio": 0.2, "clip_value": 5.0, "lr": 1e-6,
                "gradient_checkpointing": checkpointing, "temperature": 1.0}
    learner = Learner("policy", str(model_dir), settings)
    learner.setup("127.0.0.1", PORT)
    _, batch = minibatch(args.batch, args.prompt, args.response)
    row = timed(lambda: learner.train_step(batch), args, flops_per_token=6 * params)
    if export:  # the pipeline's weight path: gather the state dict in bf16 and write a HF checkpoint
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            learner.export(out)
            row["export_s"] = time.perf_counter() - t0
    # the learner is dropped on return; its process group stays, and the next learner joins it
    return row


def time_reference(model_dir: Path, args, params: int) -> dict:
    from actors.scorer import Scorer

    reset(args.device)
    scorer = Scorer("reference", str(model_dir), device=args.device, dtype="bf16", batch_size=args.batch)
    seqs, _ = minibatch(args.batch, args.prompt, args.response)
    return timed(lambda: scorer.logprobs(seqs), args, flops_per_token=2 * params)


def time_generation(model_dir: Path, args) -> dict:
    from actors.rollout import HFEngine, Sampling

    reset(args.device)
    engine = HFEngine(str(model_dir), device=args.device, dtype="bf16", batch_size=args.batch, max_prompt_tokens=args.prompt)
    prompts = [" ".join(f"t{(i * 7 + j) % 31990 + 10}" for j in range(args.prompt)) for i in range(args.batch)]
    engine.generate(prompts, Sampling(8, seed=0))
    sync(args.device)
    t0 = time.perf_counter()
    gen = engine.generate(prompts, Sampling(args.response, seed=1))
    sync(args.device)
    dt = time.perf_counter() - t0
    new = sum(len(r) for r in gen.response_ids)
    return {"seconds": dt, "tokens_per_s": new / dt, "new_tokens": new, "peak_gib": peak_gib(args.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", help="write the figures as JSON here too")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    global PORT
    from cluster.network import free_port

    PORT = free_port()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        params = build(args.size, Path(tmp))
        print(f"{gpu}: Llama {args.size} ({params / 1e9:.2f}B params, bf16), batch {args.batch} x "
              f"({args.prompt} prompt + {args.response} response) tokens", flush=True)
        checks = {
            "learner train step (+ export)": lambda: time_learner(Path(tmp), args, False, params, export=True),
            "learner train step, checkpointing": lambda: time_learner(Path(tmp), args, True, params),
            "learner train step, ZeRO-3 + ckpt": lambda: time_learner(Path(tmp), args, True, params, zero_stage=3,
                                                                      export=True),
            "reference forward (chunked logprobs)": lambda: time_reference(Path(tmp), args, params),
            "hf generate": lambda: time_generation(Path(tmp), args),
        }
        rows = {}
        for name, check in checks.items():
            try:  # one failing check (an op that will not build, memory) must not hide the others' figures
                rows[name] = check()
            except Exception as e:  # noqa: BLE001 - reported, not swallowed
                rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name}: {rows[name]}", flush=True)
    print(f"{'':<40}{'s':>8}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}{'export s':>10}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<40}  failed: {r['error']}")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "-"
        export = f"{r['export_s']:.1f}" if "export_s" in r else "-"
        print(f"{name:<40}{r['seconds']:>8.3f}{r['tokens_per_s']:>11.0f}{mfu:>7}{r['peak_gib']:>10.2f}{export:>10}")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": gpu, "size": args.size, "params": params, **rows}, indent=2))


if __name__ == "__main__":
    main()
