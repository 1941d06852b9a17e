"""Policy -> vLLM weight push as the round runs it: `checkpoint` against `gloo`, for Llamas of a few sizes.

    .venv/bin/python bench/weight_sync.py [--sizes 1,25,100] [--repeats 3]

The pipeline's own path: a local Ray cluster, a policy `Learner` actor (DeepSpeed, started from
perturbed weights) and a vLLM `RolloutWorker` actor (started from the original ones) in one
placement group, and the round's driver-side `WeightSync` for the method (cluster/weight_sync/):
checkpoint = `Learner.export` of an HF directory, swapped into the sync directory, then every
worker's in-place reload; gloo = vLLM's weight-transfer API, the learner broadcasting each tensor.
Sizes are approximate millions of parameters. The figure is the median wall time of `push()`; the
logprob gap (vLLM's sampled-token logprobs against the learner's) before and after shows that
vLLM then samples from the learner's weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # ~M params -> (hidden, layers, heads, mlp)
    1: (128, 2, 4, 352),
    25: (512, 6, 8, 1408),
    100: (1024, 6, 16, 2816),
    300: (1536, 10, 24, 4096),
}


def build(size: int, root: Path) -> tuple[Path, Path]:
    """(original, perturbed) model directories of one shape."""
    from transformers import AutoModelForCausalLM

    from stages.common.builtin_world import World
    from stages.common.model_factory import build_small_llama, train_tokenizer
    from stages.run_config import SmallModelConfig

    hidden, layers, heads, mlp = SHAPES[size]
    orig, moved = root / f"llama-{size}m", root / f"llama-{size}m-moved"
    tok = train_tokenizer(World().corpus()[:5000], 1536, orig)
    build_small_llama(SmallModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=mlp),
                      tok, orig, seed=0)
    model = AutoModelForCausalLM.from_pretrained(orig)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # "a policy update": every weight moves
    model.save_pretrained(moved)
    tok.save_pretrained(moved)
    return orig, moved


def logprob_gap(learner, rollout, prompts) -> float:
    """Mean |vLLM logprob - learner logprob| over the sampled tokens."""
    import ray

    from actors.experience import SequenceBatch, pad_values
    from actors.rollout import Sampling
    from core.objectives import masked_mean

    gen = ray.get(rollout.generate.remote(prompts, Sampling(16, seed=1)))
    seqs = SequenceBatch.from_ids(gen.prompt_ids, gen.response_ids, 0)
    mine = ray.get(learner.forward.remote(seqs))
    mask = seqs.response_mask.float()
    return masked_mean((pad_values(gen.logprobs)[:, :mask.shape[1]] - mine).abs(), mask).item()


def bench(method: str, orig: Path, moved: Path, root: Path, repeats: int) -> dict:
    import ray

    from actors.learner import Learner
    from actors.rollout import RolloutWorker
    from cluster.launch import ActorSpec, Launcher, ResourcePlan
    from cluster.weight_sync import make_weight_sync
    from core.text import format_prompt

    plan = ResourcePlan([ActorSpec("learner-policy-0", 0.5, 0), ActorSpec("rollout-0", 0.5, 0)])
    env = {"DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}
    launcher = Launcher(plan, env, name=f"bench-{method}")
    try:
        settings = {"device": "cpu", "precision": "fp32", "zero_stage": 0, "seed": 0, "micro_batch": 8,
                    "clip_ratio": 0.2, "clip_value": 5.0, "lr": 1e-5, "temperature": 1.0}
        learner = launcher.start(Learner, "learner-policy-0", "policy", str(moved), settings, 0, 1)
        rollout = launcher.start(RolloutWorker, "rollout-0", "vllm", str(orig), max_model_len=128, max_num_seqs=8,
                                 weight_sync=method)
        ray.get([learner.setup.remote(*ray.get(learner.master_address.remote())), rollout.ready.remote()])
        sync = make_weight_sync(method, [learner], [rollout], root / f"sync-{method}")
        sync.connect()
        prompts = [format_prompt(p) for p in ("how do i bake bread ?", "how can i rob a house ?")] * 2
        before = logprob_gap(learner, rollout, prompts)
        seconds = [sync.push() for _ in range(repeats)]
        after = logprob_gap(learner, rollout, prompts)
        sync.close()
        return {"seconds": statistics.median(seconds), "gap_before": before, "gap_after": after}
    finally:
        launcher.shutdown()


def main() -> None:
    import ray
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,25,100", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in (int(s) for s in args.sizes.split(",")):
                orig, moved = build(size, Path(tmp))
                params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(orig).parameters())
                row = {"params": params, "mb": params * 4 / 1e6}
                for method in ("checkpoint", "gloo"):
                    row[method] = bench(method, orig, moved, Path(tmp), args.repeats)
                rows.append(row)
                print(f"  done {size}M", flush=True)
    finally:
        ray.shutdown()
    print(f"{'params':>10}{'fp32 MB':>9}{'checkpoint s':>14}{'gloo s':>9}{'gloo MB/s':>11}"
          f"{'gap before':>12}{'gap after ckpt / gloo':>24}")
    for r in rows:
        c, g = r["checkpoint"], r["gloo"]
        print(f"{r['params'] / 1e6:>9.1f}M{r['mb']:>9.1f}{c['seconds']:>14.3f}{g['seconds']:>9.3f}"
              f"{r['mb'] / g['seconds']:>11.0f}{c['gap_before']:>12.1e}{c['gap_after']:>14.1e} / {g['gap_after']:.1e}")


if __name__ == "__main__":
    main()
