"""Advantage estimators: GAE on critics' values, and the critic-free group-normalised advantages of grpo_lag.

Shapes as in core/objectives/__init__.py."""
from dataclasses import dataclass
from typing import Optional

import torch

from core.objectives.tokens import gae, kl_shaped_rewards

Tensor = torch.Tensor


# ---------------------------------------------------------------- advantage estimators

# eps of the group baseline's std: a group whose answers all score the same gets advantage 0, not 0/0
GROUP_STD_EPS = 1e-6


@dataclass(frozen=True)
class StepScores:
    """One step's scored rollouts: what an algorithm turns into advantages."""
    reward: Tensor  # [B] reward model end scores R(x, y)
    cost: Optional[Tensor]  # [B] cost model end scores C(x, y); None when the algorithm uses no cost model
    logp: Tensor  # [B, T] behaviour policy logprobs of the sampled tokens
    ref_logp: Tensor  # [B, T] reference policy logprobs
    mask: Tensor  # [B, T] 1.0 on response tokens
    reward_values: Optional[Tensor] = None  # [B, T] reward critic values; None without that critic
    cost_values: Optional[Tensor] = None  # [B, T] cost critic values; None without that critic


@dataclass(frozen=True)
class AdvantageSettings:
    kl_coeff: float  # beta of the per-token KL penalty
    clip_score: float  # clip of the per-token shaped reward / cost
    gamma: float = 1.0  # GAE discount
    gae_lambda: float = 0.95  # GAE lambda
    shaping_nu: float = 1.0  # reward_shaping's fixed cost penalty
    group_size: int = 1  # answers per prompt, consecutive rows of the batch (grouped algorithms)
    group_scale: str = "group"  # grouped algorithms: divide by each group's std, or by the batch's (group_normalized)


@dataclass(frozen=True)
class Advantages:
    reward: Tensor  # [B, T] A_r
    cost: Optional[Tensor]  # [B, T] A_c; None for a reward-only algorithm
    reward_returns: Optional[Tensor]  # [B, T] the reward critic's targets; None without critics
    cost_returns: Optional[Tensor]  # [B, T] the cost critic's targets; None without that critic


def gae_advantages(s: StepScores, end_reward: Tensor, hp: AdvantageSettings) -> Advantages:
    """KL-shaped per-token rewards and costs, then GAE on each critic (paper Sec. 3.3)."""
    cost = s.cost if s.cost is not None else torch.zeros_like(s.reward)
    rewards, costs = kl_shaped_rewards(end_reward, cost, s.logp, s.ref_logp, s.mask, hp.kl_coeff, hp.clip_score)
    reward_adv, reward_ret = gae(s.reward_values, rewards, s.mask, hp.gamma, hp.gae_lambda)
    cost_adv = cost_ret = None
    if s.cost_values is not None:
        cost_adv, cost_ret = gae(s.cost_values, costs, s.mask, hp.gamma, hp.gae_lambda)
    return Advantages(reward_adv, cost_adv, reward_ret, cost_ret)


@torch.no_grad()
def group_normalized(x: Tensor, group_size: int, eps: float = GROUP_STD_EPS, scale: str = "group") -> Tensor:
    """x [B] -> (x - mean of its group) / (spread + eps) [B], each group `group_size` consecutive
    rows (one prompt's answers). scale "group": the spread is the group's own population std (GRPO);
    "batch": one std of every row's deviation from its group mean, over the whole batch, so a group
    whose answers barely differ keeps small advantages instead of noise blown up to unit spread."""
    if x.shape[0] % group_size:
        raise ValueError(f"a batch of {x.shape[0]} is not whole groups of {group_size}")
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    g = x.detach().view(-1, group_size)  # [B/G, G]
    dev = g - g.mean(-1, keepdim=True)  # [B/G, G]
    if scale == "group":
        std = g.std(-1, correction=0, keepdim=True)  # [B/G, 1]
    else:
        std = dev.pow(2).mean().sqrt()  # [], the batch's within-group population std
    return (dev / (std + eps)).view(-1)  # A_i = (x_i - mean_g) / (std + eps)


@torch.no_grad()
def group_advantages(s: StepScores, end_reward: Tensor, hp: AdvantageSettings) -> Advantages:
    """Critic-free (grpo_lag): each answer's episode totals of the KL-shaped per-token rewards and
    costs, normalised within its prompt's group (the group mean is the baseline, as in GRPO, Shao et
    al. 2024, arXiv 2402.03300, Sec. 4.1.2), each separately and before the policy loss combines them
    as (A_r - lambda A_c) / (1 + lambda): Constrained GRPO (arXiv 2602.05863) combines reward and cost
    after normalisation, because normalising a combined score would rescale lambda by the group's std.
    Every token of an answer gets its answer's advantage; no critic, no GAE.

    The KL to the reference stays in the per-token reward and cost (-beta KL_t, +beta KL_t) as in
    ppo_lag, rather than GRPO's separate KL loss term: the Lagrangian then trades the same
    KL-regularised returns as ppo_lag (the comparison isolates the baseline: critic or group), and
    the learner, its minibatch and its loss are ppo_lag's unchanged (no reference logprobs shipped
    to the learner)."""
    if s.cost is None:
        raise ValueError("group_advantages needs the cost scores")
    rewards, costs = kl_shaped_rewards(end_reward, s.cost, s.logp, s.ref_logp, s.mask, hp.kl_coeff, hp.clip_score)
    m = s.mask.to(rewards.dtype)  # [B, T]
    reward_adv = group_normalized(rewards.sum(-1), hp.group_size, scale=hp.group_scale)  # A_r from sum_t r_t; [B]
    cost_adv = group_normalized(costs.sum(-1), hp.group_size, scale=hp.group_scale)  # A_c from sum_t c_t; [B]
    return Advantages(reward_adv[:, None] * m, cost_adv[:, None] * m, None, None)  # [B, T] each
