"""Actors kept alive between a driver's stages (`safe_rlhf.keep_actors`).

On a CPU machine most of a round's start-up is its seven processes importing torch, transformers,
DeepSpeed and vLLM (about 45 CPU-seconds on 2 cores; the models themselves load in well under a
second). With a pool, a stage that is done with its actors parks them here instead of killing them,
and the next stage that asks for an actor of the same name borrows the parked one and loads its
own model into it (`reset`): round 2 takes round 1's `rollout-0`, `scorer-reward-0`,
`learner-policy-0`, ..., red teaming takes `rollout-0`, evaluation the scorers.

- An actor is reused only when its class says the new arguments fit the running process
  (`reuse_key`: a vLLM engine's settings, a learner's rank and process group) and it was created
  with the restart budget the borrower asks for (max_restarts) and has spent none of it (Ray
  counts restarts over an actor's life, not per stage); a parked actor that does not fit is
  killed and a fresh one takes its name.
- What a stage hands back after a failure is killed, not parked: after a fault the next stage
  starts fresh processes, as without the pool.
- Kept actors reserve no resources (num_cpus 0; their torch threads are set from the CPUs the
  stage asks for): a round's placement group still reserves the round's CPUs while it runs, so
  which stages Ray admits beside a round does not change; red teaming, annotation and evaluation,
  which run alone, borrow without reserving. That is also why the pool is off on GPUs: a parked
  actor would hold its GPU, which the fits between the rounds need.
- Baseline rounds do not park their actors: nothing after them has their names.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable


class ActorPool:
    def __init__(self):
        self._parked: dict[str, tuple[tuple, Any]] = {}  # name -> (reuse key, handle)
        self._lent: dict[str, tuple[tuple, Any]] = {}
        self._lock = threading.Lock()
        self.created = self.reused = 0  # over the driver's life (the round logs its own share)

    def lend(self, name: str, key: tuple, create: Callable[[], Any]) -> tuple[Any, bool]:
        """The parked actor `name` when its key equals `key` (-> (handle, True): the caller resets it
        with its own arguments), else a new one from `create()`, which names it `name` (-> (handle, False)).
        The key holds what `reuse_key` gives and the actor's max_restarts."""
        return self.lend_group([(name, key, create)])[0]

    def lend_group(self, items: list[tuple[str, tuple, Callable[[], Any]]]) -> list[tuple[Any, bool]]:
        """lend() for actors that only work together (the ranks of one learner group share a process
        group): all parked ones reused, or all new."""
        with self._lock:
            taken = [n for n, _, _ in items if n in self._lent]
            if taken:
                raise RuntimeError(f"actors {taken} are lent to another stage; stages that run side by side need "
                                   "actors of their own names (an actor prefix)")
            parked = [self._parked.pop(n, None) for n, _, _ in items]
        reuse = all(p is not None and p[0] == key for p, (_, key, _) in zip(parked, items))
        reuse = reuse and all([_usable(p[1]) for p in parked])  # every one checked (a dead one is killed)
        if reuse:
            out = [(p[1], True) for p in parked]
        else:
            for p, (name, _, _) in zip(parked, items):
                if p is not None:
                    _kill_and_wait(name, p[1])
            out = []
            try:
                for _, _, create in items:
                    out.append((create(), False))
            except BaseException:
                import ray

                for handle, _ in out:  # a group is all or nothing
                    ray.kill(handle)
                raise
        with self._lock:
            for (handle, reused), (name, key, _) in zip(out, items):
                self._lent[name] = (key, handle)
                self.reused += reused
                self.created += not reused
        return out

    def borrow(self, cls, members: list[tuple[str, tuple, dict]], cpus: float, max_restarts: int,
               env: dict[str, str]) -> list[tuple[Any, Any]]:
        """Actors of role class `cls` for [(name, args, kwargs)], lent as a group: -> [(handle, ref of
        its `reset` with the args, or None for a new one)]. A new one is made as every kept actor is:
        no CPUs reserved, `cpus` worth of torch threads, `max_restarts` (in the key with `reuse_key`)."""
        import math

        import ray

        env = {"OMP_NUM_THREADS": str(max(1, math.floor(cpus))), **env}  # num_cpus 0 would give one thread

        def creator(name, args, kwargs):
            return lambda: ray.remote(cls).options(name=name, num_cpus=0, max_restarts=max_restarts, max_concurrency=1,
                                                   runtime_env={"env_vars": env}).remote(*args, **kwargs)

        lent = self.lend_group([(n, (*cls.reuse_key(*a, **kw), ("max_restarts", max_restarts)), creator(n, a, kw))
                                for n, a, kw in members])
        # a reset runs before the borrower's later calls (Ray keeps one caller's calls in order)
        return [(h, h.reset.remote(*a, **kw) if reused else None) for (h, reused), (_, a, kw) in zip(lent, members)]

    def give_back(self, name: str, keep: bool = True) -> None:
        """Park a lent actor (keep) or kill it (after a failure: its state is unknown)."""
        with self._lock:
            entry = self._lent.pop(name, None)
            if entry is not None and keep:
                self._parked[name] = entry
        if entry is not None and not keep:
            import ray

            ray.kill(entry[1])

    def parked(self) -> list[str]:
        with self._lock:
            return sorted(self._parked)

    def close(self) -> None:
        """Kill every parked and lent actor (the driver's end)."""
        import ray

        with self._lock:
            entries = list(self._parked.values()) + list(self._lent.values())
            self._parked.clear()
            self._lent.clear()
        for _, handle in entries:
            ray.kill(handle)


def restarted_by_ray() -> bool:
    """Whether this process is a Ray actor that Ray has restarted (False outside Ray)."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        return False
    import warnings

    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray's own property reads a deprecated one of Ray's
        warnings.simplefilter("ignore")
        return bool(ctx.was_current_actor_reconstructed)


def ever_restarted(obj) -> bool:
    """For `handle.__ray_call__`: whether Ray has ever restarted this actor (its restart budget is
    partly spent, whatever has been loaded into it since)."""
    return restarted_by_ray()


def _usable(handle, timeout_s: float = 30.0) -> bool:
    """Whether a parked actor answers and has never been restarted by Ray. One killed while parked
    (the OOM killer) is dead, or was restarted by Ray: it would come with part of its restart budget
    spent. Either way it is not lent again (a dead one is killed for good)."""
    import ray

    try:
        if not ray.get(handle.__ray_call__.remote(ever_restarted), timeout=timeout_s):
            return True
    except Exception:  # noqa: BLE001 - RayActorError, GetTimeoutError: not usable
        pass
    ray.kill(handle)
    return False


def _kill_and_wait(name: str, handle, timeout_s: float = 30.0) -> None:
    """Kill a parked actor and wait until Ray has released its name for the next one."""
    import ray

    ray.kill(handle)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.2)
