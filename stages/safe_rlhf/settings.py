"""The settings of the `safe_rlhf@k` rounds (`safe_rlhf:` in a run's config), defined here, where
they are read: the round, its roles and resource plan take a `SafeRLHFConfig`. `pipeline/config.py`
composes them into the run's config tree."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from core.objectives import ALGORITHM_NAMES, ALGORITHMS
from core.schema import Device, F, Precision, Strict


class RoundConfig(Strict):
    threshold: float | Literal["auto"] = F("auto", "Cost threshold d; auto derives it on the round's cost model's scale from a target unsafe share (see unsafe_share).")
    unsafe_share: float | None = F(None, "threshold auto: the target unsafe share u of this round; null keeps the previous round's (round 1: safe_rlhf.auto_unsafe_share). A round can hold or lower it, never raise it.", ge=0, lt=1)
    lambda_init: float = F(1.0, "Initial Lagrange multiplier.", gt=0)
    lambda_lr: float = F(0.1, "Learning rate of log-lambda.", ge=0)
    steps: int | None = F(None, "PPO steps this round; null uses safe_rlhf.steps_per_round.", ge=1)


class SafeRLHFConfig(Strict):
    algorithm: Literal[ALGORITHM_NAMES] = F("ppo_lag", "; ".join(f"{n}: {a.summary}" for n, a in ALGORITHMS.items()) + " (the registry in core/objectives).")
    group_size: int = F(4, "grpo_lag: answers sampled per prompt, whose returns are normalised as a group; a step samples prompts_per_step answers, prompts_per_step / group_size prompts (4: the smallest group whose mean is a usable baseline at 16 prompts per step).", ge=2)
    group_scale: Literal["group", "batch"] = F("group", "grpo_lag: what a group's deviations from its mean are divided by. group: the group's own std (GRPO); every group's advantages then have unit spread, even where its answers differ by noise. batch: one std over the whole step's deviations (as Dr. GRPO's critique of per-group std, arXiv 2503.20783), so a group whose answers barely differ in reward or cost moves the policy little and one that holds a refusal beside a compliance moves it much.", added=True)
    constraints: Literal["single", "per_category"] = F("single", "single: one cost constraint and one lambda (the paper). per_category: one constraint per harm category head of the cost model as well (it needs cost.per_category: true), each with its own lambda and threshold; the shared cost keeps its own constraint, which covers the categories that fell back to the shared head. threshold auto: the rule on each head, with the reference answers harmful in its category as the unsafe ones, at the round's unsafe share (a number: the same d for each). The policy's cost advantage is the lambda-weighted mean of the constraints' and the loss's lambda their sum, capped at lambda_max (objectives.Algorithm.constrained_advantages); `lambda` in the metrics is that, each constraint's is `lambda_<name>`.")
    engine: Literal["vllm", "hf"] = F("vllm", "Rollout engine: vLLM (GPU-scale) or transformers generate (faster for tiny models on CPU).")
    device: Device = F("cpu", "Device of learners, scorers and rollout workers.")
    precision: Precision = F("fp32", "Learner precision.")
    zero_stage: int = F(0, "DeepSpeed ZeRO stage of the learners.", ge=0, le=3)
    rounds: list[RoundConfig] = F(
        [RoundConfig(threshold=0.0, lambda_init=1.0, lambda_lr=0.01),
         RoundConfig(threshold=-3.0, lambda_init=0.5, lambda_lr=0.04),
         RoundConfig(threshold=-3.0, lambda_init=1.0, lambda_lr=0.04)],
        "Per-round settings; the default is the paper's Beaver v1..v3 table.", min_length=1)
    steps_per_round: int = F(100, "PPO steps per round when a round does not set its own.", ge=1)
    prompts_per_step: int = F(64, "Prompts rolled out per PPO step.", ge=1)
    max_new_tokens: int = F(48, "Longest generated answer.", ge=1)
    temperature: float = F(1.0, "Sampling temperature of the rollouts, red teaming and (unless evaluate.temperature says otherwise) evaluation. The policy trained is the tempered one: the learner, the reference scorer and the engines all take log-probabilities of softmax(logits / temperature), so the PPO ratio and the KL are those of the policy that sampled. Below 1 a small chat model's answers stay coherent (SmolLM2-135M at 1.0 rambles) and rare behaviours such as refusals are sampled more often when the model already prefers them.", gt=0)
    top_p: float = F(1.0, "Nucleus sampling mass. Only 1.0: a truncated distribution's log-probabilities are not the learner's.", gt=0, le=1)
    ppo_epochs: int = F(1, "Passes over each step's experience.", ge=1)
    minibatches: int = F(1, "Minibatches per PPO epoch.", ge=1)
    actor_lr: float = F(1e-5, "Policy learning rate (paper: 1e-5).", gt=0)
    critic_lr: float = F(5e-6, "Reward/cost critic learning rate (paper: 5e-6).", gt=0)
    kl_coeff: float = F(0.01, "beta of the per-token KL penalty (paper: 0.01).", ge=0)
    clip_ratio: float = F(0.2, "PPO ratio clip (paper: 0.2).", gt=0)
    clip_value: float = F(5.0, "Critic value clip (paper: 5).", gt=0)
    max_grad_norm: float = F(1.0, "Learners' gradient clipping: the global norm of each update's gradient is scaled down to this (the paper's code: 1.0).", gt=0, added=True)
    clip_score: float = F(50.0, "Per-token shaped reward/cost clip (paper: 50).", gt=0)
    gamma: float = F(1.0, "GAE discount (paper: 1.0).", ge=0, le=1)
    gae_lambda: float = F(0.95, "GAE lambda (paper: 0.95).", ge=0, le=1)
    lambda_max: float | None = F(5.0, "Cap on the Lagrange multiplier (paper: 5).", gt=0)
    lambda_window: int = F(128, "Episode costs averaged for the lambda update (paper: 128).", ge=1)
    lambda_delay_steps: int = F(0, "Steps before lambda starts to move.", ge=0)
    auto_unsafe_share: float = F(0.05, "threshold auto, round 1's target unsafe share u: d = (1-u) * mean cost of the safe answers + u * mean cost of the unsafe ones of a fixed reference set (the first ingest's held-out labelled answers), scored by the round's cost model: the mean cost of a policy unsafe a share u of the time.", ge=0, lt=1)
    shaping_nu: float = F(1.0, "Fixed cost penalty of the reward_shaping baseline.", ge=0)
    checkpoint_every_steps: int = F(20, "Checkpoint policy, critics and lambda every this many steps.", ge=1, operational=True)
    max_round_restarts: int = F(2, "Times a round restarts from its last checkpoint after a learner dies.", ge=0, operational=True)
    max_actor_restarts: int = F(2, "Times Ray restarts a dead rollout worker or scorer over a round (the failed call is then retried in place).", ge=0, operational=True)
    max_step_retries: int = F(3, "In-place retries per step after rollout worker or scorer deaths (or a weight transfer that lost its peer); past them the stage fails and resume continues from the last checkpoint.", ge=0, operational=True)
    rollout_workers: int = F(1, "vLLM/hf rollout actors.", ge=1)
    learners_per_role: int = F(1, "Data-parallel DeepSpeed learners per role (policy, reward critic, cost critic).", ge=1)
    cpus_per_actor: float = F(0.25, "CPUs reserved per round actor (fractions let all seven share 2 cores).", gt=0, operational=True)
    layout: Literal["split", "colocated"] = F("split", "Where the round's scorers run. split: each in a process of its own (reward, cost and reference scorers beside the learners). colocated: inside the learners' processes, frozen: the reference in the policy learner (the policy's weights at the round's start), the reward and cost scorers in the reward and cost critics (in the policy learner where the algorithm has no critics, e.g. grpo_lag): 4 processes instead of 7 for ppo_lag, 2 instead of 5 for grpo_lag; the same results to the bit (tested). A killed host is a learner death: the round restarts from its checkpoint. `python -m pipeline plan` shows both layouts.", operational=True)
    threads_per_actor: int | None = F(None, "Torch (and vLLM CPU) threads in each model actor (OMP_NUM_THREADS). null: Ray's rule, the actor's whole CPUs (at least 1): one thread at cpus_per_actor 0.25. More threads than the CPUs reserved pay where a round's phases run one after another, as in a colocated round on a few cores (docs/benchmarks.md, round_step).", ge=1, operational=True)
    colocate_scorers: bool = F(True, "On GPU: reward/cost/reference scorers share the learners' GPUs instead of taking their own.")
    tensor_parallel_size: int = F(1, "vLLM tensor parallel size per rollout worker.", ge=1)
    gpu_memory_utilization: float = F(0.3, "vLLM's share of a GPU's memory.", gt=0, le=1)
    max_num_seqs: int = F(256, "vLLM's maximum concurrent sequences.", ge=1)
    cpu_kv_cache_gib: float | None = F(None, "vLLM's KV cache on CPU, in GiB of host memory (what gpu_memory_utilization sizes on a GPU). null: room for max_num_seqs sequences at full length (prompt + max_new_tokens), at most 1 GiB: 64 MiB for the tiny world's model, 0.71 GiB for SmolLM2-135M at max_num_seqs 64. vLLM zeroes the whole cache when it starts, so a bigger one costs start-up time and resident memory and gains nothing.", gt=0, added=True)
    weight_sync: Literal["checkpoint", "gloo", "nccl", "ipc"] = F("checkpoint", "How new policy weights reach the rollout workers: checkpoint (a safetensors directory each worker reloads; any engine), or vLLM's weight-transfer API: gloo (a broadcast through host memory; CPU or GPU), nccl (GPU broadcast; learner and vLLM on different GPUs), ipc (CUDA IPC; policy learner i shares rollout worker i's GPU).", operational=True)
    gradient_checkpointing: bool = F(False, "Learners recompute activations in the backward pass: the same gradients with the activation memory of one layer (7B on GPUs needs it; about a third more compute).", operational=True)
    micro_batch_size: int | None = F(None, "Sequences per learner forward/backward; gradients accumulate to one optimizer step per shard (prompts_per_step / minibatches / learners_per_role sequences). null: the whole shard at once.", ge=1)
    logprob_chunk_tokens: int | None = F(4096, "Tokens whose log-probabilities the learners and the reference scorer compute at once: bounds the fp32 logits to this many x the vocabulary (null: every token at once, the full [batch, length, vocabulary] tensor).", ge=1)
    overlap_generation: bool = F(False, "Generate step t+1's rollouts while step t scores and learns, from the rollout workers' weights of step t-1 (one step stale, the step metric rollout_staleness): the PPO ratio and the KL take the sampling engine's own log-probabilities as the behaviour policy's. Hides generation behind learning where they run on different devices; changes the trajectory (one-step-off-policy PPO).")
    dispatch_together: bool = F(True, "A step's independent calls (the scorers and the learners' forwards; the three learner groups' updates) go out together and are gathered once. false: one after another in the algorithm's order: the same results to the bit (tested), slower; for isolating a role when debugging.", operational=True)
    keep_actors: bool | None = F(None, "Keep the round's actor processes between stages (cluster/pool.py): the next round, red teaming and evaluation's scorers load their models into them instead of starting new processes (on 2 cores, about 25 s of each later round's start-up). null: on with device cpu, off with cuda (a kept actor would hold the GPU the fits between the rounds need; true there is an error).", operational=True)
    rollout_sleep: bool = F(False, "vLLM sleep mode (GPU): after each generation the rollout engine frees its GPU memory, weights and KV cache (level 2: the weight push that follows rewrites every weight), and takes them back when the push or the next generation needs them, so the policy learner that shares its GPU has that memory while it scores and learns. Puts policy learner i on rollout worker i's GPU, as weight_sync ipc does. Needs engine vllm, device cuda, tensor_parallel_size 1, rollout_workers == learners_per_role and overlap_generation false. Written against vLLM's API; never run on a GPU here.")
    weight_sync_timeout_s: float = F(60.0, "A weight transfer whose peer died fails after this many seconds (gloo), and the round handles it like any actor death.", gt=0, operational=True)

    @property
    def learner_shard(self) -> int:
        """Sequences of one minibatch on one learner rank."""
        return max(1, self.prompts_per_step // self.minibatches // self.learners_per_role)

    @property
    def keeps_actors(self) -> bool:
        return self.device == "cpu" if self.keep_actors is None else self.keep_actors

    def unsafe_share(self, k: int) -> float:
        """Round k's target unsafe share for threshold auto: held or lowered from round to round."""
        share = self.auto_unsafe_share
        for r in self.rounds[:k]:
            share = min(share, r.unsafe_share) if r.unsafe_share is not None else share
        return share

    @model_validator(mode="after")
    def _untruncated_sampling(self) -> "SafeRLHFConfig":
        if self.top_p != 1.0:
            raise ValueError(f"top_p {self.top_p}: only 1.0 is supported; the learner and the reference scorer compute "
                             "log-probabilities of the whole tempered distribution, so the PPO ratio and the KL would be "
                             "taken against the wrong behaviour policy")
        return self

    @model_validator(mode="after")
    def _unsafe_shares_do_not_rise(self) -> "SafeRLHFConfig":
        shares = [r.unsafe_share for r in self.rounds if r.unsafe_share is not None]
        if any(b > a for a, b in zip(shares, shares[1:])) or (shares and shares[0] > self.auto_unsafe_share):
            raise ValueError(f"rounds' unsafe_share {shares} (after auto_unsafe_share {self.auto_unsafe_share}) rises: "
                             "a later round may hold or tighten the constraint, not loosen it")
        return self

    @model_validator(mode="after")
    def _constraints_of_a_constrained_algorithm(self) -> "SafeRLHFConfig":
        if self.constraints == "per_category" and not ALGORITHMS[self.algorithm].constrained:
            raise ValueError(f"constraints per_category: {self.algorithm} has no cost constraint "
                             f"(use one of {', '.join(n for n, a in ALGORITHMS.items() if a.constrained)})")
        return self

    @model_validator(mode="after")
    def _whole_groups(self) -> "SafeRLHFConfig":
        if ALGORITHMS[self.algorithm].group_sampling and self.prompts_per_step % self.group_size:
            raise ValueError(f"{self.algorithm} samples group_size {self.group_size} answers per prompt: prompts_per_step "
                             f"{self.prompts_per_step} (answers per step) must be a multiple of it")
        return self

    @model_validator(mode="after")
    def _micro_batches(self) -> "SafeRLHFConfig":
        if self.micro_batch_size is not None and (
                self.prompts_per_step % (self.minibatches * self.learners_per_role)
                or self.learner_shard % self.micro_batch_size):
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide each learner's shard of a minibatch: "
                             f"prompts_per_step {self.prompts_per_step} / minibatches {self.minibatches} / "
                             f"learners_per_role {self.learners_per_role}")
        return self

    @model_validator(mode="after")
    def _kept_actors_on_cpu(self) -> "SafeRLHFConfig":
        if self.keep_actors and self.device != "cpu":
            raise ValueError("keep_actors: true needs device cpu: a kept actor would hold its GPU between the rounds, "
                             "where the reward and cost fits need the GPUs (use null or false)")
        return self

    @model_validator(mode="after")
    def _rollout_sleep(self) -> "SafeRLHFConfig":
        if not self.rollout_sleep:
            return self
        wrong = [why for bad, why in (
            (self.engine != "vllm", f"engine vllm (got {self.engine}: only vLLM sleeps)"),
            (self.device != "cuda", f"device cuda (got {self.device}: vLLM has no sleep mode on CPU)"),
            (self.overlap_generation, "overlap_generation false (the engine would sleep while it samples)"),
            (self.tensor_parallel_size != 1 or self.rollout_workers != self.learners_per_role,
             "tensor_parallel_size 1 and rollout_workers == learners_per_role (policy learner i shares rollout worker i's GPU; "
             f"got {self.tensor_parallel_size}, {self.rollout_workers}, {self.learners_per_role})")) if bad]
        if wrong:
            raise ValueError("rollout_sleep needs " + "; ".join(wrong))
        return self

    @model_validator(mode="after")
    def _weight_sync(self) -> "SafeRLHFConfig":
        ws = self.weight_sync
        if ws != "checkpoint" and self.engine != "vllm":
            raise ValueError(f"weight_sync {ws} is vLLM's weight-transfer API: it needs engine vllm (engine hf: use checkpoint)")
        if ws in ("nccl", "ipc") and self.device != "cuda":
            raise ValueError(f"weight_sync {ws} needs device cuda (on CPU use checkpoint or gloo)")
        if ws == "ipc" and (self.tensor_parallel_size != 1 or self.rollout_workers != self.learners_per_role):
            raise ValueError("weight_sync ipc puts policy learner i on rollout worker i's GPU: it needs tensor_parallel_size 1 "
                             f"and rollout_workers == learners_per_role (got {self.tensor_parallel_size}, "
                             f"{self.rollout_workers}, {self.learners_per_role})")
        return self
