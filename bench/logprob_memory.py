"""Peak memory of the chosen tokens' log-probabilities: the naive full-vocabulary fp32 way against
`core.objectives.token_logprobs` in chunks, at a 7B-like vocabulary (32,000) and length (1,024).

    .venv/bin/python bench/logprob_memory.py [--batch 4] [--tokens 1024] [--vocab 32000] [--hidden 1024]
                                             [--chunk 1024] [--device cpu|cuda]

Each variant runs in a fresh process. The figure is the peak memory above what the inputs hold
(the hidden states and the output layer): on CPU the growth of the process's peak resident size,
on CUDA torch's max_memory_allocated. "no grad" is the reference scorer's case, "train" a policy
learner's forward and backward.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> None:
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from core.objectives import token_logprobs

    dev = torch.device(args.device)
    torch.manual_seed(0)
    n = args.batch * args.tokens
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dev)
    hidden = torch.randn(n, args.hidden, device=dev, requires_grad=args.grad)
    targets = torch.randint(0, args.vocab, (n,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.set_grad_enabled(args.grad):
        if args.variant == "naive":
            lp = torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            lp = token_logprobs(hidden, targets, head, chunk=args.chunk)
        if args.grad:
            lp.sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak, "checksum": float(lp.double().sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--grad", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    n = args.batch * args.tokens
    print(f"{n} tokens ({args.batch} x {args.tokens}), vocabulary {args.vocab}, hidden {args.hidden}, chunk {args.chunk}, "
          f"{args.device}; full fp32 logits would be {n * args.vocab * 4 / 2**30:.2f} GiB")
    print(f"{'case':<10}{'naive GiB':>11}{'chunked GiB':>13}{'ratio':>8}{'|sum diff|':>12}")
    for grad in (False, True):
        got = {}
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--variant", variant, *(["--grad"] if grad else []),
                   *[f"--{k}={v}" for k, v in vars(args).items() if k in ("batch", "tokens", "vocab", "hidden", "chunk", "device")]]
            got[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        a, b = got["naive"], got["chunked"]
        print(f"{'train' if grad else 'no grad':<10}{a['peak_bytes'] / 2**30:>11.2f}{b['peak_bytes'] / 2**30:>13.2f}"
              f"{a['peak_bytes'] / max(1, b['peak_bytes']):>8.1f}{abs(a['checksum'] - b['checksum']):>12.2e}")


if __name__ == "__main__":
    main()
