"""What a run needs before launch: workers, actors, CPUs/GPUs, and a memory estimate per role.

    plan(cfg, gpu_memory_gib=None) -> dict      (plain JSON-able data)
    format_plan(p) -> str                        (the text a person reads: pipeline/plan_format.py)

The memory model (bytes per parameter, ZeRO sharding, working memory, parameter counts) is
pipeline/memory_model.py; its docstring states the accounting and what it leaves out.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

from core.kv_cache import CPU_KV_BLOCK_TOKENS, CPU_KV_CACHE_CAP, cpu_kv_cache_bytes
from pipeline.memory_model import (GIB, OPTIMIZER_BYTES, WEIGHT_BYTES, LlamaShape, ScoreShape, activation_gib,
                                   forward_gib, kv_bytes_per_token, llama_params, logits_gib, model_shape,
                                   score_model_params, score_shape, training_memory, weights_only, with_working_memory)
from core.objectives import get_algorithm
from stages.common.model_actors import engine_max_model_len
from stages.safe_rlhf.resources import cpus_to_start_ahead, learner_roles, resource_plan

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def rollout_memory(rl, model_cfg, s: LlamaShape, params: int, gpu_memory_gib: float | None) -> dict:
    """One rollout worker, per GPU of its tensor-parallel group (per process on CPU)."""
    vllm = rl.engine == "vllm"
    tp = rl.tensor_parallel_size if vllm else 1
    m = weights_only(params, rl.precision, tp)
    max_len = model_cfg.max_prompt_tokens + rl.max_new_tokens
    seqs = rl.max_num_seqs if vllm else math.ceil(rl.prompts_per_step / rl.rollout_workers)
    per_token = kv_bytes_per_token(s, rl.precision) / tp
    needed = seqs * max_len * per_token / GIB
    m.update(engine=rl.engine, tensor_parallel_size=tp, max_len=max_len, kv_sequences=seqs,
             kv_needed_gib=needed, kv_bytes_per_token_per_gpu=per_token)
    if vllm and rl.device == "cuda" and gpu_memory_gib:
        reserved = rl.gpu_memory_utilization * gpu_memory_gib
        cache = max(0.0, reserved - m["weights_gib"])
        m.update(kv_cache_gib=cache, reserved_gib=reserved, total_gib=max(reserved, m["weights_gib"]),
                 kv_source=f"gpu_memory_utilization {rl.gpu_memory_utilization} x {gpu_memory_gib:g} GiB - weights",
                 full_length_sequences=int(cache * GIB // (max_len * per_token)))
    elif vllm and rl.device == "cpu":
        engine_len = engine_max_model_len(model_cfg.max_prompt_tokens, rl.max_new_tokens)
        cache = cpu_kv_cache_bytes(kv_bytes_per_token(s, rl.precision), seqs, engine_len, rl.cpu_kv_cache_gib) / GIB
        m.update(kv_cache_gib=cache, total_gib=m["weights_gib"] + cache,
                 kv_source=(f"cpu_kv_cache_gib {rl.cpu_kv_cache_gib:g}" if rl.cpu_kv_cache_gib is not None
                            else f"max_num_seqs {seqs} x {engine_len} tokens in blocks of {CPU_KV_BLOCK_TOKENS}, "
                                 f"at most {CPU_KV_CACHE_CAP / GIB:g} GiB"))
    else:
        m.update(kv_cache_gib=needed, total_gib=m["weights_gib"] + needed,
                 kv_source=(f"max_num_seqs {seqs} x {max_len} tokens" if vllm
                            else f"up to {seqs} sequences (prompts per worker) x {max_len} tokens"))
    return m


def _role_of(actor_name: str) -> str:
    return actor_name.rsplit("-", 1)[0]  # rollout-0 -> rollout, learner-policy-1 -> learner-policy


def round_roles(rl, model_cfg, s: LlamaShape, scores: dict[str, ScoreShape], gpu_memory_gib: float | None) -> dict[str, dict]:
    """scores: the reward and cost models' sizes (their critics start from them, or from the policy)."""
    lm = llama_params(s)
    n, z, p = rl.learners_per_role, rl.zero_stage, rl.precision
    cuda = rl.device == "cuda"
    tokens = model_cfg.max_prompt_tokens + rl.max_new_tokens
    micro = rl.micro_batch_size or rl.learner_shard
    scorer_batch = min(128, rl.prompts_per_step)  # the scorers' batch (actors/scorer.py)
    roles = {
        "rollout": with_working_memory(rollout_memory(rl, model_cfg, s, lm, gpu_memory_gib), cuda=cuda),
        "scorer-reference": with_working_memory(weights_only(lm, p), forward_gib(s, tokens, scorer_batch, p), logits_gib(
            scorer_batch * rl.max_new_tokens, s.vocab_size, rl.logprob_chunk_tokens, train=False), cuda=cuda),
        "learner-policy": with_working_memory(training_memory(lm, p, z, n), activation_gib(
            s, tokens, micro, p, rl.gradient_checkpointing), logits_gib(
            micro * rl.max_new_tokens, s.vocab_size, rl.logprob_chunk_tokens, train=True), cuda=cuda),
    }
    for role, score in scores.items():
        roles[f"scorer-{role}"] = with_working_memory(weights_only(score.params, p),
                                                      forward_gib(score.shape, tokens, scorer_batch, p), cuda=cuda)
        critic = score if score.critic_from_it else ScoreShape(s, score_model_params(s), "the policy")
        roles[f"learner-{role}_critic"] = with_working_memory(training_memory(critic.params, p, z, n), activation_gib(
            critic.shape, tokens, micro, p, rl.gradient_checkpointing), cuda=cuda)
    return roles  # per actor; the round keeps the roles its actors use


# ---------------------------------------------------------------------------- placement on GPUs
def gpu_layout(actors: list[dict], roles: dict[str, dict], gpu_memory_gib: float, turns: bool = False) -> list[dict]:
    """One entry per GPU with the actors on it. Rollout workers take `tensor_parallel_size` GPUs,
    learners one each (they ask for 0.8 when scorers are colocated, leaving a sliver free); a scorer
    asking for a sliver is colocated on a learner GPU (the one with the most room, biggest scorer
    first: a best case, Ray does not place by memory). A policy learner in its rollout worker's
    bundle (weight_sync ipc, rollout_sleep) is on that worker's GPU: both resident, or with `turns`
    (rollout_sleep) the engine's memory while it samples beside the learner's model state, or the
    learner's whole while it learns, whichever is more."""
    gpus: list[dict] = []
    owners = {a["name"] for a in actors}
    for a in actors:
        if a.get("shares_gpu_with") not in owners:  # a trial config may name a worker it lacks: then its own
            a = {**a, "shares_gpu_with": None}
        if a["gpus"] >= 0.5 and not a["shares_gpu_with"]:  # owns its GPU(s)
            k = max(1, int(round(a["gpus"])))
            for i in range(k):
                label = f"{a['name']} (TP rank {i}/{k})" if a["role"] == "rollout" and k > 1 else a["name"]
                label += f" (hosting {', '.join(a['hosts'])} scorer{'s' if len(a['hosts']) > 1 else ''})" if a["hosts"] else ""
                gpus.append({"gpu": len(gpus), "actors": [label], "used_gib": a["gib"],
                             "kind": "learner" if a["role"].startswith("learner-") else a["role"]})
    for a in actors:
        if a.get("shares_gpu_with") in owners:
            g = next(g for g in gpus if g["actors"][0].split(" ")[0] == a["shares_gpu_with"])
            g["actors"].append(f"{a['name']} (sharing its GPU{', taking turns' if turns else ''})")
            learning = roles[a["role"]]["activations_gib"] + roles[a["role"]]["logits_gib"]
            g["used_gib"] = max(g["used_gib"] + a["gib"] - learning, a["gib"]) if turns else g["used_gib"] + a["gib"]
    learner_gpus = [g for g in gpus if g["kind"] == "learner"]
    shared = sorted((a for a in actors if 0 <= a["gpus"] < 0.5 and a["role"].startswith("scorer-")),
                    key=lambda a: -a["gib"])
    for a in shared:
        if not learner_gpus:
            break
        g = min(learner_gpus, key=lambda g: g["used_gib"])
        g["actors"].append(f"{a['name']} (colocated)")
        g["used_gib"] += a["gib"]
    for g in gpus:
        g["fits"] = g["used_gib"] <= gpu_memory_gib
        g["free_gib"] = gpu_memory_gib - g["used_gib"]
    return gpus


def _rollout_problem(roles: dict) -> str | None:
    r = roles["rollout"]
    if "reserved_gib" in r and r["weights_gib"] >= r["reserved_gib"]:
        return (f"vLLM's reservation ({r['reserved_gib']:.1f} GiB = gpu_memory_utilization x GPU) does not hold its "
                f"weight shard ({r['weights_gib']:.1f} GiB): raise gpu_memory_utilization or tensor_parallel_size")
    return None


def _round_actors(rl, roles: dict[str, dict]) -> list[dict]:
    """The round's actors (processes) with their CPUs, GPUs and memory: their role's, plus that of
    the scorers they host (`layout: colocated`; one process, one CUDA context)."""
    actors = []
    for a in resource_plan(rl).actors:
        role = _role_of(a.name)
        guests = [roles[f"scorer-{h}"] for h in a.hosts]
        gib = roles[role]["total_gib"] + sum(g["total_gib"] - g["context_gib"] for g in guests)
        actors.append({"name": a.name, "role": role, "cpus": a.cpus, "gpus": a.total_gpus, "hosts": list(a.hosts),
                       "gib": gib, "shares_gpu_with": a.bundle_with if a.total_gpus else None})
    return actors


def _plan_round(rl, model_cfg, s: LlamaShape, scores: dict[str, ScoreShape], gpu_memory_gib: float | None) -> dict:
    roles = round_roles(rl, model_cfg, s, scores, gpu_memory_gib)
    actors = _round_actors(rl, roles)
    present = {a["role"] for a in actors} | {f"scorer-{h}" for a in actors for h in a["hosts"]}
    roles = {k: v for k, v in roles.items() if k in present}
    grouped = get_algorithm(rl.algorithm).group_sampling
    out = {"algorithm": rl.algorithm, "constraints": rl.constraints, "group_scale": rl.group_scale if grouped else None,
           "layout": rl.layout, "engine": rl.engine, "device": rl.device, "precision": rl.precision,
           "zero_stage": rl.zero_stage, "learners_per_role": rl.learners_per_role,
           "rollout_workers": rl.rollout_workers, "tensor_parallel_size": rl.tensor_parallel_size,
           "colocate_scorers": rl.colocate_scorers, "keep_actors": rl.keeps_actors, "actors": actors,
           "total_cpus": sum(a["cpus"] for a in actors),
           # Physical GPUs: actors asking for >= 0.5 own theirs; slivers share a learner's.
           "total_gpus": sum(max(1, round(a["gpus"])) for a in actors if a["gpus"] >= 0.5 and not a["shares_gpu_with"]),
           "roles": roles, "gpus": None, "fits": None, "problems": []}
    if rl.device == "cuda":
        out["total_gpus_whole"] = math.ceil(out["total_gpus"])
        if gpu_memory_gib:
            gpus = gpu_layout(actors, roles, gpu_memory_gib, turns=rl.rollout_sleep)
            over = [g for g in gpus if not g["fits"]]
            problems = ([f"{len(over)} GPU(s) over {gpu_memory_gib:g} GiB: " + ", ".join(
                f"GPU {g['gpu']} ~{g['used_gib']:.1f} GiB ({' + '.join(a.split(' ')[0] for a in g['actors'])})" for g in over)]
                if over else [])
            if (rp := _rollout_problem(roles)):
                problems.append(rp)
            out.update(gpus=gpus, fits=not problems, problems=problems)
    else:
        out["host_gib_all_actors"] = sum(a["gib"] for a in actors)
    return out


def _layouts(rl, model_cfg, s: LlamaShape, scores: dict[str, ScoreShape], gpu_memory_gib: float | None,
             planned: dict) -> dict[str, dict]:
    """Both layouts of the round side by side: processes, GPUs, memory (the fullest GPU's on GPU,
    all actors' on CPU) and whether they fit. planned: the config's own layout's round plan."""
    out = {}
    for layout in ("split", "colocated"):
        r = planned if layout == rl.layout else _plan_round(rl.model_copy(update={"layout": layout}), model_cfg, s,
                                                            scores, gpu_memory_gib)
        gib = max(g["used_gib"] for g in r["gpus"]) if r["gpus"] else r.get("host_gib_all_actors")
        out[layout] = {"processes": len(r["actors"]), "total_gpus": r["total_gpus"], "gib": gib, "fits": r["fits"],
                       "memory": "fullest GPU" if r["gpus"] else ("all actors, host" if rl.device == "cpu" else None)}
    return out


def _learner_hint(rl, model_cfg, s: LlamaShape, scores: dict[str, ScoreShape], gpu_memory_gib: float) -> str | None:
    """The fewest learners_per_role (ZeRO-3 when the config's stage does not shard) that fits."""
    zero = rl.zero_stage if rl.zero_stage >= 1 else 3
    for n in range(1, 65):
        trial = rl.model_copy(update={"learners_per_role": n, "zero_stage": zero})
        roles = round_roles(trial, model_cfg, s, scores, gpu_memory_gib)
        actors = _round_actors(trial, roles)
        if all(g["fits"] for g in gpu_layout(actors, roles, gpu_memory_gib, rl.rollout_sleep) if g["kind"] == "learner"):
            stage = "" if zero == rl.zero_stage else f"zero_stage {zero} and "
            return (f"learners' model state fits with {stage}learners_per_role >= {n} "
                    f"({n * len(learner_roles(rl.algorithm))} learner GPUs)")
    return None


PROBE_PAIRS = 32  # a linear probe's feature batch (stages/common/linear_probe._features)
FIT_SECTIONS = (("sft", "sft", "causal LM"), ("fit_reward", "reward", "score model"), ("fit_cost", "cost", "score model"))


def _plan_fit(stage: str, section: str, tc, kind: str, s: LlamaShape, scores: dict[str, ScoreShape], model_cfg,
              gpu_memory_gib: float | None) -> dict:
    """s: the policy's shape (SFT's model); a score model's fit: its own (`scores[section]`)."""
    s, params = (s, llama_params(s)) if kind == "causal LM" else (scores[section].shape, scores[section].params)
    cuda = tc.device == "cuda"
    # a score model's fit may encode longer pairs than the model's limits (its max_prompt_tokens, max_answer_tokens)
    tokens = ((getattr(tc, "max_prompt_tokens", None) or model_cfg.max_prompt_tokens)
              + (getattr(tc, "max_answer_tokens", None) or model_cfg.max_answer_tokens) + 1)
    # SFT: one sequence per example, the loss over every token's logits (transformers' own); a
    # preference fit scores both answers of each pair.
    seqs = tc.per_device_batch_size * (1 if kind == "causal LM" else 2)
    probe = kind != "causal LM" and not getattr(tc, "train_backbone", True)
    if probe:  # stages/common/linear_probe.py: the frozen backbone's forward over batches of 32 pairs, no optimizer
        mem = with_working_memory(weights_only(params, tc.precision), forward_gib(s, tokens, 2 * PROBE_PAIRS, tc.precision),
                                  cuda=cuda)
    else:
        act = activation_gib(s, tokens, seqs, tc.precision, tc.gradient_checkpointing)
        logits = logits_gib(seqs * tokens, s.vocab_size, None, train=True) if kind == "causal LM" else 0.0
        mem = with_working_memory(training_memory(params, tc.precision, tc.zero_stage, tc.num_workers), act, logits, cuda)
    fit = {"stage": stage, "section": section, "workers": tc.num_workers, "device": tc.device,
           "precision": tc.precision, "zero_stage": tc.zero_stage, "model": kind + (" (linear probe)" if probe else ""),
           "cpus": tc.num_workers * tc.cpus_per_worker, "gpus": tc.num_workers if cuda else 0,
           "memory_per_worker": mem, "fits": None}
    if cuda and gpu_memory_gib:
        fit["fits"] = mem["total_gib"] <= gpu_memory_gib
        if not fit["fits"] and probe:
            fit["hint"] = "the frozen backbone and one batch's forward do not fit: a smaller backbone"
        elif not fit["fits"]:
            zero = tc.zero_stage if tc.zero_stage >= 1 else 3
            extra = mem["total_gib"] - training_memory(params, tc.precision, tc.zero_stage, tc.num_workers)["total_gib"]
            n = next((n for n in range(1, 257)
                      if training_memory(params, tc.precision, zero, n)["total_gib"] + extra <= gpu_memory_gib), None)
            fit["hint"] = (f"fits with zero_stage {zero} and num_workers >= {n}" if n else
                           "the working memory alone does not fit: turn on gradient_checkpointing or lower per_device_batch_size")
    return fit


# ---------------------------------------------------------------------------- the plan
def _notes(rl, s, lm: int) -> list[str]:
    """What the estimate includes and leaves out, for this round's settings."""
    notes = [
        "estimated on top of model state: activations kept for backward (34 x tokens x batch x hidden bytes per layer "
        "in 16 bits; with gradient_checkpointing the layer inputs plus one layer), log-probability logits, one layer of "
        "a scorer's forward, 1 GiB CUDA context per GPU process",
        "left out: vLLM's profiling peak and CUDA graphs (inside gpu_memory_utilization), DeepSpeed buckets and ZeRO-3 "
        "prefetched layers, allocator fragmentation",
        f"left out: host memory: Ray object store, data, and the state dict gathered on the rank-0 host at each export"
        f"{' and weight sync' if rl.weight_sync == 'checkpoint' else ''} "
        f"(~{lm * WEIGHT_BYTES[rl.precision] / GIB:.3g} GiB for the policy in {rl.precision})",
    ]
    if rl.weight_sync == "nccl":
        notes.append("left out: weight_sync nccl allocates 2 x 1 GiB packed transfer buffers on policy rank 0's GPU and on "
                     "every vLLM GPU for the length of each sync, outside gpu_memory_utilization")
    if rl.rollout_sleep:
        notes.append("rollout_sleep: policy learner i and rollout worker i share one GPU, and the engine frees its weights "
                     "and KV cache while the learner scores and learns: the GPU holds the larger of (the engine, beside the "
                     "learner's model state) and the whole learner, plus the CUDA context and buffers vLLM keeps asleep "
                     "(not estimated); keep gpu_memory_utilization within what the learner's model state leaves")
    elif rl.weight_sync == "ipc":
        notes.append("weight_sync ipc: policy learner i and rollout worker i share one GPU, both resident (its figure is "
                     "their sum; keep gpu_memory_utilization low enough for the learner)")
    if rl.device == "cuda" and rl.engine == "vllm" and rl.tensor_parallel_size > s.num_kv_heads:
        notes.append("vLLM replicates KV heads when tensor_parallel_size > KV heads: the KV figure is a lower bound")
    return notes


def _verdict(fits: list[dict], rnd: dict, any_cuda: bool, gpu_memory_gib: float | None) -> str:
    """The plan's one-line answer: does the run fit, and if not, what does not."""
    problems = [f"{f['stage']}: ~{f['memory_per_worker']['total_gib']:.1f} GiB per worker of {gpu_memory_gib:g}"
                + (f" ({f['hint']})" if f.get("hint") else "") for f in fits if f["fits"] is False]
    problems += [f"safe_rlhf: {p}" for p in rnd["problems"]]
    if rnd.get("hint"):
        problems.append(f"safe_rlhf: {rnd['hint']}")
    if not any_cuda:
        return ("CPU run: no GPU check" + (" (gpu_memory_gib ignored)" if gpu_memory_gib else "")
                + f"; the round's actors hold ~{rnd['host_gib_all_actors']:.3g} GiB of model state in host memory (estimate)")
    if not gpu_memory_gib:
        return "no GPU memory given: pass the GPU size (GiB) for a per-GPU check"
    if problems:
        return f"does NOT fit on {gpu_memory_gib:g} GiB GPUs (estimate): " + "; ".join(problems)
    tight = [f["memory_per_worker"]["total_gib"] for f in fits if f["fits"]] + [g["used_gib"] for g in (rnd["gpus"] or [])]
    return (f"fits on {gpu_memory_gib:g} GiB GPUs (estimate): the fullest GPU holds ~{max(tight):.1f} GiB "
            f"(model state, activations, logits, CUDA context), leaving ~{gpu_memory_gib - max(tight):.1f} GiB "
            "for buffers and fragmentation, which are not estimated")


def plan(cfg: "RunConfig", gpu_memory_gib: float | None = None) -> dict:
    """cfg: pipeline.config.RunConfig. Raises ValueError when the model's size cannot be known."""
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise ValueError(f"gpu_memory_gib must be positive, got {gpu_memory_gib}")
    s, source = model_shape(cfg.model)
    lm, score = llama_params(s), score_model_params(s)
    scores = {role: score_shape(getattr(cfg, role).backbone, s) for role in ("reward", "cost")}
    fits = [_plan_fit(stage, sec, getattr(cfg, sec), kind, s, scores, cfg.model, gpu_memory_gib)
            for stage, sec, kind in FIT_SECTIONS]
    rl = cfg.safe_rlhf
    rnd = _plan_round(rl, cfg.model, s, scores, gpu_memory_gib)
    rnd["start_ahead_from_cpus"] = cpus_to_start_ahead(cfg) if rnd["keep_actors"] else None
    rnd["layouts"] = _layouts(rl, cfg.model, s, scores, gpu_memory_gib, rnd)
    if rnd["fits"] is False and any(not g["fits"] for g in rnd["gpus"] if g["kind"] == "learner"):
        rnd["hint"] = _learner_hint(rl, cfg.model, s, scores, gpu_memory_gib)
    if rnd["fits"] is False and rl.layout == "split" and rnd["layouts"]["colocated"]["fits"]:
        rnd["hint"] = "safe_rlhf.layout: colocated fits (the scorers run inside the learners' processes, on their GPUs)"

    any_cuda = rl.device == "cuda" or any(f["device"] == "cuda" for f in fits)
    notes = _notes(rl, s, lm)
    verdict = _verdict(fits, rnd, any_cuda, gpu_memory_gib)
    return {
        "name": cfg.name, "gpu_memory_gib": gpu_memory_gib,
        "model": {"path": cfg.model.path, "source": source, "shape": asdict(s),
                  "causal_lm_params": lm, "score_model_params": score,
                  "score_models": {role: {"params": sc.params, "source": sc.source, "critic_from_it": sc.critic_from_it}
                                   for role, sc in scores.items()}},
        "fits": fits, "round": rnd, "verdict": verdict, "notes": notes,
        "accounting": {"bytes_per_param": {p: {"weights": WEIGHT_BYTES[p], "gradients": WEIGHT_BYTES[p],
                                               "optimizer": OPTIMIZER_BYTES[p]} for p in WEIGHT_BYTES},
                       "zero": "stage>=1 shards optimizer state, >=2 gradients, 3 weights over the data-parallel ranks"},
    }


# ---------------------------------------------------------------------------- text
