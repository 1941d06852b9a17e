"""Starting plain role classes as named Ray actors in one placement group.

A `ResourcePlan` lists the actors of a group of work (a round, an evaluation) with their CPUs and
GPUs; the `Launcher` reserves one placement-group bundle per actor (an actor may share another's
bundle, e.g. to sit on the same GPU) and starts each class as a named actor in its bundle, so the
dashboard's actor list reads like the architecture. The classes stay plain (actors/): the same
class runs in-process in unit tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.restarts import ActorRestarted, awaits_reset, restarted_actor_id


@dataclass(frozen=True)
class ActorSpec:
    name: str  # e.g. "learner-policy-0"
    cpus: float
    gpus: float
    bundle_with: str | None = None  # share this actor's bundle (same node; same GPU when it holds one)
    worker_gpus: int = 0  # one-GPU bundles of its own for the Ray workers it starts (vLLM tensor parallel)
    hosts: tuple[str, ...] = ()  # roles of other actors that run inside this one's process (a colocated round's scorers)

    @property
    def total_gpus(self) -> float:
        return self.gpus + self.worker_gpus


@dataclass
class ResourcePlan:
    actors: list[ActorSpec] = field(default_factory=list)

    def _owners(self) -> list[str]:
        return [a.name for a in self.actors if a.bundle_with is None]

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per actor that owns one (holding its sharers' resources too),
        then one single-GPU bundle per GPU of the actors' own workers."""
        out = []
        for owner in self._owners():
            members = [a for a in self.actors if owner in (a.name, a.bundle_with)]
            gpus = sum(a.gpus for a in members)
            out.append({"CPU": sum(a.cpus for a in members), **({"GPU": gpus} if gpus else {})})
        return out + [{"GPU": 1.0} for a in self.actors for _ in range(a.worker_gpus)]

    def bundle(self, name: str) -> int:
        spec = self.spec(name)
        return self._owners().index(spec.bundle_with or spec.name)

    def worker_bundles(self, name: str) -> list[int]:
        """The single-GPU bundles of an actor's own workers."""
        start = len(self._owners())
        for a in self.actors:
            if a.name == name:
                return list(range(start, start + a.worker_gpus))
            start += a.worker_gpus
        raise KeyError(name)

    def worker_env(self, name: str, offset: int = 0) -> dict[str, str]:
        """Environment that points vLLM's Ray workers (tensor parallel) at an actor's GPU bundles
        (offset: where the plan's bundles start in the placement group)."""
        bundles = [offset + b for b in self.worker_bundles(name)]
        if not bundles:
            return {}
        return {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles)), "VLLM_RAY_PER_WORKER_GPUS": "1"}

    def spec(self, name: str) -> ActorSpec:
        return next(a for a in self.actors if a.name == name)


class ActorDied(Exception):
    """A call failed because the named actor died. kind: the name's first word (rollout | scorer | learner)."""

    def __init__(self, name: str, kind: str, err: Exception | None = None):
        super().__init__(f"{name} died" + (f" ({type(err).__name__})" if err is not None else ""))
        self.name, self.kind = name, kind


class Launcher:
    """A stage's actors from start to end, in one place: reserves a placement group for a plan,
    starts actors into its bundles (or borrows them from the driver's pool), waits on their calls
    naming the one that died (`get`), brings restarted ones back to their arguments (`await_restarted`)
    and kills or parks them all (`shutdown`)."""

    def __init__(self, plan: ResourcePlan, env: dict[str, str], name: str, log=None, placement=None, prefix: str = "",
                 pool=None):
        """Reserve the plan's bundles; waits as long as the cluster needs to free them (stages that
        run side by side queue here for their resources), saying so every minute.
        placement: (an existing placement group, the index of its first bundle for this plan), e.g.
        a Ray Tune trial's, whose bundles after the trial's own are the plan's; it is not removed.
        prefix: starts every actor's name (Ray's actor names are cluster-wide: concurrent sweep
        trials each have a rollout-0).
        pool: a cluster.pool.ActorPool: actors are borrowed from it and parked there by
        `shutdown(keep=True)`. They live outside the placement group (removing it would kill them),
        which still reserves the plan's resources while the stage runs."""
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group

        self.plan, self.env, self.handles, self.prefix, self.pool = plan, env, [], prefix, pool
        self.started: dict[str, tuple] = {}  # name -> (handle, args, kwargs): what `reload` loads again
        self.reused: list[str] = []  # names of the actors borrowed from the pool
        self.ahead: list[str] = []  # those of them started ahead of the stage (the rest: kept from the last one)
        self.resets: dict[str, object] = {}  # name -> ref of a borrowed actor's reset: wait on them (`take_resets`)
        self.names: dict[str, str] = {}  # Ray actor id (hex) -> our name: who died, in errors
        if placement is not None:
            self.pg, self.offset, self.owned = placement[0], placement[1], False
            return
        self.offset, self.owned = 0, True
        self.pg = placement_group(plan.bundles(), strategy="PACK", name=name)
        ready, waited = self.pg.ready(), 0
        while True:
            try:
                ray.get(ready, timeout=60)
                break
            except GetTimeoutError:
                waited += 60
                if log is not None:
                    log(f"waiting {waited} s for the cluster's resources: {plan.bundles()}")

    def start(self, cls, name: str, *args, max_restarts: int = 0, env: dict | None = None, slot: str | None = None,
              **kwargs):
        """Start `cls(*args, **kwargs)` as the named actor. With max_restarts, Ray restarts a dead
        actor by running its constructor again (in-memory state, e.g. weights, is lost). An actor
        with workers of its own (vLLM tensor parallel) lets them join this placement group.
        slot: the plan's actor whose resources and bundle this one takes (default: `name`'s own),
        e.g. a sweep trial's judge in its finished round's rollout-0 bundle."""
        return self.start_group(cls, [(name, args, kwargs)], max_restarts=max_restarts, env=env, slot=slot)[0]

    def start_group(self, cls, members: list[tuple[str, tuple, dict]], max_restarts: int = 0, env: dict | None = None,
                    slot: str | None = None) -> list:
        """start() for [(name, args, kwargs)] that work together (a learner group): from a pool,
        all of them reused or all new."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        runtime_env = {"env_vars": {**self.env, **(env or {})}}
        if self.pool is not None:  # CPU only (config): no GPUs, no bundles of vLLM's own workers
            # Outside the placement group (removing it would kill them); a plan's actors all ask the same CPUs.
            lent = self.pool.borrow(cls, [(self.prefix + n, a, kw) for n, a, kw in members],
                                    self.plan.spec(slot or members[0][0]).cpus, max_restarts, runtime_env["env_vars"])
            for (handle, reset), (name, args, kwargs) in zip(lent, members):
                if reset is not None:
                    self.resets[name] = reset
                    self.reused.append(name)
                    if self.pool.started_ahead(self.prefix + name):
                        self.ahead.append(name)
                self._started(name, handle, args, kwargs)
            return [h for h, _ in lent]
        handles = []
        for name, args, kwargs in members:
            spec = self.plan.spec(slot or name)
            handle = ray.remote(cls).options(
                name=self.prefix + name, num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=max_restarts,
                runtime_env=runtime_env, max_concurrency=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=self.offset + self.plan.bundle(spec.name),
                    placement_group_capture_child_tasks=spec.worker_gpus > 0)).remote(*args, **kwargs)
            self._started(name, handle, args, kwargs)  # at once: shutdown kills it if the next one fails
            handles.append(handle)
        return handles

    def _started(self, name: str, handle, args: tuple, kwargs: dict) -> None:
        self.handles.append(handle)
        self.started[name] = (handle, args, kwargs)
        self.names[handle._actor_id.hex()] = name

    def died(self, actor_id: str | None, err: Exception) -> ActorDied:
        """The ActorDied for a started actor's id (unknown: 'an actor of the stage', kind learner:
        the kind a caller cannot retry)."""
        name = self.names.get(actor_id or "")
        return ActorDied(name, name.split("-")[0], err) if name else ActorDied("an actor of the stage", "learner", err)

    def get(self, refs: list, timeout: float | None = None):
        """ray.get, naming the actor whose call failed because it died (ActorDied). One that died
        and came back between two calls (cluster/restarts.py) counts as dead until reloaded."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(refs, timeout=timeout)
        except RayActorError as err:
            raise self.died(err.actor_id, err) from err
        except ActorRestarted as err:
            raise self.died(restarted_actor_id(err), err) from err

    def gather_timed(self, calls: dict, t0: float) -> dict[str, float]:
        """Wait for every named call, noting when each finished (seconds since t0): which actor's
        start-up a stage waits on. An actor that died while starting is named."""
        import ray

        pending, done_at = {ref: name for name, ref in calls.items()}, {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            self.get(ready)
            done_at[pending.pop(ready[0])] = round(time.perf_counter() - t0, 1)
        return done_at

    def await_restarted(self, names: list[str], timeout_s: float = 600.0) -> None:
        """Wait until every named actor answers (Ray restarts a dead one by running its constructor
        again), then give those that await it their arguments again (`reload`): with actors kept
        between stages, Ray's restart used an earlier stage's."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        handles = [self.started[n][0] for n in names]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get([a.ready.remote() for a in handles], timeout=max(1.0, deadline - time.monotonic()))
                waiting = ray.get([a.__ray_call__.remote(awaits_reset) for a in handles],
                                  timeout=max(1.0, deadline - time.monotonic()))
                ray.get([self.reload(n) for n, w in zip(names, waiting) if w], timeout=max(1.0, deadline - time.monotonic()))
                return
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)  # still restarting

    def take_resets(self) -> dict:
        """{name: ref} of the resets of the actors borrowed since the last call: a failed reset
        (e.g. a model that does not load) must fail the stage, not leave the old model in place."""
        out, self.resets = self.resets, {}
        return out

    def reload(self, name: str):
        """Give a started actor its arguments again (`reset`), e.g. after Ray restarted it with the
        arguments it was first created with, which a pooled actor's may not be. -> the call's ref."""
        handle, args, kwargs = self.started[name]
        return handle.reset.remote(*args, **kwargs)

    def shutdown(self, keep: bool = False) -> None:
        """Kill the actors, or with a pool and `keep` (the stage succeeded) park them there."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.pool is not None:
            for name in self.started:
                self.pool.give_back(self.prefix + name, keep=keep)
        else:
            for h in self.handles:
                ray.kill(h)
        self.handles.clear()
        self.started.clear()
        self.names.clear()
        if self.owned:
            remove_placement_group(self.pg)


class RemoteEngine:
    """A rollout actor seen as an engine (`generate(prompts, sampling)`), for code that takes one."""

    def __init__(self, actor):
        self.actor = actor

    def generate(self, prompts, sampling):
        import ray

        return ray.get(self.actor.generate.remote(prompts, sampling))
