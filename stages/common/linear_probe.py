"""A fit whose backbone stays frozen (`reward.train_backbone: false`, `cost.train_backbone: false`).

The head is linear and the backbone fixed, so what the head sees of each answer, its pooled hidden
state, never changes: the worker computes it once for every training pair (the pairs sharded over
the Ray Train workers and gathered), then fits the head to those features by full-batch L-BFGS on
the fit's own loss (Eq. 5, or Eq. 6 with its sign terms), `weight_decay` as its L2. It is the
convex problem a linear probe of a sentence encoder is; epochs of Adam over micro-batches would
run the backbone once per epoch to approach the same minimum.

It writes the same train log (`start`, one `epoch`, `end`) and calls the same `evaluate` and
`export` as `cluster.train.fit`, so the stage reads both alike. It reports no checkpoint: after a
crash its worker (Ray Train's, or a kept learner's replacement) starts it again, and it recomputes
the features.

With `refit: warm` a probe saves its features (`save_to`), keyed by each pair's token ids, and the
next round's refit reads them (`reuse_from`): the backbone is the same frozen one, so it computes
features only for the pairs it has not seen, and fits the head on every pair as before.
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


def pair_key(item: dict) -> str:
    """A pair's identity for the feature cache: its two answers' token ids (what the backbone reads)."""
    import hashlib

    return hashlib.sha1(json.dumps([item["a"], item["b"]]).encode()).hexdigest()


def load_features(path: str | None) -> dict:
    """{pair_key: (a, b) features} saved by an earlier probe; {} without one."""
    import torch

    if not path:
        return {}
    saved = torch.load(path)
    return {k: (a, b) for k, a, b in zip(saved["keys"], saved["a"], saved["b"])}


def all_features(keys: list[str], known: dict, todo: list[int], new_a, new_b):
    """([N, H], [N, H]) features of every item in item order (every rank solves the same problem):
    item todo[j]'s are new_a[j], new_b[j]; the others' are known[keys[k]]."""
    import torch

    computed = {k: j for j, k in enumerate(todo)}
    fa = torch.stack([new_a[computed[k]] if k in computed else known[key][0] for k, key in enumerate(keys)])
    fb = torch.stack([new_b[computed[k]] if k in computed else known[key][1] for k, key in enumerate(keys)])
    return fa, fb


def fit_probe(task: FitTask, loss_of_scores, *, pad_id: int, reuse_from: str | None = None,
              save_to: str | None = None) -> None:
    """The worker loop of a linear probe: features once, the head by L-BFGS, evaluate, export.
    reuse_from: an earlier probe's saved features (the same backbone); save_to: where rank 0 saves these."""
    import torch

    from cluster.train import session
    from core.objectives import fit_linear_head

    rank, world = session().rank_world()
    device = session().device()
    model = task.model.to(device).eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    log = (lambda rec: open(task.log_path, "a").write(json.dumps(rec) + "\n")) if rank == 0 and task.log_path else (lambda rec: None)
    log({"event": "start", "global_step": 0, "total_steps": 1, "world_size": world, "probe": True})
    t0 = time.time()
    keys = [pair_key(i) for i in task.train_items]
    known = load_features(reuse_from)
    todo = [k for k, key in enumerate(keys) if key not in known]  # the pairs whose features are new
    mine, real = rank_share(len(todo), rank, world)
    logged = [0]

    def progress(done: int) -> None:  # a train-log line at each tenth of this rank's pairs
        if done * 10 // max(len(mine), 1) > logged[0] * 10 // max(len(mine), 1) or done == len(mine):
            logged[0] = done
            log({"event": "features", "pairs_done": done, "pairs": len(mine), "rank": rank, "reused": len(keys) - len(todo),
                 "pairs_per_s": round(done / max(time.time() - t0, 1e-9), 2)})

    a, b = _features(model, [task.train_items[todo[j]] for j in mine], pad_id, device, progress)
    order, new_a, new_b = [], [], []
    for idx, n, ra, rb in gather_objects((mine, real, a, b), world):
        order += idx[:n]
        new_a.append(ra[:n])
        new_b.append(rb[:n])
    undo = torch.argsort(torch.tensor(order, dtype=torch.long))  # back to todo's order
    fa, fb = all_features(keys, known, todo, torch.cat(new_a)[undo], torch.cat(new_b)[undo])
    features_s = time.time() - t0
    if save_to and rank == 0:
        torch.save({"keys": keys, "a": fa, "b": fb}, save_to)
    weight, bias, loss = fit_linear_head(fa, fb, loss_of_scores, l2=task.tc["weight_decay"])
    with torch.no_grad():
        model.score_head.weight.copy_(weight.view_as(model.score_head.weight))
        model.score_head.bias.fill_(bias.item())
    metrics = task.evaluate(model, rank, world)
    metrics.update(epoch=1, global_step=1, train_loss=loss, features_s=round(features_s, 1),
                   pairs_per_s=round(len(todo) / max(features_s, 1e-9), 2), features_reused=len(keys) - len(todo))
    log({"event": "epoch", **metrics})
    task.export(model, {k: v.cpu() for k, v in model.state_dict().items()} if rank == 0 else None)
    log({"event": "end", "global_step": 1, "restarts": 0, "resumed_from_steps": [], "history": [metrics]})
