"""Which actors a round has, with their resources (also what `python -m pipeline plan` prints).

On a CPU machine every actor takes a fraction of a CPU (all seven of ppo_lag fit on 2 cores;
grpo_lag has five: no critics). With `layout: colocated` the scorers run inside learners' processes
(`scorer_hosts`) and take no actor of their own: four processes for ppo_lag, two for grpo_lag. On GPUs the
learners take one GPU each and scorers share the learners' GPUs (`colocate_scorers`). A rollout
worker with `tensor_parallel_size` 1 takes one GPU; with more, it takes none itself and gets one
single-GPU bundle per tensor-parallel rank, which vLLM's own Ray workers take (the pattern OpenRLHF
and verl use for vLLM in a placement group: VLLM_RAY_BUNDLE_INDICES, the ray executor). With
`weight_sync: ipc` policy learner i shares rollout worker i's bundle, half a GPU each: one bundle
holds one GPU, so both actors see the same device.
"""
from __future__ import annotations

from cluster.launch import ActorSpec, ResourcePlan
from core.objectives import get_algorithm, uses_cost_model
from stages.safe_rlhf.settings import SafeRLHFConfig


def learner_roles(algorithm: str) -> list[str]:
    """The policy and the algorithm's critics (its registration in core/objectives)."""
    return list(get_algorithm(algorithm).learner_roles)


def scorer_roles(algorithm: str) -> list[str]:
    return list(get_algorithm(algorithm).scorer_roles)


# layout colocated: the learner role that hosts each scorer, where the algorithm has that learner
# (else the policy learner). The reference is the policy at the round's start; a critic starts from
# the score model its scorer holds.
SCORER_HOSTS = {"reference": "policy", "reward": "reward_critic", "cost": "cost_critic"}


def scorer_hosts(rl: SafeRLHFConfig) -> dict[str, str]:
    """{scorer role: learner role whose rank 0 runs it in its own process} under `layout: colocated`;
    {} under split (every scorer an actor of its own)."""
    if rl.layout != "colocated":
        return {}
    learners = learner_roles(rl.algorithm)
    return {r: SCORER_HOSTS[r] if SCORER_HOSTS[r] in learners else "policy" for r in scorer_roles(rl.algorithm)}


def resource_plan(rl: SafeRLHFConfig) -> ResourcePlan:
    """rl -> one ActorSpec per actor of the round."""
    gpu = rl.device == "cuda"
    cpu = rl.cpus_per_actor
    # policy learner i on rollout worker i's GPU (config checks TP 1, equal counts): for CUDA IPC, or
    # to have the memory the rollout engine frees when it sleeps
    ipc = gpu and (rl.weight_sync == "ipc" or rl.rollout_sleep)
    tp = rl.tensor_parallel_size if gpu and rl.engine == "vllm" else 1
    rollout_gpu = (0.5 if ipc else (1.0 if tp == 1 else 0.0)) if gpu else 0.0
    actors = [ActorSpec(f"rollout-{i}", cpu, rollout_gpu, worker_gpus=tp if tp > 1 else 0) for i in range(rl.rollout_workers)]
    hosts = scorer_hosts(rl)
    # Split scorers colocated on GPU ask for a sliver of one (an actor asking for none sees no GPU
    # at all), and learners leave that sliver free on theirs. Hosted scorers share their learner's.
    split_scorers = [r for r in scorer_roles(rl.algorithm) if r not in hosts]
    scorer_gpu = (0.1 if rl.colocate_scorers else 1.0) if gpu else 0.0
    learner_gpu = (0.8 if rl.colocate_scorers and split_scorers else 1.0) if gpu else 0.0
    actors += [ActorSpec(f"scorer-{r}-0", cpu, scorer_gpu) for r in split_scorers]
    for r in learner_roles(rl.algorithm):
        for i in range(rl.learners_per_role):
            hosted = tuple(s for s, host in hosts.items() if host == r) if i == 0 else ()
            cpus = cpu * (1 + len(hosted))  # a host keeps its guests' CPUs: the round reserves what it did split
            if ipc and r == "policy":
                actors.append(ActorSpec(f"learner-policy-{i}", cpus, 0.5, bundle_with=f"rollout-{i}", hosts=hosted))
            else:
                actors.append(ActorSpec(f"learner-{r}-{i}", cpus, learner_gpu, hosts=hosted))
    return ResourcePlan(actors)


def cpus_to_start_ahead(cfg) -> float:
    """The cluster CPUs from which on round 1's actors start ahead, beside the reward and cost fits
    that run just before it (what those fits reserve, plus one whole CPU for the imports)."""
    fits = [cfg.reward] + ([cfg.cost] if uses_cost_model(cfg.safe_rlhf.algorithm) else [])
    return sum(t.reserved_cpus for t in fits) + 1
