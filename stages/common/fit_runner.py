"""Where a fit's worker loop runs (SFT, `fit_reward`, `fit_cost`): Ray Train, or a kept learner.

`runner: auto` (sft / reward / cost, the default) runs a one-worker fit in the learner that the
next round borrows, when the driver keeps actors (`safe_rlhf.keep_actors`, on with device cpu):
SFT in `learner-policy-0`, the reward model in `learner-reward_critic-0`, the cost model in
`learner-cost_critic-0`. The fit then starts no process of its own:

- Ray Train's controller and worker, and their imports, are about 25 s of every fit on 2 cores;
- the first round finds its learners up, their imports done while SFT and the fits ran;
- a refit after a round runs in the process the round's critic used, in memory the machine has
  already given it (docs/benchmarks.md: new processes beside kept ones were the slow refits here).

The loop is the same function with the same seeds and threads (`cluster.train.run_in_process`),
so it trains the same model. Its checkpoints are Ray Train's layout
(`ray_train/<name>/checkpoint_<time>`, the newest two), so a resumed fit goes on from the newest
whichever runner wrote it. A learner that dies during the fit (killed from outside, the OOM killer)
is replaced by a new process that goes on from the newest checkpoint, `max_failures` times, as Ray
Train's FailureConfig restarts a worker.

Ray Train runs the fit with `runner: ray_train`, with `num_workers` above 1, on a GPU (no kept
actors there), in a sweep's trials, and where the round has no learner of the fit's role (grpo_lag
has no critics).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

# The round's learner that hosts each fit
FIT_ROLES = {"sft": "policy", "reward": "reward_critic", "cost": "cost_critic"}
STOP_GRACE_S = 1.0  # after a learner's death, how long the driver has to record a Ctrl-C before the fit restarts


@dataclass(frozen=True)
class KeptLearner:
    """The round's learner a fit borrows, made as the round would make it (so the round reuses it)."""

    name: str  # learner-<role>-0
    args: tuple
    kwargs: dict
    cpus: float
    env: dict


def kept_learner(ctx, tc, fit: str) -> KeptLearner | None:
    """The learner the fit `fit` (sft, reward, cost) runs in, or None: Ray Train. Where the driver
    keeps actors and the fit cannot use one, it logs why."""
    cfg = ctx.cfg
    rl = cfg.safe_rlhf
    if tc.runner == "ray_train" or ctx.actor_pool is None or ctx.actor_prefix:
        return None  # asked for; no kept actors (keep_actors off, a GPU, several nodes); a sweep trial
    from stages.common.model_actors import actor_env
    from stages.safe_rlhf.resources import learner_roles, resource_plan
    from stages.safe_rlhf.roles import actor_arguments

    role = FIT_ROLES[fit]
    why = (f"{tc.num_workers} workers" if tc.num_workers != 1 else
           f"{rl.learners_per_role} learners per role" if rl.learners_per_role != 1 else
           f"the fit's device {tc.device} is not the round's {rl.device}" if tc.device != rl.device else
           f"{rl.algorithm} has no {role} learner" if role not in learner_roles(rl.algorithm) else "")
    if why:
        ctx.log(f"  on Ray Train, not in a kept learner: {why} (a kept learner is one rank of the round's)")
        return None
    name, args, kwargs = actor_arguments(cfg, rl, {})[2][role][0]  # with no model, as prestart makes it
    return KeptLearner(name, args, kwargs, resource_plan(rl).spec(name).cpus, actor_env(rl))


def describe(learner: KeptLearner | None, tc) -> str:
    """The start of a fit's log line: where it runs."""
    if learner is None:
        return f"Ray Train: {tc.num_workers} worker(s)"
    return f"in the kept learner {learner.name} (no Ray Train processes)"


def run_fit(ctx, learner: KeptLearner | None, loop: Callable[[dict], None], loop_config: dict, tc, name: str) -> None:
    """Run the fit's worker loop `loop(loop_config)` as run `name` with checkpoints under the stage's
    ray_train/ folder: on Ray Train (learner None) or in the kept learner, borrowed from the
    driver's pool and parked again for the round (killed instead when the fit fails)."""
    storage = ctx.out_dir / "ray_train"
    if learner is None:
        from cluster.train import run_trainer

        run_trainer(loop, loop_config, tc, storage, name)
        return
    import ray
    from ray.exceptions import RayActorError

    from actors.learner import Learner
    from cluster.pool import kill_and_wait
    from cluster.train import FAULT_ENV

    pool, threads = ctx.actor_pool, max(1, math.floor(tc.cpus_per_worker))
    for attempt in range(tc.max_failures + 1):
        [(actor, reset)] = pool.borrow(Learner, [(learner.name, learner.args, learner.kwargs)], learner.cpus, 0, learner.env)
        ok = False
        try:
            if reset is not None:
                ray.get(reset)
            ray.get(actor.run_fit.remote(loop, loop_config, str(storage), name, threads, os.environ.get(FAULT_ENV)))
            ok = True
            return
        except RayActorError as e:
            time.sleep(STOP_GRACE_S)  # Ctrl-C reaches the learner's process too: let the driver say it is stopping
            if attempt == tc.max_failures or ctx.stopping():
                raise
            ctx.log(f"  {learner.name} died during the fit ({type(e).__name__}); a new one goes on from the newest "
                    f"checkpoint (restart {attempt + 1} of max_failures {tc.max_failures})")
        finally:
            try:
                pool.give_back(learner.name, keep=ok)
                if not ok:
                    kill_and_wait(learner.name, actor)  # its name free for the next one
            except Exception:  # noqa: BLE001 - Ray already gone (Ctrl-C disconnects it): nothing left to kill
                if ok:
                    raise
