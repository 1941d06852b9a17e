"""`python -m pipeline plan`'s text: the plan (pipeline/plan.py) as tables, every figure an estimate."""
from __future__ import annotations


def _g(x: float) -> str:
    if x == 0:
        return "0"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _n(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _is_number(c: str) -> bool:
    try:
        float(c.replace(",", "").rstrip("BM"))
        return True
    except ValueError:
        return c in ("", "-")


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Columns of numbers right-aligned, text left-aligned."""
    cols = range(len(rows[0]))
    widths = [max(len(r[i]) for r in rows) for i in cols]
    right = [all(_is_number(r[i]) for r in rows[1:]) for i in cols]
    return [indent + "  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _format_round(rnd: dict, gpu_memory_gib: float | None) -> list[str]:
    """The plan's round section: its actors, the two layouts, memory per role and per GPU (or host)."""
    out = []
    # the settings that change what a round optimises, where they are not the default
    variant = "".join(f", {k} {rnd[k]}" for k, default in (("constraints", "single"), ("group_scale", "group"))
                      if rnd.get(k) not in (None, default))
    out += ["", f"Safe RLHF round ({rnd['algorithm']}{variant}, layout {rnd['layout']}, engine {rnd['engine']}, {rnd['device']}, "
                f"{rnd['precision']}, ZeRO-{rnd['zero_stage']}, learners_per_role {rnd['learners_per_role']}, "
                f"colocate_scorers {rnd['colocate_scorers']})"]
    rows = [["actor", "CPUs", "GPUs", "GiB (estimate)", "hosts"]]
    for a in rnd["actors"]:
        rows.append([a["name"], f"{a['cpus']:g}", f"{a['gpus']:g}", _g(a["gib"]),
                     ", ".join(f"scorer-{h}" for h in a["hosts"]) or "-"])
    rows.append(["total", f"{rnd['total_cpus']:g}", f"{rnd['total_gpus']:g}", "", ""])
    out += _table(rows)
    out += ["", "  layouts (safe_rlhf.layout; colocated: the scorers run inside the learners' processes)"]
    rows = [["layout", "processes", "GPUs", "GiB (estimate)", "fits"]]
    for name, lay in rnd["layouts"].items():
        rows.append([name + (" (this config)" if name == rnd["layout"] else ""), str(lay["processes"]),
                     f"{lay['total_gpus']:g}", f"{_g(lay['gib'])} ({lay['memory']})" if lay["gib"] is not None else "-",
                     {None: "-", True: "yes", False: "NO"}[lay["fits"]]])
    out += _table(rows, "  ")
    out += ["", "  memory per role (GiB, estimate; rollout figures are per GPU of its tensor-parallel group)"]
    rows = [["role", "params", "weights", "grads", "optim", "activ", "logits", "KV cache", "context", "total"]]
    for role, r in rnd["roles"].items():
        rows.append([role, _n(r["params"]), _g(r["weights_gib"]), _g(r["gradients_gib"]), _g(r["optimizer_gib"]),
                     _g(r["activations_gib"]), _g(r["logits_gib"]), _g(r["kv_cache_gib"]) if role == "rollout" else "-",
                     _g(r["context_gib"]), _g(r["total_gib"])])
    out += _table(rows, "  ")
    if "rollout" in rnd["roles"]:
        r = rnd["roles"]["rollout"]
        line = f"  rollout KV cache: {r['kv_source']}"
        if "full_length_sequences" in r:
            line += (f"; holds ~{r['full_length_sequences']} full-length ({r['max_len']}-token) sequences at once "
                     f"(all {r['kv_sequences']} would need ~{_g(r['kv_needed_gib'])} GiB per GPU; vLLM queues the rest)")
        out.append(line)
    if rnd["gpus"]:
        out += ["", f"  per GPU ({gpu_memory_gib:g} GiB each; colocated scorers placed where they fit best)"]
        rows = [["GPU", "actors", "GiB", "fits"]]
        for g in rnd["gpus"]:
            rows.append([str(g["gpu"]), " + ".join(g["actors"]), _g(g["used_gib"]),
                         "yes" if g["fits"] else f"NO (over by {_g(-g['free_gib'])})"])
        out += _table(rows, "  ")
    elif rnd["device"] == "cpu":
        out.append(f"  all round actors together: ~{_g(rnd['host_gib_all_actors'])} GiB of host memory"
                   + (" (kept between stages: held during the fits too)" if rnd["keep_actors"] else ""))
        if rnd["start_ahead_from_cpus"] is not None:
            n = rnd["start_ahead_from_cpus"]
            out.append(f"  round 1's actors start ahead, beside the fits, on a cluster of {n:g} CPUs or more (the fits "
                       f"reserve {n - 1:g}); with fewer they start with the round")
    if rnd.get("hint"):
        out.append(f"  hint: {rnd['hint']}")
    return out


def format_plan(p: dict) -> str:
    m, rnd = p["model"], p["round"]
    sh = m["shape"]
    out = [f"Plan for {p['name']}: every memory figure is an ESTIMATE in GiB: model state and working memory (see the notes)",
           f"model: {m['source']}",
           f"  Llama shape: vocab {sh['vocab_size']}, hidden {sh['hidden_size']}, intermediate {sh['intermediate_size']}, "
           f"{sh['num_layers']} layers, {sh['num_heads']} heads ({sh['num_kv_heads']} KV), head_dim {sh['head_dim']}, "
           f"tied embeddings {'yes' if sh['tie_word_embeddings'] else 'no'}",
           f"  parameters: causal LM {m['causal_lm_params']:,} ({_n(m['causal_lm_params'])}); "
           f"score model on it {m['score_model_params']:,} ({_n(m['score_model_params'])})",
           *[f"  {role} model: {sm['params']:,} ({_n(sm['params'])}) parameters, {sm['source']}"
             + (("; its critic starts from " + ("it" if sm["critic_from_it"] else "the policy (another tokenizer)"))
                if f"learner-{role}_critic" in rnd["roles"] else "") for role, sm in m["score_models"].items()],
           "  bytes/param: weights and gradients 2 (bf16/fp16) or 4 (fp32); AdamW state 12 (fp32 master + 2 moments) "
           "or 8 (fp32: 2 moments)",
           f"GPU memory: {format(p['gpu_memory_gib'], 'g') + ' GiB per GPU' if p['gpu_memory_gib'] else 'not given'}",
           "", "Fits (one at a time; each worker, Ray Train's or a kept learner's (runner auto): model state per ZeRO shard, "
           "activations, logits, context)"]
    rows = [["stage", "workers", "device", "precision", "ZeRO", "CPUs", "GPUs", "model", "weights", "grads", "optim",
             "activ", "logits", "GiB/worker", "fits"]]
    for f in p["fits"]:
        mm = f["memory_per_worker"]
        rows.append([f"{f['stage']} ({f['section']})", str(f["workers"]), f["device"], f["precision"], str(f["zero_stage"]),
                     f"{f['cpus']:g}", str(f["gpus"]), f["model"], _g(mm["weights_gib"]), _g(mm["gradients_gib"]),
                     _g(mm["optimizer_gib"]), _g(mm["activations_gib"]), _g(mm["logits_gib"]), _g(mm["total_gib"]),
                     {None: "-", True: "yes", False: "NO"}[f["fits"]]])
    out += _table(rows)
    out += [f"  {f['stage']}: {f['hint']}" for f in p["fits"] if f.get("hint")]

    out += _format_round(rnd, p["gpu_memory_gib"])
    out += ["", f"verdict: {p['verdict']}", ""] + p["notes"]
    return "\n".join(out)
