"""The scorer role: batched forward only, no gradients.

- `reward`, `cost`: a score model's end score per sequence, [B].
- `reference`: per-token logprobs of the response under the reference policy, [B, T].
"""
from __future__ import annotations

import torch

from actors.experience import SequenceBatch, response_logprobs

ROLES = ("reward", "cost", "reference")


class Scorer:
    def __init__(self, role: str, model_dir: str, device: str = "cpu", dtype: str = "fp32", batch_size: int = 128):
        if role not in ROLES:
            raise ValueError(f"unknown scorer role {role!r}; choose one of {ROLES}")
        from actors.rollout import _dtype

        self.role, self.device, self.batch_size = role, device, batch_size
        if role == "reference":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_dtype(dtype))
        else:
            from actors.score_model import ScoreModel

            self.model = ScoreModel.from_pretrained(model_dir, dtype=_dtype(dtype))
        self.model.to(device).eval()

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> torch.Tensor:
        """reward/cost: [B] end scores (at each sequence's last real token)."""
        if self.role == "reference":
            raise TypeError("the reference scorer gives logprobs, not scores")
        from actors.faults import maybe_die

        maybe_die("score")
        out = []
        for s in range(0, len(batch), self.batch_size):
            chunk = batch.select(slice(s, s + self.batch_size)).to(self.device)
            out.append(self.model(chunk.input_ids, chunk.attention_mask)[1].float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """reference: [B, T] per-token logprobs of the response."""
        if self.role != "reference":
            raise TypeError(f"the {self.role} scorer gives end scores, not logprobs")
        from actors.faults import maybe_die

        maybe_die("logprobs")
        out = []
        for s in range(0, len(batch), self.batch_size):
            chunk = batch.select(slice(s, s + self.batch_size)).to(self.device)
            out.append(response_logprobs(self.model, chunk).cpu())
        return torch.cat(out)

    def ready(self) -> str:
        return self.role
