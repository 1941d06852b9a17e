"""The PPO-Lagrangian policy and critic losses (paper Sec. 3.3) and their diagnostics.

Shapes as in core/objectives/__init__.py."""
from typing import Optional

import torch

from core.objectives.tokens import masked_mean

Tensor = torch.Tensor


# ---------------------------------------------------------------- PPO-Lagrangian losses


def ppo_lag_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Optional[Tensor],
    mask: Tensor,
    lagrange_lambda: float,
    clip_ratio: float,
) -> Tensor:
    """Clipped surrogate on the combined advantage (A_r - lambda * A_c) / (1 + lambda).

    `cost_advantages` None gives plain PPO (A = A_r). Advantages, old_logp and lambda
    carry no gradient.
    """
    if cost_advantages is None:
        advantages = reward_advantages.detach()  # A = A_r
    else:
        lagrange_lambda = float(lagrange_lambda)
        advantages = (reward_advantages.detach() - lagrange_lambda * cost_advantages.detach()) / (
            1.0 + lagrange_lambda
        )  # A = (A_r - lambda A_c) / (1 + lambda)
    ratio = torch.exp(logp - old_logp.detach())  # pi_theta / pi_old; [B, T]
    surrogate = torch.min(
        ratio * advantages,
        ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * advantages,
    )  # min(ratio A, clip(ratio, 1-eps, 1+eps) A)
    return masked_mean(-surrogate, mask)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = torch.max(torch.min(values, old_values + clip), old_values - clip)  # clip(V, V_old -+ eps)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)  # [B, T]
    return 0.5 * masked_mean(loss, mask)


@torch.no_grad()
def clip_fraction(logp: Tensor, old_logp: Tensor, mask: Tensor, clip_ratio: float) -> Tensor:
    """Share of masked tokens (pooled over the batch) whose ratio lies outside [1 - eps, 1 + eps]:
    a 0-dim tensor on the inputs' device (0 with no masked token), read by the caller when it syncs."""
    m = mask.bool()
    ratio = torch.exp(logp - old_logp)  # [B, T]
    outside = (ratio < 1.0 - clip_ratio) | (ratio > 1.0 + clip_ratio)
    return (outside & m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def approx_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> float:
    """masked_mean(log pi - log pi_ref), a sample estimate of KL(pi || pi_ref)."""
    return masked_mean(logp - ref_logp, mask).item()
