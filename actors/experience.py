"""What roles exchange: small frozen dataclasses whose fields say their shape and meaning, and
the one place that decides padding. A leaf module: torch only, no import from this project.

Sequence layout (B sequences, P prompt columns, T response columns):

    input_ids  [B, P+T] = [ left-padded prompt (P) | right-padded response (T) ]

so every row's response starts at column P, and per-token tensors over the response are [B, T]
slices. Position ids come from the attention mask, so left padding does not shift positions
(the engines generate from unpadded prompts; the learner must see the same positions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def pad(seqs: list[list[int]], pad_id: int, side: str = "right", dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, L], attention mask [B, L]) with L the longest sequence."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.as_tensor(s, dtype=dtype)
        mask[i, sl] = 1
    return ids, mask


def pad_values(rows: list[list[float]], side: str = "right", value: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Ragged float rows -> [B, L], padded with `value`."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            out[i, sl] = torch.as_tensor(r, dtype=dtype)
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] position ids that start at 0 on each row's first real token (any padding side)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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


@dataclass(frozen=True)
class PolicyMinibatch:
    seqs: SequenceBatch
    old_logp: torch.Tensor  # [B, T] policy logprobs at rollout time
    reward_advantages: torch.Tensor  # [B, T]
    cost_advantages: torch.Tensor | None  # [B, T]; None for reward-only algorithms
    lagrange_lambda: float  # lambda of this step (no gradient)

    def select(self, rows) -> "PolicyMinibatch":
        return PolicyMinibatch(self.seqs.select(rows), self.old_logp[rows], self.reward_advantages[rows],
                               None if self.cost_advantages is None else self.cost_advantages[rows],
                               self.lagrange_lambda)


@dataclass(frozen=True)
class CriticMinibatch:
    seqs: SequenceBatch
    old_values: torch.Tensor  # [B, T] critic values at rollout time
    returns: torch.Tensor  # [B, T] GAE returns

    def select(self, rows) -> "CriticMinibatch":
        return CriticMinibatch(self.seqs.select(rows), self.old_values[rows], self.returns[rows])
