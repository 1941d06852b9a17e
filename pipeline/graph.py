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

from pipeline.config import RunConfig


@dataclass(frozen=True)
class StageSpec:
    name: str  # "world", "fit_reward@2", ...
    module: str  # module with `run(ctx) -> StageResult`, imported only when the stage runs
    deps: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()  # dotted config sections the stage reads
    external_inputs: Callable[[RunConfig], list[Path]] = field(default=lambda cfg: [])
    needs_ray: bool = False
    params: tuple[tuple[str, object], ...] = ()  # e.g. (("round", 2),), passed to the stage

    @property
    def base_name(self) -> str:
        return self.name.split("@")[0]

    def load(self):
        return importlib.import_module(self.module).run


STAGE_NAMES = ("world", "ingest", "sft", "fit_reward", "fit_cost", "safe_rlhf", "red_team",
               "annotate", "evaluate", "report")


def build_graph(cfg: RunConfig) -> list[StageSpec]:
    """The stages of a run, in execution order (each after all of its deps)."""
    stages: list[StageSpec] = []
    if cfg.world.enabled:
        stages.append(StageSpec("world", "stages.world", (),
                                ("seed", "world", "model.path", "model.small", "ingest.eval_fraction")))
    stages.append(StageSpec(
        "ingest", "stages.ingest", ("world",) if cfg.world.enabled else (), ("ingest",),
        external_inputs=lambda c: [Path(s.path) for s in c.ingest.sources]))
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
