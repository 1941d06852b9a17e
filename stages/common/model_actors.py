"""Model actors, made one way: the environment (`actor_env`) and the Ray options (`actor_options`:
`safe_rlhf.cpus_per_actor` CPUs, on `safe_rlhf.device: cuda` the GPUs its engine needs, the
threads) of every actor that holds a model, whoever starts it: the round (its launcher), the stages
that generate or score outside a round (SFT's check, red teaming, judge annotation, evaluation:
`rollout_actor`, `scorer_actors`), a sweep trial's judge (`judge_actors`, in the bundles its round
has freed) and Serve's deployments. Built with the round's device and precision; the driver only
orchestrates and reads back small results (texts, scores).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a shared helper; the round's settings type only annotates it
    from stages.safe_rlhf.settings import SafeRLHFConfig

# Model actors' environment: no per-load progress bars, vLLM's repeated per-reload warnings once
# each (actors/vllm_logs.py), one tokenizer thread (Ray runs several actors per core here). vLLM's
# CPU KV cache is sized per engine (safe_rlhf.cpu_kv_cache_gib), not by VLLM_CPU_KVCACHE_SPACE.
ACTOR_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error", "SAFE_RLHF_VLLM_WARNINGS_ONCE": "1"}


def actor_env(rl: SafeRLHFConfig) -> dict[str, str]:
    """The environment of every actor that holds a model (a round's, evaluation's, the sweep's judge,
    Serve's deployments): ACTOR_ENV, DeepSpeed's accelerator for the configured device, and the
    threads `threads_per_actor` asks for (else Ray sets OMP_NUM_THREADS from the actor's CPUs)."""
    threads = {} if rl.threads_per_actor is None else {"OMP_NUM_THREADS": str(rl.threads_per_actor)}
    return {**ACTOR_ENV, "DS_ACCELERATOR": rl.device, **threads}


def engine_max_model_len(max_prompt_tokens: int, max_new_tokens: int) -> int:
    """vLLM's max_model_len for prompts cut to max_prompt_tokens: 8 tokens of room beyond prompt + answer."""
    return max_prompt_tokens + max_new_tokens + 8


def engine_settings(cfg, engine: str, max_new_tokens: int, weight_sync: str = "checkpoint", sleep_mode: bool = False) -> dict:
    """RolloutWorker keyword arguments from the config (the round, red teaming and evaluation).
    sleep_mode: the round's engine under safe_rlhf.rollout_sleep."""
    rl = cfg.safe_rlhf
    kw = {"device": rl.device, "dtype": rl.precision, "max_prompt_tokens": cfg.model.max_prompt_tokens}
    if engine == "vllm":
        kw.update(max_model_len=engine_max_model_len(cfg.model.max_prompt_tokens, max_new_tokens), max_num_seqs=rl.max_num_seqs,
                  tensor_parallel_size=rl.tensor_parallel_size, gpu_memory_utilization=rl.gpu_memory_utilization,
                  cpu_kv_cache_gib=rl.cpu_kv_cache_gib, seed=cfg.seed, weight_sync=weight_sync,
                  **({"sleep_mode": True} if sleep_mode else {}))
    return kw


def actor_options(rl: SafeRLHFConfig, name: str | None = None, gpus: float = 1) -> dict:
    """Ray options of a model actor outside a round's placement group (stages' actors, Serve's
    deployments): its CPUs, `gpus` on device cuda (none on cpu), actor_env. name: Ray's actor name."""
    options = {"num_cpus": rl.cpus_per_actor, "num_gpus": gpus if rl.device == "cuda" else 0,
               "runtime_env": {"env_vars": actor_env(rl)}}
    return {"name": name, **options} if name else options


def _lend(cfg, pool, name: str, cls, args: tuple, kwargs: dict, options: dict):
    """(actor, reset ref or None): from the driver's actor pool when there is one (the name is the
    round's, e.g. rollout-0: a kept actor loads this stage's model with `reset`), else a new one.
    A new one made for the pool is made as the round makes its own (the same restart budget and
    threads), so that the next round can take it."""
    import ray

    if pool is None:
        return ray.remote(cls).options(**options).remote(*args, **kwargs), None
    rl = cfg.safe_rlhf
    return pool.borrow(cls, [(name, args, kwargs)], rl.cpus_per_actor, rl.max_actor_restarts,
                       options["runtime_env"]["env_vars"])[0]


@contextmanager
def rollout_actor(cfg, model_dir: str | Path, name: str, engine: str, max_new_tokens: int, wait: bool = True, pool=None):
    """A RolloutWorker actor for `model_dir`, killed on exit. wait: until it is up (False: its
    first call waits, e.g. so that other actors start beside it). pool: the driver's actor pool
    (safe_rlhf.keep_actors): the round's rollout-0 is borrowed and parked again on exit, unless
    the stage failed."""
    import ray

    from actors.rollout import RolloutWorker

    rl = cfg.safe_rlhf
    tp = rl.tensor_parallel_size if engine == "vllm" else 1
    gpus = 1 if tp == 1 else 0  # tensor parallel: vLLM's own Ray workers take the GPUs, in a placement group of its own
    pooled = "rollout-0" if pool is not None else None
    # Borrowed, it is the round's rollout-0 as the round makes it (its weight transfer and sleep mode,
    # which any engine's reload from a directory works beside): else the pool would replace the
    # round's engine with a new one here, and the next round this one with a new one again.
    settings = (engine_settings(cfg, engine, max_new_tokens, weight_sync=rl.weight_sync, sleep_mode=rl.rollout_sleep)
                if pooled else engine_settings(cfg, engine, max_new_tokens))
    actor, reset = _lend(cfg, pool, pooled, RolloutWorker, (engine, str(model_dir)), settings, actor_options(rl, name, gpus))
    ok = False
    try:
        if reset is not None:
            ray.get(reset)  # a model that does not load fails here, not silently
        if wait:
            ray.get(actor.ready.remote())
        yield actor
        ok = True
    finally:
        if pool is not None:
            pool.give_back(pooled, keep=ok)
        else:
            ray.kill(actor)


def scorer_kwargs(cfg, role: str) -> dict:
    """Scorer keyword arguments from the config: the safety judge's unsafe label."""
    return {"unsafe_label": cfg.evaluate.unsafe_label} if role == "safety" else {}


@contextmanager
def scorer_actors(cfg, models: dict[str, str | Path], prefix: str, wait: bool = True, pool=None):
    """{role: Scorer actor} for {role: model directory} (roles reward, cost), killed on exit.
    wait: until they are up (False: their first calls wait). pool: as rollout_actor's (the
    round's scorer-<role>-0)."""
    import ray

    from actors.scorer import Scorer

    rl = cfg.safe_rlhf
    names = {role: f"scorer-{role}-0" if pool is not None else f"{prefix}-scorer-{role}" for role in models}
    lent, ok = {}, False
    try:
        for role, path in models.items():
            lent[role] = _lend(cfg, pool, names[role], Scorer, (role, str(path), rl.device, rl.precision),
                               scorer_kwargs(cfg, role), actor_options(rl, names[role]))
        actors = {role: a for role, (a, _) in lent.items()}
        ray.get([r for _, r in lent.values() if r is not None])
        if wait:
            ray.get([a.ready.remote() for a in actors.values()])
        yield actors
        ok = True
    finally:
        for role, (a, _) in lent.items():
            if pool is not None:
                pool.give_back(names[role], keep=ok)
            else:
                ray.kill(a)


@contextmanager
def judge_actors(cfg, plan, placement: tuple, prefix: str, name: str, policy_dir: str | Path, models: dict[str, str],
                 max_new_tokens: int):
    """(rollout worker, {role: scorer}) that judge a policy inside a finished round's placement
    (a sweep trial's, `placement` = (its placement group, first bundle of `plan`)): the rollout
    worker in rollout-0's bundle, the scorers in the scorers' and then the learners' bundles.
    Killed on exit. models: {role: model directory}; the engine is evaluate.engine."""
    from actors.rollout import RolloutWorker
    from actors.scorer import Scorer
    from cluster.launch import Launcher

    rl, engine = cfg.safe_rlhf, cfg.evaluate.engine
    slots = [a.name for a in plan.actors if a.name.startswith("scorer-")] + [a.name for a in plan.actors if a.name.startswith("learner-")]
    launcher = Launcher(plan, actor_env(rl), name=name, placement=placement, prefix=prefix)
    try:
        rollout = launcher.start(RolloutWorker, "judge-rollout", engine, str(policy_dir), slot="rollout-0",
                                 env=plan.worker_env("rollout-0", launcher.offset),
                                 **engine_settings(cfg, engine, max_new_tokens))
        scorers = {role: launcher.start(Scorer, f"judge-scorer-{role}", role, str(path), rl.device, rl.precision, slot=slot,
                                        **scorer_kwargs(cfg, role))
                   for (role, path), slot in zip(models.items(), slots)}
        yield rollout, scorers
    finally:
        launcher.shutdown()


def score_answers(cfg, scorers: dict, prompts: list[str], answers: list[str], contexts: list | None = None) -> dict[str, list[float]]:
    """{role: end score of each answer} from every scorer, dispatched together."""
    import ray

    refs = {role: s.score_texts.remote(prompts, answers, cfg.model.max_prompt_tokens, cfg.model.max_answer_tokens, contexts)
            for role, s in scorers.items()}
    return dict(zip(refs, ray.get(list(refs.values()))))
