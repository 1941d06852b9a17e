"""What the driver hands a stage and what a stage hands back.

A stage is a function `run(ctx: StageContext) -> StageResult`. It reads its inputs only from
`ctx.inputs` (upstream stages' output paths) and writes only under `ctx.out_dir`. Long stages
checkpoint under `ctx.out_dir` too: when the driver resumes an interrupted stage with the same
fingerprint, that folder is left as it was.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stages.run_config import RunConfig

if TYPE_CHECKING:  # types only: importing them would start nothing, but costs Ray's import
    from ray.util.placement_group import PlacementGroup

    from cluster.pool import ActorPool


class StageWaiting(Exception):
    """Raised by a stage that needs something from a person (e.g. labelled files) to continue."""


@dataclass
class StageContext:
    name: str  # e.g. "fit_reward@2"
    cfg: RunConfig
    out_dir: Path
    inputs: dict[str, dict[str, Path]]  # upstream stage name -> output name -> path
    run_dir: Path
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"round": 2} for "safe_rlhf@2"
    # Latest figures of a running stage, shown by `status` while it runs.
    report: Callable[[dict], None] = field(default=lambda metrics: None)
    # (placement group, first bundle) to start a round's actors in, e.g. a Ray Tune trial's; None: their own.
    placement: tuple[PlacementGroup, int] | None = None
    # Starts the names of the stage's actors (a sweep trial's id: concurrent trials each have a rollout-0).
    actor_prefix: str = ""
    # The driver's cluster.pool.ActorPool (safe_rlhf.keep_actors): actors kept between stages; None: none.
    actor_pool: ActorPool | None = None
    # Whether the driver is stopping the run (Ctrl-C): an actor that dies now is not a fault to retry.
    stopping: Callable[[], bool] = field(default=lambda: False)

    def latest(self, base: str) -> str:
        """The newest input stage named `base` or `base@k` (e.g. ingest@2 over ingest)."""
        from core.stage_names import latest

        name = latest(self.inputs, base)
        if name is None:
            raise KeyError(f"stage {self.name} has no input stage named {base!r} among {sorted(self.inputs)}")
        return name

    def input(self, stage: str, output: str) -> Path:
        try:
            return self.inputs[stage][output]
        except KeyError:
            raise KeyError(f"stage {self.name} needs output {output!r} of stage {stage!r}, "
                           f"which is not among its inputs {sorted(self.inputs)}") from None


@dataclass
class StageResult:
    outputs: dict[str, str]  # output name -> path relative to the stage folder
    metrics: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Throttled progress lines for long loops: at most one every `every_s` seconds."""

    def __init__(self, log: Callable[[str], None], label: str, total: int | None = None, every_s: float = 10.0):
        self.log, self.label, self.total, self.every_s = log, label, total, every_s
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, **figures: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and (self.total is None or done < self.total):
            return
        self.last = now
        frac = f"{done}/{self.total}" if self.total else str(done)
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        self.log(f"{self.label} {frac} ({now - self.t0:.0f}s) {extra}".rstrip())
