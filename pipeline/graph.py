"""The stage graph: which stages a config runs, in which order, and what each depends on.

A stage's fingerprint covers the config sections it reads (`config_keys`), the hashes of its
upstream stages' outputs and of any external files it reads. A changed config section or
input changes the fingerprint, so the stage re-runs and, through the output hashes, so does
everything after it that its new outputs change.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.objectives import get_algorithm
from core.schema import in_fingerprint
from pipeline.config import RunConfig
from stages.safe_rlhf.settings import SafeRLHFConfig


@dataclass(frozen=True)
class StageSpec:
    name: str  # "world", "fit_reward@2", ...
    module: str  # "module" (its `run`) or "module:function", imported only when the stage runs
    deps: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()  # dotted config sections the stage reads
    external_inputs: Callable[[RunConfig], list[Path]] = field(default=lambda cfg: [])
    needs_ray: bool = False
    params: tuple[tuple[str, object], ...] = ()  # e.g. (("round", 2),), passed to the stage
    # "module:function" (cfg, params, actor pool, log) -> names: starts the stage's actors ahead, with
    # no models, while the stages it needs run (cluster/pool.py); None: the stage starts its own.
    prestart: str | None = None
    # The CPUs the stage holds for its whole run (a Ray Train fit's workers); on a local cluster the
    # driver starts it only when they are free, instead of letting Ray Train time out waiting.
    cpus: Callable[[RunConfig], float] = field(default=lambda cfg: 0.0)
    # Fields of config_keys' sections the stage does not read (section.field): left out of its fingerprint.
    config_skip: tuple[str, ...] = ()

    @property
    def base_name(self) -> str:
        from core.stage_names import base_name

        return base_name(self.name)

    def load(self):
        return _function(self.module, "run")

    def load_prestart(self):
        return _function(self.prestart, None)


def _function(ref: str, default: str | None):
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(module), fn or default)


# Model actors outside the rounds (SFT's check, red teaming, judge annotation, evaluation) run with
# the round's device and precision.
ACTOR_KEYS = ("safe_rlhf.device", "safe_rlhf.precision")
FIT_KEYS = ("seed", "model.path", "model.max_prompt_tokens", "model.max_answer_tokens")


def _fits(k: int) -> tuple[str, str]:
    """The reward and cost fits round k reads."""
    return ("fit_reward", "fit_cost") if k == 1 else (f"fit_reward@{k}", f"fit_cost@{k}")


def _fit_cpus(section: str) -> Callable[[RunConfig], float]:
    """A fit stage's `cpus`: what its config section's Ray Train run reserves."""
    return lambda cfg: getattr(cfg, section).reserved_cpus


def _round_stage(cfg: RunConfig, name: str, k: int, before: tuple, prev: tuple, params: tuple = ()) -> StageSpec:
    """Round k (or a baseline of round 1: params algorithm). before: the world, SFT and ingest stages
    it reads. Round k reads the shared PPO settings (not the operational ones) and its own row of the
    round table (editing round 3's threshold does not re-run round 1)."""
    alg = get_algorithm(dict(params).get("algorithm", cfg.safe_rlhf.algorithm))
    reward_fit, cost_fit = _fits(k)
    deps = before + (reward_fit,) + ((cost_fit,) if alg.uses_cost_model else ())
    # A field marked `added` (core/schema.py) counts only off its default, group_size and group_scale
    # only where the algorithm samples in groups, constraints only where a round keeps per-category
    # ones (baselines never do): a round made before a setting existed keeps its fingerprint.
    per_category = cfg.safe_rlhf.constraints == "per_category" and not params
    keys = tuple(f"safe_rlhf.{f}" for f, info in SafeRLHFConfig.model_fields.items()
                 if f != "rounds" and in_fingerprint(info, getattr(cfg.safe_rlhf, f))
                 and (alg.group_sampling or f not in ("group_size", "group_scale"))
                 and (per_category or f != "constraints"))
    return StageSpec(name, "stages.safe_rlhf.round", deps + prev, ("seed", "model.path", "model.max_prompt_tokens")
                     + keys + (f"safe_rlhf.rounds.{k - 1}",), needs_ray=True, params=(("round", k),) + params,
                     prestart=None if params else "stages.safe_rlhf.roles:prestart")  # baselines keep no actors


def _between_rounds(cfg: RunConfig, k: int, world: tuple, sft: tuple) -> list[StageSpec]:
    """After round k, before round k+1: red_team@k -> annotate@k -> ingest@k -> fit_reward@k+1 and
    fit_cost@k+1 on all data so far."""
    engine_keys = ("safe_rlhf.engine", "safe_rlhf.max_new_tokens", "safe_rlhf.temperature", "model.max_prompt_tokens") + ACTOR_KEYS
    # the evaluation files too: their prompts are left out of the red-team pool
    training = ("ingest",) if cfg.red_team.prompt_source == "training_prompts" else ()
    judge = _fits(k) if cfg.annotate.backend == "judge" else ()
    ingest = f"ingest@{k}"
    return [
        StageSpec(f"red_team@{k}", "stages.red_team", world + training + (f"safe_rlhf@{k}",),
                  ("seed", "red_team", "ingest.eval_fraction", "evaluate.prompt_files", "evaluate.prompt_sets") + engine_keys,
                  needs_ray=True, params=(("round", k),),
                  external_inputs=lambda c: [Path(p) for p in c.red_team.prompt_files + c.evaluate.files]),
        StageSpec(f"annotate@{k}", "stages.annotate", world + (f"red_team@{k}",) + judge,
                  ("seed", "annotate", "model.max_prompt_tokens", "model.max_answer_tokens") + ACTOR_KEYS,
                  needs_ray=cfg.annotate.backend == "judge", params=(("round", k),)),
        StageSpec(ingest, "stages.ingest", world + tuple(f"annotate@{j}" for j in range(1, k + 1)), ("ingest",),
                  external_inputs=lambda c: [Path(s.path) for s in c.ingest.sources]),
        *(StageSpec(name, f"stages.fit_preference:{fn}", (ingest,) + sft + (f"red_team@{k}",) + _warm_from(cfg, keys, k, i),
                    FIT_KEYS + (keys,), needs_ray=True, cpus=_fit_cpus(keys))
          for i, name, fn, keys in ((0, _fits(k + 1)[0], "run_reward", "reward"), (1, _fits(k + 1)[1], "run_cost", "cost"))),
    ]


def _warm_from(cfg: RunConfig, section: str, k: int, which: int) -> tuple[str, ...]:
    """What a warm refit after round k reads beyond a fit from scratch: the last fit (its model)
    and the ingest that fit trained on (which pairs are new)."""
    if getattr(cfg, section).refit != "warm":
        return ()
    return (_fits(k)[which], "ingest" if k == 1 else f"ingest@{k - 1}")


# The first fits do not read how later ones refit: switching refit leaves them done.
REFIT_FIELDS = ("refit", "refit_replay", "refit_lr")


def build_graph(cfg: RunConfig) -> list[StageSpec]:
    """The stages of a run, in execution order (each after all of its deps)."""
    stages: list[StageSpec] = []
    world = ("world",) if cfg.world.enabled else ()
    if cfg.world.enabled:
        stages.append(StageSpec("world", "stages.world", (),
                                ("seed", "world", "model.path", "model.small", "ingest.eval_fraction")))
    stages.append(StageSpec(
        "ingest", "stages.ingest", world, ("ingest",),
        external_inputs=lambda c: [Path(s.path) for s in c.ingest.sources]))
    if cfg.world.enabled:
        # SFT needs demonstrations; with world disabled, model.path is taken to be an SFT model.
        stages.append(StageSpec("sft", "stages.sft", ("world",),
                                ("seed", "sft", "model.max_prompt_tokens", "model.max_answer_tokens",
                                 "safe_rlhf.max_new_tokens") + ACTOR_KEYS, needs_ray=True))
    sft = ("sft",) if cfg.world.enabled else ()
    for kind in ("reward", "cost"):
        stages.append(StageSpec(f"fit_{kind}", f"stages.fit_preference:run_{kind}", ("ingest",) + sft, FIT_KEYS + (kind,),
                                needs_ray=True, cpus=_fit_cpus(kind), config_skip=tuple(f"{kind}.{f}" for f in REFIT_FIELDS)))
    n_rounds = len(cfg.safe_rlhf.rounds)
    for k in range(1, n_rounds + 1):
        # the first ingest too: its held-out labelled answers are threshold auto's fixed reference set
        before = world + sft + tuple(dict.fromkeys(("ingest", "ingest" if k == 1 else f"ingest@{k - 1}")))
        stages.append(_round_stage(cfg, f"safe_rlhf@{k}", k, before, (f"safe_rlhf@{k - 1}",) if k > 1 else ()))
        if k == 1 and cfg.evaluate.baselines:
            stages += [_round_stage(cfg, f"baseline_{alg}", 1, before, (), (("algorithm", alg),)) for alg in ("ppo", "reward_shaping")]
        if k < n_rounds:
            stages += _between_rounds(cfg, k, world, sft)
    ingest, fits = ("ingest", _fits(1)) if n_rounds == 1 else (f"ingest@{n_rounds - 1}", _fits(n_rounds))
    evaluated = tuple(s.name for s in stages if s.base_name in ("safe_rlhf", "baseline_ppo", "baseline_reward_shaping"))
    stages.append(StageSpec("evaluate", "stages.evaluate", world + sft + evaluated + fits + (ingest,),
                            ("seed", "evaluate", "model.path", "model.max_prompt_tokens", "model.max_answer_tokens",
                             "safe_rlhf.engine", "safe_rlhf.max_num_seqs", "safe_rlhf.tensor_parallel_size",
                             "safe_rlhf.temperature") + ACTOR_KEYS,
                            needs_ray=True, external_inputs=lambda c: [Path(p) for p in c.evaluate.files]))
    stages.append(StageSpec("report", "stages.report", ("evaluate",) + evaluated + tuple(
        s.name for s in stages if s.base_name in ("fit_reward", "fit_cost")), ()))
    return stages


def stage_names(cfg: RunConfig) -> list[str]:
    return [s.name for s in build_graph(cfg)]


def downstream_of(graph: list[StageSpec], name: str) -> list[str]:
    """`name` and every stage that depends on it, directly or not, in graph order."""
    hit = {name}
    for s in graph:
        if any(d in hit for d in s.deps):
            hit.add(s.name)
    return [s.name for s in graph if s.name in hit]
