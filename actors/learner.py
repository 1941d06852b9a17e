"""The learner role: a DeepSpeed engine for the policy or one of the two critics.

N learners of a role form one data-parallel torch.distributed group: the driver asks rank 0 for
an address and port (`master_address`), then calls `setup` on every rank at once (the group's
rendezvous). Each `train_step` gets this rank's shard of a minibatch; DeepSpeed averages the
gradients across the group.

- policy: a causal LM; `forward` gives per-token logprobs of the response [B, T]; the loss is
  `ppo_lag_policy_loss` from stages/objectives.py (all the math lives in that one pure module).
- reward_critic / cost_critic: score models started from the fitted reward / cost model;
  `forward` gives per-token values [B, T]; the loss is `clipped_value_loss`.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from actors.experience import (CriticMinibatch, PolicyMinibatch, SequenceBatch, response_logprobs,
                               response_values)

ROLES = ("policy", "reward_critic", "cost_critic")


def host_and_free_port() -> tuple[str, int]:
    """This node's address and a free port: a rendezvous point hosted by the calling process."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return socket.gethostbyname(socket.gethostname()), port


class Learner:
    def __init__(self, role: str, model_dir: str, settings: dict, rank: int = 0, world_size: int = 1):
        """settings: lr, zero_stage, precision, device, micro_batch, clip_ratio, clip_value, seed."""
        if role not in ROLES:
            raise ValueError(f"unknown learner role {role!r}; choose one of {ROLES}")
        self.role, self.model_dir, self.settings = role, model_dir, settings
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self.weight_sync = None  # cluster/weight_sync.py sender (policy, weight_sync != checkpoint)

    def master_address(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the group's rendezvous."""
        return host_and_free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the group and build the engine. Called on every rank at once."""
        # Each learner actor sees exactly one device (Ray sets CUDA_VISIBLE_DEVICES), so its local
        # rank is 0 whatever its rank in the group.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", DS_ACCELERATOR=self.settings["device"])
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if self.settings["device"] == "cpu" else "nccl",
                                   verbose=False)
        torch.manual_seed(self.settings.get("seed", 0) + self.rank)
        if self.role == "policy":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        else:
            from actors.score_model import ScoreModel

            model = ScoreModel.from_pretrained(self.model_dir, dtype=torch.float32)
        self.tokenizer_dir = self.model_dir
        from actors.deepspeed_engine import deepspeed_config

        ds = deepspeed_config({"per_device_batch_size": self.settings["micro_batch"], "gradient_accumulation": 1,
                               "lr": self.settings["lr"], "weight_decay": 0.0, "device": self.settings["device"],
                               "zero_stage": self.settings["zero_stage"], "precision": self.settings["precision"]},
                              self.world_size)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=ds)
        return self.rank

    @property
    def device(self):
        return self.engine.device

    # ------------------------------------------------------------------ forward / train
    def _forward(self, seqs: SequenceBatch) -> torch.Tensor:
        seqs = seqs.to(self.device)
        if self.role == "policy":
            return response_logprobs(self.engine, seqs)
        return response_values(self.engine, seqs)

    @torch.no_grad()
    def forward(self, seqs: SequenceBatch) -> torch.Tensor:
        """policy: logprobs [B, T]; critics: values [B, T]."""
        self.engine.eval()
        return self._forward(seqs).float().cpu()

    def train_step(self, batch: PolicyMinibatch | CriticMinibatch) -> dict:
        from actors.faults import maybe_die
        from stages.objectives import clip_fraction, clipped_value_loss, masked_mean, ppo_lag_policy_loss

        maybe_die("train_step")
        self.engine.train()
        mask = batch.seqs.response_mask.to(self.device).float()
        if self.role == "policy":
            logp = self._forward(batch.seqs)  # [B, T]
            old = batch.old_logp.to(self.device)
            loss = ppo_lag_policy_loss(logp, old, batch.reward_advantages.to(self.device),
                                       None if batch.cost_advantages is None else batch.cost_advantages.to(self.device),
                                       mask, batch.lagrange_lambda, self.settings["clip_ratio"])
            stats = {"policy_loss": loss.item(),
                     "clip_fraction": clip_fraction(logp.detach(), old, mask, self.settings["clip_ratio"]),
                     "policy_kl_old": masked_mean(old - logp.detach(), mask).item()}
        else:
            values = self._forward(batch.seqs)  # [B, T]
            loss = clipped_value_loss(values, batch.old_values.to(self.device), batch.returns.to(self.device),
                                      mask, self.settings["clip_value"])
            stats = {f"{self.role}_loss": loss.item()}
        self.engine.backward(loss)
        self.engine.step()
        return stats

    # ------------------------------------------------------------------ checkpoints / export
    def save_checkpoint(self, directory: str, tag: str) -> None:
        """Weights and optimizer state (every rank writes its part)."""
        self.engine.save_checkpoint(directory, tag=tag)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.load_checkpoint(directory, tag=tag)

    def export(self, out_dir: str) -> str | None:
        """A Hugging Face directory of the current weights (rank 0 writes it; ZeRO-3 is gathered)."""
        from actors.deepspeed_engine import full_state_dict

        sd = full_state_dict(self.engine, self.rank)
        if sd is None:
            return None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        if self.role == "policy":
            self.engine.module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
            tok.save_pretrained(out_dir)
        else:
            self.engine.module.save_pretrained(out_dir, tokenizer=tok, state_dict=sd)
        return out_dir

    # ------------------------------------------------------------------ weight transfer to vLLM (policy)
    # The methods of cluster/weight_sync.py's trainer side; cluster/roles.RolloutWeightSync calls them
    # in the order those classes document (rank 0 sends, every rank takes part in ZeRO-3 gathers).
    def transfer_master(self, method: str) -> tuple[str, int]:
        from cluster.weight_sync import transfer_class

        return transfer_class(method).pick_master()

    def transfer_init(self, method: str, init_info: dict | None) -> dict | None:
        """Join the transfer (gloo/nccl: blocks until every rollout worker joins). ipc returns the
        rollout workers' init_info."""
        from cluster.weight_sync import make_sync

        self.weight_sync = make_sync(method)
        if method == "ipc":
            return self.weight_sync.trainer_init(rank=self.rank, packed=False)
        self.weight_sync.trainer_init(init_info, rank=self.rank)
        return None

    def transfer_metadata(self) -> dict:
        """{names, dtype_names, shapes} of the weights, in the order `_named_weights` yields them."""
        from cluster.weight_sync import transfer_metadata

        return transfer_metadata(self.engine.module.named_parameters())

    def _named_weights(self, copy: bool = False):
        """(HF name, full tensor) per parameter; ZeRO-3 gathers one parameter at a time (a
        collective: every rank iterates). `copy` keeps a gathered tensor valid after its gather ends."""
        zero3 = self.engine.zero_optimization_stage() == 3
        for name, p in self.engine.module.named_parameters():
            if not zero3:
                yield name, p.data
                continue
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, (p.data.clone() if copy else p.data)

    def transfer_send(self, update_info: dict) -> float:
        """gloo/nccl: broadcast the weights (run concurrently with the rollout workers' apply)."""
        return self.weight_sync.send(self._named_weights(), update_info).seconds

    def transfer_export(self) -> dict | None:
        """ipc: CUDA IPC handles of the weights (rank 0 returns the update_info)."""
        return self.weight_sync.export(self._named_weights(copy=True))

    def transfer_release(self) -> None:
        self.weight_sync.release()

    def transfer_shutdown(self) -> None:
        if self.weight_sync is not None:
            self.weight_sync.shutdown()
        self.weight_sync = None

    def ready(self) -> str:
        return f"{self.role}-{self.rank}"
