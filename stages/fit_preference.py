"""The `fit_reward` and `fit_cost` stages: score models on preference pairs, with the paper's losses.

Both start from the SFT model (the critics of the Safe RLHF round start from them) and run as Ray
Train `TorchTrainer` jobs with a DeepSpeed engine per worker (cluster/train.py), or in the round's
kept critic learners (stages/common/fit_runner.py, `reward.runner`, `cost.runner`).

- reward: pairs with a `better_response_id`; loss `reward_pair_loss` (core/objectives).
- cost: pairs with a `safer_response_id`; loss `cost_pair_loss`, with the sign terms on rows that
  have `is_safe` labels (HH-RLHF rows have none: the pairwise term alone). With `cost.per_category`
  the model also has one head per harm category with `cost.min_category_pairs` ranking pairs or
  more (`category_heads`; the rest fall back to the shared head, logged), fitted by
  `category_cost_loss` beside the shared head's loss; `eval_category_sign_accuracy` per head.

Metrics on the eval split: `eval_accuracy` (pair accuracy). For the cost model also
`eval_sign_accuracy` (cost < 0 exactly when safe). The cost model's `eval_accuracy` counts pairs
whose safer label ranks harm: the two answers differ in `is_safe`, or both are unsafe, or no
`is_safe` labels exist (HH). Between two safe answers there is no harm to rank and the label is a
coin flip (in the built-in world, exactly so); `eval_accuracy_all` counts every pair.
`policy_accuracy` (per epoch, like `eval_accuracy`): pair accuracy on fresh pairs of the current
policy's own samples (the last red team's, else the SFT model's), labelled by the world's oracle
(pairs the oracle rates as ties are left out), where reward hacking shows first. The Ray Train
workers score them on their engine with the held-out pairs: no scorer actor of its own to start.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from actors.score_model import end_scores
from cluster.train import FitTask, fit, gather_objects, rank_share
from core.files import read_jsonl
from core.objectives import pair_accuracy, sign_accuracy
from core.text import encode_conversation
from stages.base import StageResult
from stages.common.fit_runner import describe, kept_learner, run_fit
from stages.common.linear_probe import fit_probe


def _items(rows: list[dict], kind: str, tok, cfg: dict) -> list[dict]:
    """Pair rows (PKU schema) -> encoded pairs: {"a": ids of preferred, "b": ids of the other, labels...}."""
    out = []
    label = "better_response_id" if kind == "reward" else "safer_response_id"
    for r in rows:
        if r[label] is None:
            continue
        first = r[label]
        answers = (r[f"response_{first}"], r[f"response_{1 - first}"])
        enc = [encode_conversation(tok, r["prompt"], a, cfg["max_prompt_tokens"], cfg["max_answer_tokens"],
                                   r.get("context"))[0] for a in answers]
        safe = (r[f"is_response_{first}_safe"], r[f"is_response_{1 - first}_safe"])
        out.append({"a": enc[0], "b": enc[1], "a_safe": safe[0], "b_safe": safe[1],
                    "has_safety": safe[0] is not None and safe[1] is not None, **pair_categories(r, first)})
    return out


def pair_categories(r: dict, first: int) -> dict:
    """The harm categories of a pair's preferred (a) and other (b) answer, and whether each is known:
    a safe answer's are (none), an unsafe answer's are when the data lists them."""
    cats = [list(r.get(f"response_{i}_harm_category") or []) for i in (first, 1 - first)]
    safe = [r[f"is_response_{i}_safe"] for i in (first, 1 - first)]
    return {"a_cats": cats[0], "b_cats": cats[1],
            "cats_known": [s is True or (s is False and bool(c)) for s, c in zip(safe, cats)]}


def category_heads(items: list[dict], min_pairs: int) -> tuple[list[str], dict[str, int]]:
    """-> (categories with at least `min_pairs` training pairs that rank them: one answer harmful in
    the category, the other not, both labelled; {rarer category: its pairs}, which fall back)."""
    counts: dict[str, int] = {}
    for i in items:
        if all(i["cats_known"]):
            for c in set(i["a_cats"]) ^ set(i["b_cats"]):
                counts[c] = counts.get(c, 0) + 1
    for i in items:  # categories seen only on one side of unlabelled pairs count as 0
        for c in i["a_cats"] + i["b_cats"]:
            counts.setdefault(c, 0)
    kept = sorted(c for c, n in counts.items() if n >= min_pairs)
    return kept, {c: n for c, n in sorted(counts.items()) if n < min_pairs}


def category_labels(items: list[dict], categories: list[str], side: str):
    """-> (membership [B, K] bool, known [B] bool) of one side ("a" or "b") of the pairs."""
    import torch

    member = torch.tensor([[c in i[f"{side}_cats"] for c in categories] for i in items], dtype=torch.bool)
    known = torch.tensor([i["cats_known"][0 if side == "a" else 1] for i in items], dtype=torch.bool)
    return member.view(len(items), len(categories)), known


def score_pairs(model, items: list[dict], pad_id: int, device) -> tuple[list[float], list[float]]:
    """End scores of both answers of each pair: -> (scores of the preferred, scores of the other)."""
    scores = end_scores(model, [i["a"] for i in items] + [i["b"] for i in items], pad_id, device)
    return scores[:len(items)], scores[len(items):]


def score_category_pairs(model, items: list[dict], pad_id: int, device) -> tuple[list, list]:
    """Per-category end scores of both answers of each pair: -> ([K scores] of each preferred, of each other)."""
    rows = end_scores(model, [i["a"] for i in items] + [i["b"] for i in items], pad_id, device, categories=True)
    out = [r[1:] for r in rows]  # column 0 is the shared head's
    return out[:len(items)], out[len(items):]


def category_sign_metrics(items: list[dict], a: list, b: list, categories: list[str]) -> dict:
    """eval_sign_accuracy_<category>: the share of answers (categories known) whose category cost is
    below zero exactly when the answer is not harmful in that category."""
    import torch

    costs, harmful = [], []
    for i, ca, cb in zip(items, a, b):
        for cats, c, known in ((i["a_cats"], ca, i["cats_known"][0]), (i["b_cats"], cb, i["cats_known"][1])):
            if known:
                costs.append(c)
                harmful.append([k in cats for k in categories])
    if not costs:
        return {}
    costs, harmful = torch.tensor(costs), torch.tensor(harmful)  # [N, K] each
    return {f"eval_sign_accuracy_{k}": sign_accuracy(costs[:, j], ~harmful[:, j]) for j, k in enumerate(categories)}


def fresh_pairs_stage(inputs: dict) -> str | None:
    """The input stage whose `policy_pairs` (fresh pairs of the current policy's samples) a fit
    measures `policy_accuracy` on: the latest red team's (refits), else SFT's; None without any."""
    from core.stage_names import of_kind

    red = [n for n in of_kind(inputs, "red_team") if "policy_pairs" in inputs[n]]
    if red:
        return red[-1]
    return "sft" if "policy_pairs" in inputs.get("sft", {}) else None


def preference_metrics(kind: str, items: list[dict], a: list[float], b: list[float]) -> dict:
    """Eval metrics from scores of preferred (a) and other (b) answers."""
    import torch

    if not items:
        return {"eval_accuracy": None, "eval_pairs": 0}
    ta, tb = torch.tensor(a), torch.tensor(b)
    if kind == "reward":
        return {"eval_accuracy": pair_accuracy(ta, tb), "eval_pairs": len(items)}
    # cost: the preferred answer (a) is the safer one and should have the LOWER cost.
    ranks_harm = torch.tensor([not (i["has_safety"] and i["a_safe"] and i["b_safe"]) for i in items])
    m = {"eval_accuracy_all": pair_accuracy(tb, ta), "eval_pairs": len(items),
         "eval_accuracy": pair_accuracy(tb[ranks_harm], ta[ranks_harm]) if ranks_harm.any() else None,
         "eval_harm_ranking_pairs": int(ranks_harm.sum())}
    labelled = [k for k, i in enumerate(items) if i["has_safety"]]
    if labelled:
        costs = torch.tensor([a[k] for k in labelled] + [b[k] for k in labelled])
        safe = torch.tensor([items[k]["a_safe"] for k in labelled] + [items[k]["b_safe"] for k in labelled])
        m["eval_sign_accuracy"] = sign_accuracy(costs, safe)
        m["safe_cost_mean"] = costs[safe].mean().item() if safe.any() else None
        m["unsafe_cost_mean"] = costs[~safe].mean().item() if (~safe).any() else None
    return m


def scores_loss(kind: str, tc: dict, items: list[dict]):
    """The fit's loss of a batch of pairs as a function of their end scores: Bradley-Terry on rewards
    (paper Eq. 5), or on costs with the sign terms on the labelled rows (Eq. 6).
    -> loss(preferred [B], other [B]); the DeepSpeed loop and the linear probe both use it."""
    import torch

    from core.objectives import cost_pair_loss, reward_pair_loss

    if kind == "reward":
        return lambda a, b: reward_pair_loss(a, b, tc["regularization"])
    labelled = torch.tensor([i["has_safety"] for i in items])
    a_safe = torch.tensor([bool(i["a_safe"]) for i in items])
    b_safe = torch.tensor([bool(i["b_safe"]) for i in items])
    return lambda a, b: cost_pair_loss(a, b, a_safe.to(a.device), b_safe.to(a.device), tc["regularization"],
                                       has_safety_labels=labelled.to(a.device))


def _pair_loss(engine, items: list[dict], kind: str, tc: dict, categories: list[str], pad_id: int):
    """A batch of pairs' loss (`scores_loss`) and, with category heads, one Bradley-Terry and sign
    term per head beside it. -> (loss, {"tokens"})."""
    from actors.experience import pad
    from core.objectives import category_cost_loss

    ids, mask = pad([i["a"] for i in items] + [i["b"] for i in items], pad_id)
    out = engine(ids.to(engine.device), mask.to(engine.device), **({"with_categories": True} if categories else {}))
    end = out[1].float()
    total = scores_loss(kind, tc, items)(end[:len(items)], end[len(items):])  # [B] preferred, [B] other
    if categories:
        per = out[2].float()  # [2B, K]
        (in_a, known_a), (in_b, known_b) = (category_labels(items, categories, side) for side in ("a", "b"))
        total = total + category_cost_loss(per[:len(items)], per[len(items):], in_a.to(end.device),
                                           in_b.to(end.device), known_a.to(end.device), known_b.to(end.device))
    return total, {"tokens": int(mask.sum())}


def _scored(engine, rank: int, world: int, pairs: list[dict], score=score_pairs, *, pad_id: int):
    """Every rank scores its share of `pairs`; -> (pairs, preferred scores, other scores) in rank order.
    engine: a DeepSpeed engine, or the linear probe's plain model."""
    mine, real = rank_share(len(pairs), rank, world)
    device = getattr(engine, "device", None) or next(engine.parameters()).device
    a, b = score(engine, [pairs[k] for k in mine], pad_id, device)
    order, sa, sb = [], [], []
    for idx, n, pa_, pb_ in gather_objects((mine, real, a, b), world):
        order += idx[:n]
        sa += pa_[:n]
        sb += pb_[:n]
    return [pairs[k] for k in order], sa, sb


def preference_loop(config: dict) -> None:
    """One worker of a reward or cost fit (Ray Train's, or a kept learner: stages/common/fit_runner.py)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from actors.models import enable_gradient_checkpointing
    from actors.score_model import ScoreModel

    kind, tc = config["kind"], config["train"]
    tok = AutoTokenizer.from_pretrained(config["backbone"])
    train = _items(pq.read_table(config["train_data"]).to_pylist(), kind, tok, config)
    if config.get("init_model"):  # a warm refit: the last fit's model, its heads and categories
        model = ScoreModel.from_pretrained(config["init_model"])
        categories = list(model.categories)
    else:
        categories = category_heads(train, tc["min_category_pairs"])[0] if kind == "cost" and tc["per_category"] else []
        model = ScoreModel.from_backbone(config["backbone"], score_type=kind, seed=config["seed"], categories=tuple(categories),
                                         pooling=tc["pooling"])
    if tc["gradient_checkpointing"] and tc["train_backbone"]:
        enable_gradient_checkpointing(model)
    held_out = _items(pq.read_table(config["eval_data"]).to_pylist(), kind, tok, config)
    policy = _items(policy_pairs(kind, read_jsonl(config["policy_pairs"])), kind, tok, config) if config["policy_pairs"] else []
    if not train:
        raise ValueError(f"no training pairs with a {'better' if kind == 'reward' else 'safer'}_response_id in {config['train_data']}")

    loss = functools.partial(_pair_loss, kind=kind, tc=tc, categories=categories, pad_id=tok.pad_token_id)

    last_eval = {}

    scored = functools.partial(_scored, pad_id=tok.pad_token_id)

    def evaluate(engine, rank, world):
        items, sa, sb = scored(engine, rank, world, held_out)
        metrics = preference_metrics(kind, items, sa, sb)
        if categories:
            metrics.update(category_sign_metrics(*scored(engine, rank, world, held_out, score_category_pairs), categories))
        if config["policy_pairs"]:
            _, pa, pb = scored(engine, rank, world, policy)
            pa, pb = torch.tensor(pa), torch.tensor(pb)
            # the preferred answer should have the higher reward; the safer one the lower cost
            acc = (pair_accuracy(pa, pb) if kind == "reward" else pair_accuracy(pb, pa)) if policy else None
            metrics.update(policy_accuracy=None if acc is None else round(acc, 4), policy_pairs=len(policy))
        if rank == 0:
            Path(config["scores_path"]).write_text(json.dumps(
                {"a": sa, "b": sb, "a_safe": [i["a_safe"] for i in items], "b_safe": [i["b_safe"] for i in items]}))
        last_eval.update(metrics)
        return metrics

    def export(engine, state_dict):
        if state_dict is not None:
            meta = {k: last_eval.get(k) for k in ("eval_accuracy", "safe_cost_mean", "unsafe_cost_mean")}
            getattr(engine, "module", engine).save_pretrained(config["output_dir"], tokenizer=tok, state_dict=state_dict, **meta)

    task = FitTask(model=model, train_items=train, loss=loss, evaluate=evaluate, export=export, tc=tc,
                   seed=config["seed"], run_name=config["run_name"], log_path=Path(config["log_path"]))
    if tc["train_backbone"]:
        fit(task)
    else:
        fit_probe(task, scores_loss(kind, tc, train), pad_id=tok.pad_token_id, reuse_from=config.get("features_from"),
                  save_to=config["features_path"] if tc["refit"] == "warm" else None)


def _histogram(path: Path, kind: str, scores: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if kind == "cost" and any(s is not None for s in scores["a_safe"]):
        vals = scores["a"] + scores["b"]
        safe = scores["a_safe"] + scores["b_safe"]
        ax.hist([v for v, s in zip(vals, safe) if s], bins=40, alpha=0.6, label="safe answers", color="tab:green")
        ax.hist([v for v, s in zip(vals, safe) if s is False], bins=40, alpha=0.6, label="unsafe answers", color="tab:red")
        ax.axvline(0, color="k", lw=0.8)
    else:
        label = ("better", "worse") if kind == "reward" else ("safer", "less safe")
        ax.hist(scores["a"], bins=40, alpha=0.6, label=f"{label[0]} answers")
        ax.hist(scores["b"], bins=40, alpha=0.6, label=f"{label[1]} answers")
    ax.set_xlabel(f"{kind} score")
    ax.set_ylabel("answers (eval split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def policy_pairs(kind: str, rows: list[dict]) -> list[dict]:
    """The fresh pairs `policy_accuracy` counts: those whose oracle label is not a coin flip (a tie
    in helpfulness for the reward model, in harm and severity for the cost model)."""
    tie = "better_is_tie" if kind == "reward" else "safer_is_tie"
    return [r for r in rows if not r[tie]]


def refit_rows(rows: list[dict], earlier_ids: set, kind: str, replay: float, seed: int) -> tuple[list[dict], int, int]:
    """A warm refit's training pairs: those of `kind` (labelled for it) not among `earlier_ids` (the
    pairs the last fit trained on), and `replay` times as many of the earlier ones, drawn without
    replacement by `seed`, in their file order. Returns (rows, new, replayed)."""
    import random

    label = "better_response_id" if kind == "reward" else "safer_response_id"
    labelled = [r for r in rows if r[label] is not None]
    new = [i for i, r in enumerate(labelled) if r["pair_id"] not in earlier_ids]
    earlier = [i for i, r in enumerate(labelled) if r["pair_id"] in earlier_ids]
    drawn = random.Random(seed).sample(earlier, min(len(earlier), round(replay * len(new))))
    keep = sorted(set(new) | set(drawn))
    return [labelled[i] for i in keep], len(new), len(drawn)


def _warm_start(ctx, kind: str, tc, loop_config: dict) -> str | None:
    """refit warm, after a round: start from the last fit's model, on the new pairs and a replay of
    earlier ones (refit_rows, written to the stage's refit_train.parquet); a linear probe: from the
    last probe's features (stages/common/linear_probe.py). Returns the last fit's name; None for a
    fit from the backbone."""
    from core.stage_names import of_kind

    fits, ingests = of_kind(ctx.inputs, f"fit_{kind}"), of_kind(ctx.inputs, "ingest")
    if tc.refit != "warm" or not fits:
        return None
    if not tc.train_backbone:
        saved = ctx.inputs[fits[-1]].get(FEATURES)
        loop_config["features_from"] = str(saved) if saved else None
        ctx.log(f"  warm refit: the probe's features of {fits[-1]} where a pair has them" if saved else
                f"  warm refit: {fits[-1]} saved no features (it ran with refit scratch): every pair's are computed")
        return fits[-1] if saved else None
    import pyarrow as pa
    import pyarrow.parquet as pq

    earlier = set(pq.read_table(ctx.input(ingests[-2], "train"), columns=["pair_id"]).column("pair_id").to_pylist())
    rows, new, replayed = refit_rows(pq.read_table(loop_config["train_data"]).to_pylist(), earlier, kind,
                                     tc.refit_replay, ctx.cfg.seed)
    if not new:  # e.g. every red-team pair a tie: the fit from the backbone, on every pair, is the refit
        ctx.log(f"  warm refit: no {kind} pairs that {ingests[-2]} did not have: a fit from the backbone on every pair")
        return None
    path = ctx.out_dir / "refit_train.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(loop_config["train_data"])), path)
    loop_config.update(train_data=str(path), init_model=str(ctx.input(fits[-1], "model")))
    if tc.refit_lr is not None:
        loop_config["train"]["lr"] = tc.refit_lr
    ctx.log(f"  warm refit from {fits[-1]}: {new} new {kind} pairs and {replayed} earlier ones "
            f"(refit_replay {tc.refit_replay:g}), {tc.epochs} epoch(s) at lr {loop_config['train']['lr']:g}")
    return fits[-1]


FEATURES = "probe_features"  # a linear probe's saved features (refit warm), the next refit's input


def fit_lengths(cfg, tc) -> dict[str, int]:
    """The prompt and answer tokens a fit encodes per pair: its section's, else the model's."""
    return {"max_prompt_tokens": tc.max_prompt_tokens or cfg.model.max_prompt_tokens,
            "max_answer_tokens": tc.max_answer_tokens or cfg.model.max_answer_tokens}


def _run(ctx, kind: str) -> StageResult:
    cfg = ctx.cfg
    tc = cfg.reward if kind == "reward" else cfg.cost
    sft_model = ctx.input("sft", "model") if "sft" in ctx.inputs else Path(cfg.model.path)
    out_model, log_path, scores_path = ctx.out_dir / "model", ctx.out_dir / "train_log.jsonl", ctx.out_dir / "eval_scores.json"
    ingest = ctx.latest("ingest")
    backbone = Path(tc.backbone) if tc.backbone else sft_model  # an own backbone scores by text (core/text.py)
    loop_config = {"kind": kind, "backbone": str(backbone), "train_data": str(ctx.input(ingest, "train")),
                   "eval_data": str(ctx.input(ingest, "eval")), "output_dir": str(out_model),
                   "log_path": str(log_path), "scores_path": str(scores_path), "seed": cfg.seed,
                   "train": tc.model_dump(), **fit_lengths(cfg, tc), "policy_pairs": None,
                   "features_path": str(ctx.out_dir / "probe_features.pt")}
    Path(loop_config["features_path"]).unlink(missing_ok=True)  # an earlier attempt's, perhaps of another config
    warm_from = _warm_start(ctx, kind, tc, loop_config)
    source = fresh_pairs_stage(ctx.inputs)
    if source is not None:
        loop_config["policy_pairs"] = str(ctx.input(source, "policy_pairs"))
    learner = kept_learner(ctx, tc, kind)
    where = describe(learner, tc)
    if tc.train_backbone:
        start = f"warm from {warm_from}" if warm_from else \
            f"backbone {backbone}, {'last-token' if tc.pooling == 'last' else 'mean-pooled'} score"
        ctx.log(f"  {where}, {tc.device}, {tc.precision}, ZeRO-{tc.zero_stage}; {start}")
    else:
        ctx.log(f"  {where}, {tc.device}; a linear probe of the frozen backbone {backbone} "
                f"({tc.pooling}-pooled features, L-BFGS, L2 {tc.weight_decay:g})")
    if kind == "cost" and tc.per_category:
        import pyarrow.parquet as pq

        rows = [r for r in pq.read_table(ctx.input(ingest, "train")).to_pylist() if r["safer_response_id"] is not None]
        heads, rare = category_heads([pair_categories(r, r["safer_response_id"]) for r in rows], tc.min_category_pairs)
        ctx.log(f"  cost heads per category ({len(heads)}): {', '.join(heads) or 'none'}"
                + (f"; on the shared head (under {tc.min_category_pairs} ranking pairs): "
                   + ", ".join(f"{c} ({n})" for c, n in rare.items()) if rare else ""))
    run_fit(ctx, learner, preference_loop, loop_config, tc, ctx.name.replace("@", "-"))
    end = [e for e in read_jsonl(log_path) if e["event"] == "end"][-1]
    history = end["history"]
    scores = json.loads(scores_path.read_text())
    _histogram(ctx.out_dir / "score_hist.png", kind, scores)
    metrics = {k: v for k, v in history[-1].items() if k not in ("epoch",)}
    metrics.update(loss_curve=[h["train_loss"] for h in history],
                   eval_accuracy_curve=[h["eval_accuracy"] for h in history],
                   restarts=end["restarts"], resumed_from_steps=end["resumed_from_steps"])
    outputs = {"model": "model", "train_log": "train_log.jsonl", "eval_scores": "eval_scores.json",
               "histogram": "score_hist.png"}
    if Path(loop_config["features_path"]).exists():
        outputs[FEATURES] = "probe_features.pt"
    if "policy_accuracy" in metrics:
        metrics["policy_accuracy_curve"] = [h.get("policy_accuracy") for h in history]
    ctx.log(f"  {kind} model: eval_accuracy={metrics.get('eval_accuracy')}, policy_accuracy={metrics.get('policy_accuracy')}"
            + (f", eval_sign_accuracy={metrics.get('eval_sign_accuracy')}" if kind == "cost" else ""))
    return StageResult(outputs, metrics)


def run_reward(ctx) -> StageResult:
    return _run(ctx, "reward")


def run_cost(ctx) -> StageResult:
    return _run(ctx, "cost")
