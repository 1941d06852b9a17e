"""Padding token-id lists into tensors. One place decides padding side and masks."""
from __future__ import annotations

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
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            out[i, sl] = torch.as_tensor(r, dtype=dtype)
    return out
