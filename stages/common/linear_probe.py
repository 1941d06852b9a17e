"""A fit whose backbone stays frozen (`reward.train_backbone: false`, `cost.train_backbone: false`).

The head is linear and the backbone fixed, so what the head sees of each answer, its pooled hidden
state, never changes: the worker computes it once for every training pair (the pairs sharded over
the Ray Train workers and gathered), then fits the head to those features by full-batch L-BFGS on
the fit's own loss (Eq. 5, or Eq. 6 with its sign terms), `weight_decay` as its L2. It is the
convex problem a linear probe of a sentence encoder is; epochs of Adam over micro-batches would
run the backbone once per epoch to approach the same minimum.

It writes the same train log (`start`, one `epoch`, `end`) and calls the same `evaluate` and
`export` as `cluster.train.fit`, so the stage reads both alike. It reports no checkpoint: after a
worker crash Ray Train starts it again, and it recomputes the features.
"""
from __future__ import annotations

import json
import time

from cluster.train import FitTask, gather_objects, rank_share


def _features(model, items: list[dict], pad_id: int, device, progress, batch: int = 32):
    """[N, H] pooled features of each pair's preferred (a) and other (b) answer, in batches of pairs;
    progress(pairs done) after each batch."""
    import torch

    from actors.experience import pad

    a, b = [], []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        ids, mask = pad([i["a"] for i in chunk] + [i["b"] for i in chunk], pad_id)
        pooled = model.pooled_features(ids.to(device), mask.to(device)).float().cpu()
        a.append(pooled[:len(chunk)])
        b.append(pooled[len(chunk):])
        progress(s + len(chunk))
    empty = torch.zeros(0, model.score_head.in_features)
    return (torch.cat(a), torch.cat(b)) if a else (empty, empty)


def fit_probe(task: FitTask, loss_of_scores, *, pad_id: int) -> None:
    """The worker loop of a linear probe: features once, the head by L-BFGS, evaluate, export."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    from core.objectives import fit_linear_head

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    model = task.model.to(device).eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    log = (lambda rec: open(task.log_path, "a").write(json.dumps(rec) + "\n")) if rank == 0 and task.log_path else (lambda rec: None)
    log({"event": "start", "global_step": 0, "total_steps": 1, "world_size": world, "probe": True})
    t0 = time.time()
    mine, real = rank_share(len(task.train_items), rank, world)
    logged = [0]

    def progress(done: int) -> None:  # a train-log line at each tenth of this rank's pairs
        if done * 10 // max(len(mine), 1) > logged[0] * 10 // max(len(mine), 1) or done == len(mine):
            logged[0] = done
            log({"event": "features", "pairs_done": done, "pairs": len(mine), "rank": rank,
                 "pairs_per_s": round(done / max(time.time() - t0, 1e-9), 2)})

    a, b = _features(model, [task.train_items[k] for k in mine], pad_id, device, progress)
    order, fa, fb = [], [], []
    for idx, n, ra, rb in gather_objects((mine, real, a, b), world):
        order += idx[:n]
        fa.append(ra[:n])
        fb.append(rb[:n])
    undo = torch.argsort(torch.tensor(order))  # back to item order: every rank solves the same problem
    fa, fb = torch.cat(fa)[undo], torch.cat(fb)[undo]
    features_s = time.time() - t0
    weight, bias, loss = fit_linear_head(fa, fb, loss_of_scores, l2=task.tc["weight_decay"])
    with torch.no_grad():
        model.score_head.weight.copy_(weight.view_as(model.score_head.weight))
        model.score_head.bias.fill_(bias.item())
    metrics = task.evaluate(model, rank, world)
    metrics.update(epoch=1, global_step=1, train_loss=loss, features_s=round(features_s, 1),
                   pairs_per_s=round(len(task.train_items) / max(features_s, 1e-9), 2))
    log({"event": "epoch", **metrics})
    task.export(model, {k: v.cpu() for k, v in model.state_dict().items()} if rank == 0 else None)
    log({"event": "end", "global_step": 1, "restarts": 0, "resumed_from_steps": [], "history": [metrics]})
