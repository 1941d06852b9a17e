"""What roles exchange: small frozen dataclasses whose fields say their shape and meaning.

Sequence layout (B sequences, P prompt columns, T response columns):

    input_ids  [B, P+T] = [ left-padded prompt (P) | right-padded response (T) ]

so every row's response starts at column P, and per-token tensors over the response are [B, T]
slices. Position ids come from the attention mask, so left padding does not shift positions
(the engines generate from unpadded prompts; the learner must see the same positions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.batching import pad, pad_values


@dataclass(frozen=True)
class SequenceBatch:
    input_ids: torch.Tensor  # [B, P+T] long
    attention_mask: torch.Tensor  # [B, P+T] long
    prompt_width: int  # P

    @classmethod
    def from_ids(cls, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> "SequenceBatch":
        p_ids, p_mask = pad(prompt_ids, pad_id, side="left")  # [B, P]
        r_ids, r_mask = pad(response_ids, pad_id, side="right")  # [B, T]
        return cls(torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), p_ids.shape[1])

    @property
    def response_mask(self) -> torch.Tensor:  # [B, T]
        return self.attention_mask[:, self.prompt_width:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows) -> "SequenceBatch":
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.prompt_width)

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_width)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, batch: SequenceBatch) -> torch.Tensor:
    """Log-probabilities of the response tokens under a causal LM: [B, T] (0 past each response)."""
    P = batch.prompt_width
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids(batch.attention_mask)).logits  # [B, P+T, V]
    logits = logits[:, P - 1:-1].float()  # the logits that predict response tokens: [B, T, V]
    targets = batch.input_ids[:, P:]  # [B, T]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * batch.response_mask


def response_values(score_model, batch: SequenceBatch) -> torch.Tensor:
    """A critic's value of the state before each response token: [B, T] (0 past each response)."""
    P = batch.prompt_width
    values, _ = score_model(batch.input_ids, batch.attention_mask)  # [B, P+T]
    return values[:, P - 1:-1].float() * batch.response_mask


@dataclass(frozen=True)
class PolicyMinibatch:
    seqs: SequenceBatch
    old_logp: torch.Tensor  # [B, T] policy logprobs at rollout time
    reward_advantages: torch.Tensor  # [B, T]
    cost_advantages: torch.Tensor | None  # [B, T]; None for reward-only algorithms
    lagrange_lambda: float  # lambda of this step (no gradient)


@dataclass(frozen=True)
class CriticMinibatch:
    seqs: SequenceBatch
    old_values: torch.Tensor  # [B, T] critic values at rollout time
    returns: torch.Tensor  # [B, T] GAE returns


__all__ = ["SequenceBatch", "PolicyMinibatch", "CriticMinibatch", "response_logprobs", "response_values",
           "position_ids", "pad", "pad_values"]
