"""The learner role: a DeepSpeed engine for the policy or one of the two critics.

N learners of a role form one data-parallel torch.distributed group: the driver asks rank 0 for
an address and port (`master_address`), then calls `setup` on every rank at once (the group's
rendezvous). Each `train_step` gets this rank's shard of a minibatch and runs it in micro-batches
of `micro_batch` sequences with gradient accumulation (one optimizer step per shard); DeepSpeed
averages the gradients across the group.

- policy: a causal LM; `forward` gives per-token logprobs of the response [B, T] (computed in
  chunks of `logprob_chunk` tokens, never the full-vocabulary fp32 logits); the loss is the
  algorithm's `policy_loss` (its registration in core/objectives, where all the math lives).
- reward_critic / cost_critic: score models started from the fitted reward / cost model;
  `forward` gives per-token values [B, T]; the loss is `clipped_value_loss`.

Memory for large models: ZeRO-3 models are built partitioned (transformers honours a live
`HfDeepSpeedConfig`: deepspeed.zero.Init), `gradient_checkpointing` recomputes activations in the
backward pass, and exports gather one parameter at a time onto rank 0 in the training dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from actors.experience import CriticMinibatch, PolicyMinibatch, SequenceBatch
from actors.models import enable_gradient_checkpointing, import_ahead, response_logprobs, response_values, torch_dtype
from cluster.deepspeed_setup import deepspeed_config, full_state_dict, gathered_parameters, join_alone, without_inference_shm_op
from cluster.network import host_and_free_port
from cluster.restarts import refuse_if_restarted
from cluster.weight_sync import make_sender
from cluster.weight_sync.base import transfer_metadata
from core.objectives import clip_fraction, clipped_value_loss, get_algorithm, masked_mean

ROLES = ("policy", "reward_critic", "cost_critic")
# The round's config field of each learner setting named otherwise there (LearnerSettings.from_config)
CONFIG_NAMES = {"shard": "learner_shard", "micro_batch": "micro_batch_size", "logprob_chunk": "logprob_chunk_tokens"}


@dataclass(frozen=True)
class LearnerSettings:
    """What a learner is built with: typed, so that a misspelt or missing setting fails where the
    settings are made (the round's `roles.actor_arguments`, from the validated config), not as a
    silent default inside the learner."""

    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 | fp16
    zero_stage: int
    lr: float
    seed: int = 0
    shard: int | None = None  # sequences per train_step on this rank (a multiple of micro_batch); None: micro_batch
    micro_batch: int | None = None  # sequences per forward/backward; None: the whole shard
    gradient_checkpointing: bool = False
    logprob_chunk: int | None = None  # tokens whose logprobs are computed at once; None: all
    clip_ratio: float = 0.2  # the policy's PPO clip
    clip_value: float = 5.0  # the critics' value clip
    max_grad_norm: float = 1.0  # the global gradient norm DeepSpeed clips each update to
    algorithm: str = "ppo_lag"  # whose registered policy loss the policy learner minimises
    temperature: float = 1.0  # the rollouts' sampling temperature: the policy's logprobs are the tempered ones

    @classmethod
    def from_config(cls, config, **given) -> "LearnerSettings":
        """The settings from a round's config (a SafeRLHFConfig): each field from the config field of
        the same name (or its CONFIG_NAMES name), the rest `given`. A field found in neither is an
        error, not a silent default: a new learner setting is one field here and one in the config."""
        values = {f.name: getattr(config, CONFIG_NAMES.get(f.name, f.name)) for f in fields(cls)
                  if f.name not in given and hasattr(config, CONFIG_NAMES.get(f.name, f.name))}
        missing = sorted({f.name for f in fields(cls)} - set(values) - set(given))
        if missing:
            raise TypeError(f"learner settings {missing} are neither config fields nor given")
        return cls(**values, **given)

    @classmethod
    def of(cls, settings: "LearnerSettings | dict") -> "LearnerSettings":
        if isinstance(settings, cls):
            return settings
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown learner settings {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**settings)


class Learner:
    def __init__(self, role: str, model_dir: str | None, settings: LearnerSettings | dict, rank: int = 0,
                 world_size: int = 1, hosted: dict[str, tuple[tuple, dict]] | None = None):
        """settings: a LearnerSettings (or a dict of its fields, checked the same way).
        model_dir None: started ahead of its stage (cluster/pool.py `prestart`): DeepSpeed and
        transformers imported; `reset` gives it the stage's model before `setup`.
        hosted: {scorer role: (Scorer's args, kwargs)}: scorers that run in this process (the round's
        `layout: colocated`), frozen, called through `score_with`."""
        if role not in ROLES:
            raise ValueError(f"unknown learner role {role!r}; choose one of {ROLES}")
        settings = LearnerSettings.of(settings)
        self.prestarted = model_dir is None
        if self.prestarted:
            import_ahead("deepspeed", "transformers:AutoModelForCausalLM")
        self.role, self.model_dir, self.settings = role, model_dir, settings
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self.sender = None  # the policy's weight-transfer sender (cluster/weight_sync/), gloo | nccl | ipc
        self.micro = int(settings.micro_batch or settings.shard or 1)
        shard = int(settings.shard or self.micro)
        if shard % self.micro:
            raise ValueError(f"a learner's shard of {shard} sequences is not a multiple of micro_batch {self.micro}")
        self.accumulation = shard // self.micro
        self.policy_loss = get_algorithm(settings.algorithm).policy_loss
        self.hosted = {}
        if hosted:
            from actors.scorer import Scorer

            self.hosted = {r: Scorer(*args, **kwargs) for r, (args, kwargs) in hosted.items()}

    # Kept between stages (cluster/pool.py): the same role, rank and group size on the same device
    # keep the process group this process joined; `setup` then builds a new engine in it.
    @staticmethod
    def reuse_key(role: str, model_dir: str, settings: LearnerSettings | dict, rank: int = 0, world_size: int = 1,
                  hosted: dict | None = None) -> tuple:
        return ("Learner", role, rank, world_size, LearnerSettings.of(settings).device)

    def reset(self, *args, **kwargs) -> None:
        self.__init__(*args, **kwargs)  # drops the engine (weights, optimizer state)

    def run_fit(self, loop, loop_config: dict, storage_dir: str, name: str, threads: int, fault: str | None = None) -> None:
        """A fit's worker loop (SFT, a reward or cost model: stages/common/fit_runner.py) in this
        process, kept between stages, where Ray Train would start a controller and a worker process
        for it: cluster.train.run_in_process, rank 0 of 1. Between a round's stages, so the learner
        holds no engine meanwhile: the last round's is dropped first, and `reset` builds the next."""
        import gc

        from cluster.train import run_in_process

        self.engine, self.hosted, self._zero3_config = None, {}, None
        gc.collect()  # the last engine's weights and optimizer state, before the fit allocates its own
        try:
            run_in_process(loop, loop_config, storage_dir, name, self.settings.device, threads, fault)
        finally:
            gc.collect()  # the fit's engine, before the next stage loads its model here

    def master_address(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the group's rendezvous."""
        return host_and_free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the group and build the engine. Called on every rank at once."""
        refuse_if_restarted(self)  # started ahead with no model: reset first
        # Each learner actor sees exactly one device (Ray sets CUDA_VISIBLE_DEVICES), so its local
        # rank is 0 whatever its rank in the group.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", DS_ACCELERATOR=self.settings.device)
        import deepspeed

        without_inference_shm_op()
        if self.world_size == 1:  # a file rendezvous (join_alone); groups of several keep TCP
            join_alone(self.settings.device)
        else:
            deepspeed.init_distributed(dist_backend="gloo" if self.settings.device == "cpu" else "nccl", verbose=False)
        torch.manual_seed(self.settings.seed + self.rank)
        ds = deepspeed_config({"per_device_batch_size": self.micro, "gradient_accumulation": self.accumulation,
                               "lr": self.settings.lr, "weight_decay": 0.0, "device": self.settings.device,
                               "zero_stage": self.settings.zero_stage, "precision": self.settings.precision},
                              self.world_size, gradient_clipping=self.settings.max_grad_norm)
        # ZeRO-3: while this object lives, transformers builds the model under deepspeed.zero.Init,
        # partitioned from the start (no rank ever holds the whole model), and loads the weights
        # into the partitions.
        zero3 = None
        if self.settings.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            zero3 = HfDeepSpeedConfig(ds)
        if self.role == "policy":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        else:
            from actors.score_model import ScoreModel, is_score_model_dir

            # a critic starts from its score model, or (a score model with its own tokenizer) from
            # the policy's backbone with a fresh head
            model = ScoreModel.from_pretrained(self.model_dir, dtype=torch.float32) if is_score_model_dir(self.model_dir) \
                else ScoreModel.from_backbone(self.model_dir, self.role, dtype=torch.float32, seed=self.settings.seed)
        if self.settings.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=ds)
        self._zero3_config = zero3  # keep alive for the engine's lifetime
        return self.rank

    @property
    def device(self):
        return self.engine.device

    # ------------------------------------------------------------------ forward / train
    def _forward(self, seqs: SequenceBatch) -> torch.Tensor:
        seqs = seqs.to(self.device)
        if self.role == "policy":
            return response_logprobs(self.engine, seqs, chunk=self.settings.logprob_chunk,
                                     temperature=self.settings.temperature)
        return response_values(self.engine, seqs)

    @torch.no_grad()
    def forward(self, seqs: SequenceBatch) -> torch.Tensor:
        """policy: logprobs [B, T]; critics: values [B, T]; `micro_batch` sequences at a time."""
        self.engine.eval()
        return torch.cat([self._forward(seqs.select(slice(s, s + self.micro))).float().cpu()
                          for s in range(0, len(seqs), self.micro)])

    def _loss(self, batch: PolicyMinibatch | CriticMinibatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss, and its statistics as 0-dim tensors on the device (train_step
        reads them once per step: no host sync per micro-batch)."""
        mask = batch.seqs.response_mask.to(self.device).float()
        if self.role == "policy":
            logp = self._forward(batch.seqs)  # [b, T]
            old = batch.old_logp.to(self.device)
            loss = self.policy_loss(logp, old, batch.reward_advantages.to(self.device),
                                       None if batch.cost_advantages is None else batch.cost_advantages.to(self.device),
                                       mask, batch.lagrange_lambda, self.settings.clip_ratio)
            return loss, {"policy_loss": loss.detach(),
                          "clip_fraction": clip_fraction(logp.detach(), old, mask, self.settings.clip_ratio),
                          "policy_kl_old": masked_mean(old - logp.detach(), mask)}
        values = self._forward(batch.seqs)  # [b, T]
        loss = clipped_value_loss(values, batch.old_values.to(self.device), batch.returns.to(self.device),
                                  mask, self.settings.clip_value)
        return loss, {f"{self.role}_loss": loss.detach()}

    def train_step(self, batch: PolicyMinibatch | CriticMinibatch) -> dict:
        """One optimizer step on this rank's shard, in micro-batches with gradient accumulation.
        Each micro-batch's loss (a mean over its sequences) is weighted by its share of the shard,
        so the accumulated gradient is the whole shard's (DeepSpeed divides by the accumulation)."""
        self.engine.train()
        n = len(batch.seqs)
        parts = [slice(s, s + self.micro) for s in range(0, n, self.micro)]
        if len(parts) != self.accumulation:
            raise ValueError(f"{self.role} learner: a shard of {n} sequences is {len(parts)} micro-batches of "
                             f"{self.micro}, but the engine accumulates {self.accumulation}")
        stats: dict[str, torch.Tensor] = {}
        for rows in parts:
            part = batch.select(rows)
            share = len(part.seqs) / n
            loss, logs = self._loss(part)
            self.engine.backward(loss * share * self.accumulation)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            for k, v in logs.items():
                stats[k] = stats.get(k, 0.0) + v.float() * share
        names = list(stats)  # one host sync for the step's statistics (every micro-batch logs the same names)
        return dict(zip(names, torch.stack([stats[k] for k in names]).tolist()))

    def score_with(self, role: str, method: str, *args, **kwargs):
        """A hosted scorer's call (Scorer.score, .logprobs, .score_texts, .score_conversations), in this
        process: what the round would ask a scorer actor of that role."""
        if role not in self.hosted:
            raise KeyError(f"learner-{self.role}-{self.rank} hosts no {role} scorer (it hosts {sorted(self.hosted) or 'none'})")
        return getattr(self.hosted[role], method)(*args, **kwargs)

    # ------------------------------------------------------------------ checkpoints / export
    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Weights and optimizer state (every rank writes its part)."""
        self.engine.save_checkpoint(directory, tag=tag)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.load_checkpoint(directory, tag=tag)

    def export(self, out_dir: str) -> str | None:
        """A Hugging Face directory of the current weights in the training dtype (rank 0 writes it;
        under ZeRO-3 every rank takes part in the per-parameter gathers)."""
        sd = full_state_dict(self.engine, self.rank, torch_dtype(self.settings.precision))
        if sd is None:
            return None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_dir)
        if self.role == "policy":
            self.engine.module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
            tok.save_pretrained(out_dir)
        else:
            self.engine.module.save_pretrained(out_dir, tokenizer=tok, state_dict=sd)
        return out_dir

    # ------------------------------------------------------------------ weight transfer to vLLM (policy)
    # The trainer side of cluster/weight_sync/ (gloo, nccl, ipc); the driver side calls these in the
    # order its transport documents (rank 0 sends; every rank takes part in ZeRO-3 gathers).
    def transfer_init(self, method: str, init_info: dict | None) -> dict | None:
        """Join the transfer (gloo/nccl: blocks until every rollout worker joins). ipc returns the
        rollout workers' init_info."""
        self.sender = make_sender(method)
        if method == "ipc":
            return self.sender.init(self.rank)
        self.sender.init(init_info, self.rank)
        return None

    def transfer_metadata(self) -> dict:
        """{names, dtype_names, shapes} of the weights, in the order `_named_weights` yields them."""
        return transfer_metadata(self.engine.module.named_parameters())

    def _named_weights(self, copy: bool = False):
        """(HF name, full tensor) per parameter; ZeRO-3 gathers one parameter at a time (a
        collective: every rank iterates). `copy` keeps a gathered tensor valid after its gather ends."""
        zero3 = self.engine.zero_optimization_stage() == 3
        for name, data in gathered_parameters(self.engine):
            yield name, (data.clone() if copy and zero3 else data)

    def transfer_send(self, update_info: dict) -> float:
        """gloo/nccl: broadcast the weights (run concurrently with the rollout workers' apply)."""
        return self.sender.send(self._named_weights(), update_info)[0]

    def transfer_export(self) -> dict | None:
        """ipc: CUDA IPC handles of the weights (rank 0 returns the update_info)."""
        return self.sender.export(self._named_weights(copy=True))

    def transfer_release(self) -> None:
        self.sender.release()

    def transfer_shutdown(self) -> None:
        if self.sender is not None:
            self.sender.shutdown()
        self.sender = None

    def ready(self) -> str:
        return f"{self.role}-{self.rank}"
