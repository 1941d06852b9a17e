"""Launching the round's roles as named Ray actors, and typed wrappers to call them.

The role classes (actors/) are plain; here they become remote with their resources, their
placement-group bundle and a name that reads like the architecture in the dashboard:
`rollout-0`, `scorer-reward-0`, `scorer-cost-0`, `scorer-reference-0`, `learner-policy-0`, ...

Placement: one placement group per round with one bundle per actor (resources from the config's
plan). On a CPU machine every actor takes a fraction of a CPU (all 7 fit on 2 cores); on GPUs
the rollout workers take `tensor_parallel_size` GPUs, learners one GPU each, and scorers share
the learners' GPUs (`colocate_scorers`). With `weight_sync: ipc` policy learner i shares rollout
worker i's bundle, half a GPU each: one bundle holds one GPU, so both actors see the same device.

`RolloutWeightSync` moves the policy's weights to the rollout workers after every update.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch


@dataclass(frozen=True)
class ActorSpec:
    name: str  # e.g. "learner-policy-0"
    cpus: float
    gpus: float
    bundle_with: str | None = None  # share this actor's bundle (same node; same GPU when it holds one)


@dataclass
class ResourcePlan:
    actors: list[ActorSpec] = field(default_factory=list)

    def _owners(self) -> list[str]:
        return [a.name for a in self.actors if a.bundle_with is None]

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per actor that owns one, holding its sharers' resources too."""
        out = []
        for owner in self._owners():
            members = [a for a in self.actors if owner in (a.name, a.bundle_with)]
            gpus = sum(a.gpus for a in members)
            out.append({"CPU": sum(a.cpus for a in members), **({"GPU": gpus} if gpus else {})})
        return out

    def bundle(self, name: str) -> int:
        spec = self.spec(name)
        return self._owners().index(spec.bundle_with or spec.name)

    def spec(self, name: str) -> ActorSpec:
        return next(a for a in self.actors if a.name == name)


def resource_plan(rl) -> ResourcePlan:
    """rl: pipeline.config.SafeRLHFConfig -> one ActorSpec per actor of the round."""
    from stages.objectives import uses_cost_critic

    gpu = rl.device == "cuda"
    cpu = rl.cpus_per_actor
    ipc = gpu and rl.weight_sync == "ipc"  # policy learner i on rollout worker i's GPU (config checks TP 1, equal counts)
    rollout_gpu = (0.5 if ipc else float(rl.tensor_parallel_size)) if gpu else 0.0
    actors = [ActorSpec(f"rollout-{i}", cpu, rollout_gpu) for i in range(rl.rollout_workers)]
    roles = ["reward", "reference"] + (["cost"] if rl.algorithm != "ppo" else [])
    # Colocated scorers ask for a sliver of a GPU (an actor asking for none sees no GPU at all),
    # and learners leave that sliver free on theirs.
    scorer_gpu = (0.1 if rl.colocate_scorers else 1.0) if gpu else 0.0
    learner_gpu = (0.8 if rl.colocate_scorers else 1.0) if gpu else 0.0
    actors += [ActorSpec(f"scorer-{r}-0", cpu, scorer_gpu) for r in roles]
    learners = ["policy", "reward_critic"] + (["cost_critic"] if uses_cost_critic(rl.algorithm) else [])
    for r in learners:
        for i in range(rl.learners_per_role):
            if ipc and r == "policy":
                actors.append(ActorSpec(f"learner-policy-{i}", cpu, 0.5, bundle_with=f"rollout-{i}"))
            else:
                actors.append(ActorSpec(f"learner-{r}-{i}", cpu, learner_gpu))
    return ResourcePlan(actors)


class Launcher:
    """Creates a placement group for a plan and starts actors into its bundles."""

    def __init__(self, plan: ResourcePlan, env: dict[str, str], name_prefix: str = ""):
        import ray
        from ray.util.placement_group import placement_group

        self.plan, self.env, self.prefix = plan, env, name_prefix
        self.pg = placement_group(plan.bundles(), strategy="PACK", name=f"{name_prefix}round")
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


class RolloutWeightSync:
    """The policy's weights -> every rollout worker, by `safe_rlhf.weight_sync` (cluster/weight_sync.py).

    checkpoint: policy rank 0 writes an HF directory, swapped in at `sync_dir`; each rollout worker
      reloads it in place.
    gloo / nccl: one group of policy rank 0 and every vLLM worker, formed once (`connect`); each push
      issues the rollout workers' receive and the learners' broadcast together, because they meet
      inside the collective (a sequential ray.get would deadlock).
    ipc: the policy ranks export CUDA IPC handles, the (colocated) rollout workers copy the weights
      out of them, then the ranks release them.
    """

    def __init__(self, method: str, policy: LearnerGroup, rollout: list, sync_dir: Path):
        self.method, self.policy, self.rollout, self.sync_dir = method, policy, rollout, Path(sync_dir)
        self.pushes = 0  # also the weight version vLLM records
        self.update_info: dict | None = None

    def connect(self) -> None:
        import ray

        from cluster.weight_sync import transfer_class

        if self.method == "checkpoint":
            return
        ranks = self.policy.ranks
        if self.method == "ipc":
            infos = ray.get([r.transfer_init.remote("ipc", None) for r in ranks])
            ray.get([w.transfer_init.remote(infos[0]) for w in self.rollout])
            return
        addr, port = ray.get(ranks[0].transfer_master.remote(self.method))
        sizes = ray.get([w.transfer_world_size.remote() for w in self.rollout])
        infos = transfer_class(self.method).worker_init_infos(addr, port, sizes)
        ray.get([r.transfer_init.remote(self.method, infos[0]) for r in ranks]
                + [w.transfer_init.remote(info) for w, info in zip(self.rollout, infos)])
        self.update_info = ray.get(ranks[0].transfer_metadata.remote())  # static: reused every push

    def push(self) -> float:
        """Send the current policy weights to every rollout worker; wall seconds."""
        import ray

        t0 = time.perf_counter()
        self.pushes += 1
        version, ranks = str(self.pushes), self.policy.ranks
        if self.method == "checkpoint":
            tmp = self.sync_dir.with_name(self.sync_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.policy.export(str(tmp))
            shutil.rmtree(self.sync_dir, ignore_errors=True)
            tmp.rename(self.sync_dir)
            ray.get([w.update_weights.remote(str(self.sync_dir)) for w in self.rollout])
        elif self.method == "ipc":
            info = ray.get([r.transfer_export.remote() for r in ranks])[0]
            ray.get([w.transfer_apply.remote(info, version) for w in self.rollout])
            ray.get([r.transfer_release.remote() for r in ranks])  # only after every worker copied
        else:
            ray.get([w.transfer_apply.remote(self.update_info, version) for w in self.rollout]
                    + [r.transfer_send.remote(self.update_info) for r in ranks])
        return time.perf_counter() - t0

    def reconnect(self) -> None:
        """After Ray restarted a rollout worker: it came back with the initial weights and outside
        any transfer group. Re-form the group and send the current weights again."""
        import ray

        if self.method == "checkpoint":
            if self.sync_dir.exists():
                ray.get([w.update_weights.remote(str(self.sync_dir)) for w in self.rollout])
            return
        self.close()
        self.connect()
        if self.pushes:
            self.pushes -= 1  # the same version again
            self.push()

    def close(self) -> None:
        """Leave the transfer group on every side (best effort: some actors may be gone)."""
        import ray

        if self.method == "checkpoint":
            return
        refs = [w.transfer_shutdown.remote() for w in self.rollout] + [r.transfer_shutdown.remote() for r in self.policy.ranks]
        for ref in refs:
            try:
                ray.get(ref, timeout=60)
            except Exception:  # a dead actor has nothing to shut down
                pass
