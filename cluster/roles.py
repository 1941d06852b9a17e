"""Launching the round's roles as named Ray actors, and typed wrappers to call them.

The role classes (actors/) are plain; here they become remote with their resources, their
placement-group bundle and a name that reads like the architecture in the dashboard:
`rollout-0`, `scorer-reward-0`, `scorer-cost-0`, `scorer-reference-0`, `learner-policy-0`, ...

Placement: one placement group per round with one bundle per actor (resources from the config's
plan). On a CPU machine every actor takes a fraction of a CPU (all 7 fit on 2 cores); on GPUs
the rollout workers take `tensor_parallel_size` GPUs, learners one GPU each, and scorers share
the learners' GPUs (`colocate_scorers`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch


@dataclass(frozen=True)
class ActorSpec:
    name: str  # e.g. "learner-policy-0"
    cpus: float
    gpus: float


@dataclass
class ResourcePlan:
    actors: list[ActorSpec] = field(default_factory=list)

    def bundle(self, name: str) -> int:
        return [a.name for a in self.actors].index(name)

    def spec(self, name: str) -> ActorSpec:
        return self.actors[self.bundle(name)]


def resource_plan(rl) -> ResourcePlan:
    """rl: pipeline.config.SafeRLHFConfig -> one ActorSpec per actor of the round."""
    from stages.objectives import uses_cost_critic

    gpu = rl.device == "cuda"
    cpu = rl.cpus_per_actor
    actors = [ActorSpec(f"rollout-{i}", cpu, float(rl.tensor_parallel_size) if gpu else 0.0) for i in range(rl.rollout_workers)]
    roles = ["reward", "reference"] + (["cost"] if rl.algorithm != "ppo" else [])
    # Colocated scorers ask for a sliver of a GPU (an actor asking for none sees no GPU at all),
    # and learners leave that sliver free on theirs.
    scorer_gpu = (0.1 if rl.colocate_scorers else 1.0) if gpu else 0.0
    learner_gpu = (0.8 if rl.colocate_scorers else 1.0) if gpu else 0.0
    actors += [ActorSpec(f"scorer-{r}-0", cpu, scorer_gpu) for r in roles]
    learners = ["policy", "reward_critic"] + (["cost_critic"] if uses_cost_critic(rl.algorithm) else [])
    actors += [ActorSpec(f"learner-{r}-{i}", cpu, learner_gpu) for r in learners for i in range(rl.learners_per_role)]
    return ResourcePlan(actors)


class Launcher:
    """Creates a placement group for a plan and starts actors into its bundles."""

    def __init__(self, plan: ResourcePlan, env: dict[str, str], name_prefix: str = ""):
        import ray
        from ray.util.placement_group import placement_group

        self.plan, self.env, self.prefix = plan, env, name_prefix
        bundles = [{"CPU": a.cpus, **({"GPU": a.gpus} if a.gpus else {})} for a in plan.actors]
        self.pg = placement_group(bundles, strategy="PACK", name=f"{name_prefix}round")
        ray.get(self.pg.ready(), timeout=300)
        self.handles = []

    def start(self, cls, name: str, *args, max_restarts: int = 0, **kwargs):
        """Start `cls(*args, **kwargs)` as the named actor. With max_restarts, Ray restarts a dead
        actor by running its constructor again (in-memory state, e.g. weights, is lost)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.plan.spec(name)
        remote = ray.remote(cls).options(
            name=self.prefix + name, num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=max_restarts,
            runtime_env={"env_vars": self.env}, max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.plan.bundle(name)))
        handle = remote.remote(*args, **kwargs)
        self.handles.append(handle)
        return handle

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for h in self.handles:
            ray.kill(h)
        self.handles.clear()
        remove_placement_group(self.pg)


class RemoteEngine:
    """A rollout actor seen as an engine (`generate(prompts, sampling)`), for code that takes one."""

    def __init__(self, actor):
        self.actor = actor

    def generate(self, prompts, sampling):
        import ray

        return ray.get(self.actor.generate.remote(prompts, sampling))


def _split(n: int, parts: int) -> list[slice]:
    """Contiguous row ranges of a batch of n for `parts` ranks."""
    size = -(-n // parts)
    return [slice(i * size, min(n, (i + 1) * size)) for i in range(parts)]


class LearnerGroup:
    """N learners of one role as one data-parallel group, with typed methods."""

    def __init__(self, launcher: Launcher, role: str, model_dir: str, settings: dict, size: int):
        import ray

        from actors.learner import Learner

        self.role, self.size = role, size
        self.ranks = [launcher.start(Learner, f"learner-{role}-{i}", role, model_dir, settings, i, size)
                      for i in range(size)]
        addr, port = ray.get(self.ranks[0].master_address.remote())  # rank 0 first, then everyone joins
        ray.get([r.setup.remote(addr, port) for r in self.ranks])

    def forward(self, seqs: SequenceBatch) -> torch.Tensor:
        import ray

        parts = _split(len(seqs), self.size)
        return torch.cat(ray.get([r.forward.remote(seqs.select(s)) for r, s in zip(self.ranks, parts)]))

    def train_step(self, batch: PolicyMinibatch | CriticMinibatch) -> dict:
        import ray

        parts = _split(len(batch.seqs), self.size)
        shards = [_shard(batch, s) for s in parts]
        stats = ray.get([r.train_step.remote(b) for r, b in zip(self.ranks, shards)])
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    def save_checkpoint(self, directory: str, tag: str) -> None:
        import ray

        ray.get([r.save_checkpoint.remote(directory, tag) for r in self.ranks])

    def load_checkpoint(self, directory: str, tag: str) -> None:
        import ray

        ray.get([r.load_checkpoint.remote(directory, tag) for r in self.ranks])

    def export(self, out_dir: str) -> str:
        import ray

        return ray.get([r.export.remote(out_dir) for r in self.ranks])[0]


def _shard(batch, rows: slice):
    if isinstance(batch, PolicyMinibatch):
        return PolicyMinibatch(batch.seqs.select(rows), batch.old_logp[rows], batch.reward_advantages[rows],
                               None if batch.cost_advantages is None else batch.cost_advantages[rows],
                               batch.lagrange_lambda)
    return CriticMinibatch(batch.seqs.select(rows), batch.old_values[rows], batch.returns[rows])
