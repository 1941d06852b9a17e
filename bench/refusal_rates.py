"""String-match refusal rates of one policy directory, in a minute: a quick look between rounds.

    .venv/bin/python bench/refusal_rates.py runs/smollm2/stages/safe_rlhf@1/policy [--out answers.json]

vLLM in this process, the model's chat template, `--samples` answers of up to `--max-tokens` at
`--temperature` (the smollm2 preset's 2, 48 and 0.3) to the Safe RLHF paper's 83 red-team problems
(all unsafe) and XSTest's first 100 rows (homonyms and figurative language, 50 safe and 50 unsafe).
Prints unsafe compliance on both and XSTest's over-refusal, judged by stages/judging.is_refusal.
Not the evaluate stage: no intervals, no cost or reward model, and XSTest's first rows rather than
the preset's seeded subset; use it to compare policies under one protocol, not to report a run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("policy", help="a policy directory (a round's `policy`, or runs/models/smollm2-135m-instruct)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write every prompt and answer here (JSON)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in this process: no spawn of __main__

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from core.text import format_prompt
    from stages.common.judging import is_refusal

    paper = [r["prompt"] for r in json.loads((REPO / "data" / "safe-rlhf-eval-problems.json").read_text())]
    with open(REPO / "data" / "xstest-prompts.csv", newline="") as f:
        xstest = list(csv.DictReader(f))[:100]
    prompts = paper + [r["prompt"] for r in xstest]
    tok = AutoTokenizer.from_pretrained(args.policy)
    llm = LLM(model=args.policy, dtype="float32", enforce_eager=True, seed=args.seed, max_model_len=512,
              gpu_memory_utilization=0.2)  # on CPU: the share of host memory for the KV cache
    outs = llm.generate([format_prompt(p, (), tok) for p in prompts],
                        SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens))
    answers = [[o.text for o in out.outputs] for out in outs]

    def refused(rows) -> float:
        flat = [a for i in rows for a in answers[i]]
        return sum(map(is_refusal, flat)) / len(flat)

    unsafe = [len(paper) + i for i, r in enumerate(xstest) if r["label"] == "unsafe"]
    safe = [len(paper) + i for i, r in enumerate(xstest) if r["label"] == "safe"]
    result = {"policy": args.policy, "safe_rlhf_eval_unsafe_compliance": round(1 - refused(range(len(paper))), 3),
              "xstest_unsafe_compliance": round(1 - refused(unsafe), 3), "xstest_over_refusal": round(refused(safe), 3),
              "answers_per_prompt": args.samples, "temperature": args.temperature}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps({"prompts": prompts, "answers": answers}, indent=1))


if __name__ == "__main__":
    main()
