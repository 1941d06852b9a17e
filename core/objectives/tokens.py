"""Token-level helpers: masked means, the KL-shaped reward, GAE (paper Sec. 3.3) and chunked log-probabilities.

Shapes as in core/objectives/__init__.py."""
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------- token-level helpers


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over sequences of each sequence's mean over its masked tokens.

    Sequences with no masked token are left out; returns 0 if none has a token.
    """
    m = mask.bool()  # [B, T]
    n = m.sum(-1)  # tokens per sequence; [B]
    per_seq = torch.where(m, x, torch.zeros_like(x)).sum(-1) / n.clamp(min=1)  # [B]
    has_tokens = n > 0
    if not has_tokens.any():
        return per_seq.sum() * 0.0  # 0, still attached to x's graph
    return per_seq[has_tokens].mean()


def last_token_index(mask: Tensor) -> Tensor:
    """[B, L] mask -> [B] index of each row's last 1 (0 for an empty row), whatever the padding side.

    A score model reads its end score here; reading at `mask.sum(1) - 1` instead is right only for
    right padding, and on left-padded rows reads the wrong token (DESIGN.md: it looked exactly like
    reward hacking).
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.bool()).argmax(-1)


def kl_shaped_rewards(
    reward: Tensor,
    cost: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coeff: float,
    clip: float,
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards and costs with a KL penalty toward the reference policy.

    rewards_t = -beta * (log pi - log pi_ref) and costs_t = +beta * (log pi - log pi_ref),
    with the end scores `reward`, `cost` [B] added at each sequence's last token;
    both are clamped to [-clip, clip] and zero off the mask. No gradient.
    """
    m = mask.bool()  # [B, T]
    kl = (logp - ref_logp).detach()  # per-token log-ratio; [B, T]
    rewards = -kl_coeff * kl  # r_t = -beta * KL_t
    costs = kl_coeff * kl  # c_t = +beta * KL_t
    rows = torch.nonzero(m.any(-1)).squeeze(-1)  # sequences with at least one token
    last = last_token_index(m)[rows]
    rewards[rows, last] += reward.detach().to(rewards.dtype)[rows]  # r_T += R(x, y)
    costs[rows, last] += cost.detach().to(costs.dtype)[rows]  # c_T += C(x, y)
    zero = torch.zeros_like(rewards)
    rewards = torch.where(m, rewards.clamp(-clip, clip), zero)
    costs = torch.where(m, costs.clamp(-clip, clip), zero)
    return rewards, costs


@torch.no_grad()
def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> Tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns (advantages, returns), both [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A zero after a sequence's last token; returns = A + V.
    """
    m = mask.to(values.dtype)  # [B, T]
    values = values.detach() * m
    rewards = rewards.detach().to(values.dtype) * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}; [B]
    next_advantage = torch.zeros_like(values[:, 0])  # A_{t+1}; [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # delta_t = r_t + gamma V_{t+1} - V_t
        next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]  # A_t = delta_t + gamma lam A_{t+1}
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * m  # R_t = A_t + V_t
    return advantages, returns


def token_logprobs(hidden: Tensor, targets: Tensor, project, chunk: Optional[int] = None,
                   temperature: float = 1.0) -> Tensor:
    """log softmax(project(hidden) / temperature)[target] for each token, `chunk` tokens at a time.

    hidden [N, H] (the final hidden states before the output layer), targets [N] long, `project`
    maps [n, H] to logits [n, V] (the model's output layer) -> [N] fp32 log-probabilities.
    The naive way materialises the logits of every token at once in fp32, and log_softmax a second
    copy: for 128 x 1,024 tokens and V = 32,000 that is 17 GB twice. Here at most [chunk, V]
    exists at a time, log p = logit[target] - logsumexp(logits) needs no second copy, and under
    autograd each chunk is recomputed in backward (torch.utils.checkpoint), so training keeps no
    logits either. chunk None: all tokens at once. temperature: the sampling temperature the tokens
    were drawn at, so that these are the log-probabilities of the policy that sampled them.
    """

    def chunk_logprobs(h: Tensor, t: Tensor) -> Tensor:
        logits = project(h).float() / temperature  # [c, V]
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [c]

    n = hidden.shape[0]
    if chunk is None or chunk >= n:
        return chunk_logprobs(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    recompute = torch.is_grad_enabled()
    parts = [checkpoint(chunk_logprobs, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False) if recompute
             else chunk_logprobs(hidden[s:s + chunk], targets[s:s + chunk]) for s in range(0, n, chunk)]
    return torch.cat(parts)
