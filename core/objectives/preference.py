"""The preference-model losses: reward model R (paper Eq. 5) and cost model C (Eq. 6), and their accuracies.

Shapes as in core/objectives/__init__.py."""
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---------------------------------------------------------------- preference losses


def _l2(*scores: Tensor) -> Tensor:
    return torch.cat(scores).pow(2).mean()  # mean(s^2) over all scores in the batch


def reward_pair_loss(better: Tensor, worse: Tensor, regularization: float = 0.0) -> Tensor:
    """Eq. 5: -log sigma(R(y_w) - R(y_l)), plus an optional score-magnitude penalty."""
    loss = -F.logsigmoid(better - worse).mean()  # [B] -> scalar
    return loss + regularization * _l2(better, worse)


def _masked_row_mean(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Mean of x [B] over the rows where `rows` [B] is True (all rows if None; 0 if none)."""
    if rows is None:
        return x.mean()
    rows = rows.bool()
    return x[rows].mean() if rows.any() else x.new_zeros(())


def cost_pair_loss(
    safer: Tensor,
    unsafer: Tensor,
    safer_is_safe: Optional[Tensor] = None,
    unsafer_is_safe: Optional[Tensor] = None,
    regularization: float = 0.0,
    has_safety_labels: Optional[Tensor] = None,
) -> Tensor:
    """Eq. 6: -log sigma(C(y_unsafer) - C(y_safer)) - sum over both answers of log sigma(-s * C(y)).

    s = +1 for a safe answer (pushed below zero cost), -1 for an unsafe one (pushed
    above zero). Without safety labels (both `*_is_safe` None, e.g. HH-RLHF), only
    the pairwise term is used. `has_safety_labels` [B] bool restricts the two sign
    terms to the labelled rows (each averaged over those rows; 0 if there are none);
    the pairwise term always averages over all B rows.
    """
    if (safer_is_safe is None) != (unsafer_is_safe is None):
        raise ValueError("give both safer_is_safe and unsafer_is_safe, or neither")
    loss = -F.logsigmoid(unsafer - safer).mean()  # [B] -> scalar
    if safer_is_safe is not None:
        for cost, is_safe in ((safer, safer_is_safe), (unsafer, unsafer_is_safe)):
            s = 2.0 * is_safe.to(cost.dtype) - 1.0  # +1 safe, -1 unsafe; [B]
            loss = loss + _masked_row_mean(-F.logsigmoid(-s * cost), has_safety_labels)  # -log sigma(-s c)
    return loss + regularization * _l2(safer, unsafer)


def pair_accuracy(preferred: Tensor, other: Tensor) -> float:
    """Share of pairs with preferred > other."""
    return (preferred > other).float().mean().item()


def sign_accuracy(costs: Tensor, is_safe: Tensor) -> float:
    """Share of answers whose cost sign is right: cost < 0 exactly when the answer is safe."""
    return ((costs < 0) == is_safe.bool()).float().mean().item()


# ---------------------------------------------------------------- a linear head on fixed features


def fit_linear_head(preferred: Tensor, other: Tensor, loss_of_scores, l2: float = 0.0,
                    max_iter: int = 500) -> tuple[Tensor, Tensor, float]:
    """A linear score head on fixed features (a frozen backbone's pooled hidden states): minimise
    loss_of_scores(preferred @ w + b, other @ w + b) + l2 * sum(w^2) by full-batch L-BFGS.

    preferred, other: [N, H] features of each pair's two answers; loss_of_scores maps their [N]
    scores to the fit's loss (Eq. 5 or Eq. 6, with the sign terms). Starts from zero; the problem is
    convex for both losses, so the result does not depend on the start. -> (w [H], b [], loss)."""
    w = torch.zeros(preferred.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    fa, fb = preferred.double(), other.double()  # float64: L-BFGS's line search stalls early in float32
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = loss_of_scores(fa @ w + b, fb @ w + b) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    with torch.no_grad():
        final = (loss_of_scores(fa @ w + b, fb @ w + b) + l2 * w.pow(2).sum()).item()
    return w.detach().to(preferred.dtype), b.detach().to(preferred.dtype), final
