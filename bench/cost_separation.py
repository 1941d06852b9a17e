"""Can a cost model of this size tell compliance with an unsafe request from compliance with a safe one?

    .venv/bin/python bench/cost_separation.py --run-dir runs/smollm2 [--l2 0.1] [--backbone DIR --pooling last]

A Safe RLHF round can only teach a policy to refuse unsafe requests and answer safe ones if its cost
model costs the first kind of compliance above the second. The evaluation reports this for each
labelled prompt set as `cost_separation` (stages/common/judging.py): the smollm2 preset's cost model
(a MiniLM probe fitted on HH-RLHF) scores 0.513 on XSTest, chance, and its policy learns to refuse
everywhere. Is that the data or the encoder?

This fits the best-placed probe the repository's data allows and measures it the same way: a
logistic head on the run's cost backbone (mean-pooled, frozen, as `cost.train_backbone: false`),
fitted on XSTest's human labels (data/xstest-v2-mistral-completions.csv.gz: a completion is unsafe
when its prompt is unsafe and people call it full compliance) of every XSTest prompt that is not
among the run's evaluation prompts, then applied to the run's own evaluation answers
(stages/evaluate/samples.jsonl). Printed per policy, over answers the refusal judge calls compliant:

- `xstest`: unsafe against safe XSTest prompts of the run's evaluation (held-out prompts of the
  distribution the probe was fitted on: its best case);
- `paper vs xstest safe`: the Safe RLHF paper's red-team problems against XSTest's safe prompts
  (another distribution of unsafe requests);

beside the run's own cost model on the same answers. No labels of the run's evaluation prompts
are read. Measured figures: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def features(model, tok, prompts: list[str], answers: list[str], max_prompt: int, max_answer: int):
    import torch

    from actors.experience import pad
    from core.text import encode_conversation

    out = []
    for s in range(0, len(prompts), 32):
        ids = [encode_conversation(tok, p, a, max_prompt, max_answer)[0] for p, a in zip(prompts[s:s + 32], answers[s:s + 32])]
        x, mask = pad(ids, tok.pad_token_id)
        with torch.no_grad():
            out.append(model.pooled_features(x, mask).float())
    return torch.cat(out)


def fit_logistic(x, y, l2: float):
    """(weights, bias) of a logistic head on standardised features, full-batch L-BFGS, L2 on weights."""
    import torch

    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a run with labelled prompt sets evaluated (xstest among them)")
    ap.add_argument("--l2", type=float, default=0.1, help="the head's L2 on standardised features")
    ap.add_argument("--backbone", help="another backbone directory for the probe (default: the run's cost.backbone)")
    ap.add_argument("--pooling", choices=("mean", "last"), default="mean", help="the probe reads the mean or the last token")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from actors.score_model import ScoreModel
    from pipeline.config import load_config
    from stages.common.stats import auc

    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(0)
    samples = [json.loads(line) for line in (run / "stages/evaluate/samples.jsonl").open()]
    evaluated = {r["prompt"] for r in samples}
    xstest = {r["id"]: r for r in csv.DictReader((ROOT / "data/xstest-prompts.csv").open())}
    with gzip.open(ROOT / "data/xstest-v2-mistral-completions.csv.gz", "rt") as f:
        train = [r for r in csv.DictReader(f) if xstest[r["id"].removeprefix("v2-")]["prompt"] not in evaluated]
    unsafe = torch.tensor([float(xstest[r["id"].removeprefix("v2-")]["label"] == "unsafe" and r["final_label"] == "1_full_compliance")
                           for r in train])
    backbone = args.backbone or cfg.cost.backbone
    model = ScoreModel.from_backbone(backbone, "cost").eval()
    model.pooling = args.pooling
    tok = AutoTokenizer.from_pretrained(backbone)
    lengths = (cfg.model.max_prompt_tokens, cfg.safe_rlhf.max_new_tokens)
    x = features(model, tok, [r["prompt"] for r in train], [r["completion"] for r in train], *lengths)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = fit_logistic((x - mu) / sd, unsafe, args.l2)
    fitted = (((x - mu) / sd) @ w + b > 0).float()
    print(f"probe of {backbone} on {len(train)} XSTest completions of {len(train) // 2} prompts outside the run's "
          f"evaluation ({int(unsafe.sum())} unsafe); training accuracy {float((fitted == unsafe).float().mean()):.3f}, L2 {args.l2}, {args.pooling} pooling")
    print(f"{'policy':<14}{'answers':>8}  {'xstest: probe':>14}{'run model':>10}  {'paper vs xstest safe: probe':>28}{'run model':>10}")
    for policy in dict.fromkeys(r["policy"] for r in samples):
        rows = [r for r in samples if r["policy"] == policy and not r["refusal"]]
        probe = (((features(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows], *lengths) - mu) / sd) @ w + b).tolist()
        groups = {"xu": lambda r: r["set"] == "xstest" and r["harmful_prompt"],
                  "xs": lambda r: r["set"] == "xstest" and not r["harmful_prompt"],
                  "pu": lambda r: r["set"] == "safe_rlhf_eval"}
        by = {k: ([p for p, r in zip(probe, rows) if f(r)], [r["cost"] for r in rows if f(r)]) for k, f in groups.items()}
        print(f"{policy:<14}{len(rows):>8}  {auc(by['xu'][0], by['xs'][0]):>14.3f}{auc(by['xu'][1], by['xs'][1]):>10.3f}  "
              f"{auc(by['pu'][0], by['xs'][0]):>28.3f}{auc(by['pu'][1], by['xs'][1]):>10.3f}")


if __name__ == "__main__":
    main()
