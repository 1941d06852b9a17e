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
- The first round's actors have no earlier stage to come from: the driver starts them ahead
  (`prestart`, with no model) once the stages the round needs are running (the reward and cost
  fits), so that their imports run meanwhile and round 1 only loads its models; only where the
  fits leave at least one CPU of the cluster unreserved. Where they fill it (2 cores, the default
  config) the imports would be the same CPU work done earlier, and the fits beside them took
  longer by more than round 1's start-up saved.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable


PARKED_ANSWER_S = 30.0  # a parked actor that does not answer within this is taken for hung (and replaced)


class ActorPool:
    def __init__(self):
        self._parked: dict[str, tuple[tuple, Any]] = {}  # name -> (reuse key, handle)
        self._lent: dict[str, tuple[tuple, Any]] = {}
        self._lock = threading.Lock()
        self._starting: set[str] = set()  # parked by `prestart`: may still be in their constructor
        self._lent_ahead: set[str] = set()  # lent, and started ahead by `prestart` (not kept from a stage)
        self.created = self.reused = self.prestarted = 0  # over the driver's life (the round logs its own share)

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
            starting = {n for n, _, _ in items} & self._starting
            self._starting -= starting
        reuse = all(p is not None and p[0] == key for p, (_, key, _) in zip(parked, items))
        # every one checked (a dead one is killed); one started ahead may still be importing: waited for
        reuse = reuse and all([_usable(p[1], None if n in starting else PARKED_ANSWER_S) for p, (n, _, _) in zip(parked, items)])
        if reuse:
            out = [(p[1], True) for p in parked]
        else:
            for p, (name, _, _) in zip(parked, items):
                if p is not None:
                    kill_and_wait(name, p[1])
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
                if reused and name in starting:
                    self._lent_ahead.add(name)
                self.reused += reused
                self.created += not reused
        return out

    def borrow(self, cls, members: list[tuple[str, tuple, dict]], cpus: float, max_restarts: int,
               env: dict[str, str]) -> list[tuple[Any, Any]]:
        """Actors of role class `cls` for [(name, args, kwargs)], lent as a group: -> [(handle, ref of
        its `reset` with the args, or None for a new one)]. A new one is made as every kept actor is:
        no CPUs reserved, `cpus` worth of torch threads, `max_restarts` (in the key with `reuse_key`).
        The environment is the first borrower's (or `prestart`'s): it is not in the key."""
        lent = self.lend_group([(n, _key(cls, a, kw, max_restarts), _creator(cls, n, a, kw, cpus, max_restarts, env))
                                for n, a, kw in members])
        # a reset runs before the borrower's later calls (Ray keeps one caller's calls in order)
        return [(h, h.reset.remote(*a, **kw) if reused else None) for (h, reused), (_, a, kw) in zip(lent, members)]

    def prestart(self, cls, members: list[tuple[str, tuple, dict]], cpus: float, max_restarts: int,
                 env: dict[str, str]) -> list[str]:
        """Start actors ahead of the stage that will borrow them, as `borrow` would make them, and
        park them at once: their processes import their libraries while the stages before run.
        The args are the borrower's with no model (model_dir None: the role class builds nothing;
        the borrower's `reset` loads its model). A group whose names are parked or lent already is
        left alone. -> the names started."""
        with self._lock:
            if any(n in self._parked or n in self._lent for n, _, _ in members):
                return []
        started = []
        try:
            for n, a, kw in members:
                started.append((n, _key(cls, a, kw, max_restarts), _creator(cls, n, a, kw, cpus, max_restarts, env)()))
        except BaseException:
            import ray

            for _, _, handle in started:  # a group is all or nothing
                ray.kill(handle)
            raise
        with self._lock:
            for name, key, handle in started:
                self._parked[name] = (key, handle)
                self._starting.add(name)
                self.prestarted += 1
        return [n for n, _, _ in started]

    def started_ahead(self, name: str) -> bool:
        """Whether the lent actor `name` was started ahead by `prestart` (else kept from a stage)."""
        with self._lock:
            return name in self._lent_ahead

    def give_back(self, name: str, keep: bool = True) -> None:
        """Park a lent actor (keep) or kill it (after a failure: its state is unknown)."""
        with self._lock:
            entry = self._lent.pop(name, None)
            self._lent_ahead.discard(name)
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
            self._starting.clear()
            self._lent_ahead.clear()
            self._lent.clear()
        for _, handle in entries:
            ray.kill(handle)


def _key(cls, args: tuple, kwargs: dict, max_restarts: int) -> tuple:
    return (*cls.reuse_key(*args, **kwargs), ("max_restarts", max_restarts))


def _creator(cls, name: str, args: tuple, kwargs: dict, cpus: float, max_restarts: int, env: dict[str, str]):
    """A function that starts `cls(*args, **kwargs)` as a kept actor named `name`."""
    import math

    import ray

    env = {"OMP_NUM_THREADS": str(max(1, math.floor(cpus))), **env}  # num_cpus 0 would give one thread
    return lambda: ray.remote(cls).options(name=name, num_cpus=0, max_restarts=max_restarts, max_concurrency=1,
                                           runtime_env={"env_vars": env}).remote(*args, **kwargs)


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


def _usable(handle, timeout_s: float | None) -> bool:
    """Whether a parked actor answers (within timeout_s; None: however long its constructor takes)
    and has never been restarted by Ray. One killed while parked (the OOM killer) is dead, or was
    restarted by Ray: it would come with part of its restart budget spent. Either way it is not
    lent again (a dead one is killed for good)."""
    import ray

    try:
        if not ray.get(handle.__ray_call__.remote(ever_restarted), timeout=timeout_s):
            return True
    except Exception:  # noqa: BLE001 - RayActorError, GetTimeoutError: not usable
        pass
    ray.kill(handle)
    return False


def kill_and_wait(name: str, handle, timeout_s: float = 30.0) -> None:
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
