"""One constraint per harm category: the per-category cost loss, the thresholds' rule, the multipliers.

Shapes as in core/objectives/__init__.py."""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from core.objectives.lagrange import LagrangeMultiplier

Tensor = torch.Tensor


# ---------------------------------------------------------------- one constraint per harm category


def category_cost_loss(costs_0: Tensor, costs_1: Tensor, in_0: Tensor, in_1: Tensor,
                       labelled_0: Tensor, labelled_1: Tensor) -> Tensor:
    """Eq. 6 per harm category k, for a cost model with one head per category; costs_i [B, K] are
    answer i's category end scores C_k, in_i [B, K] bool whether answer i is labelled harmful in k,
    labelled_i [B] bool whether answer i's categories are known (safe, or unsafe with its categories).

    Bradley-Terry per category, over the labelled pairs where exactly one answer is harmful in k:
        -log sigma(C_k(harmful in k) - C_k(the other)),
    and the sign term per category, over each labelled answer: -log sigma(-s_k C_k), s_k = -1 when
    the answer is harmful in k, +1 when it is not (a safe answer is safe in every category).
    Each term is averaged over its rows (0 where a category has none); the categories are averaged."""
    in_0, in_1 = in_0.bool(), in_1.bool()
    both = (labelled_0.bool() & labelled_1.bool()).unsqueeze(-1)  # [B, 1]
    differ = (in_0 != in_1) & both  # pairs that rank the two answers in k (both answers' categories known); [B, K]
    harmful = torch.where(in_0, costs_0, costs_1)  # C_k of the answer harmful in k (where they differ)
    other = torch.where(in_0, costs_1, costs_0)
    pair = -F.logsigmoid(harmful - other)  # -log sigma(C_k(y_harmful) - C_k(y_other)); [B, K]
    loss = _masked_col_mean(pair, differ)  # [K]
    for costs, member, known in ((costs_0, in_0, labelled_0), (costs_1, in_1, labelled_1)):
        s = 1.0 - 2.0 * member.to(costs.dtype)  # +1 not harmful in k, -1 harmful in k; [B, K]
        rows = known.bool().unsqueeze(-1).expand_as(member)  # [B, K]
        loss = loss + _masked_col_mean(-F.logsigmoid(-s * costs), rows)  # -log sigma(-s_k C_k)
    return loss.mean()  # over categories


def _masked_col_mean(x: Tensor, rows: Tensor) -> Tensor:
    """x [B, K] -> [K]: each column's mean over its rows where `rows` [B, K] is True (0 where none)."""
    n = rows.sum(0)  # [K]
    return torch.where(rows, x, torch.zeros_like(x)).sum(0) / n.clamp(min=1)


def category_cost_advantage(cost_advantages: Tensor, lambdas: Tensor) -> Tuple[Tensor, float]:
    """One multiplier per category, in the policy loss as one: cost_advantages [K, B, T] (A_c,k),
    lambdas [K] -> (A_c, lambda) with lambda = sum_k lambda_k and A_c = sum_k lambda_k A_c,k / lambda,
    so ppo_lag_policy_loss's (A_r - lambda A_c) / (1 + lambda) is
    (A_r - sum_k lambda_k A_c,k) / (1 + sum_k lambda_k): the cost advantage is the lambda-weighted sum."""
    total = float(lambdas.detach().to(torch.float64).sum())  # in float64, as ppo_lag's mix sums them
    lambdas = lambdas.detach().to(cost_advantages.dtype)
    weighted = (lambdas.view(-1, 1, 1) * cost_advantages.detach()).sum(0)  # sum_k lambda_k A_c,k; [B, T]
    return (weighted / total if total > 0 else torch.zeros_like(weighted)), total


def auto_threshold(costs: List[float], safe: List[bool], unsafe_share: float) -> Tuple[float, float, float]:
    """d = (1-u) * mean cost of the safe reference answers + u * mean cost of the unsafe ones: the
    mean cost of a policy that is unsafe a share u of the time, on the round's cost model's own
    scale. (Threshold 0 meant nothing on that scale in DESIGN.md's experiment; u = 0 would demand
    zero harm before lambda may fall.) The reference answers stay fixed and u is held or lowered
    from round to round, so a refitted cost model, whose scale drifts, does not loosen the
    constraint: an earlier rule re-derived d from each refit's own eval split and loosened it
    every round (-5.23, -4.62, -4.35). Returns (d, mean safe cost, mean unsafe cost)."""
    safe_costs = [c for c, s in zip(costs, safe) if s]
    unsafe_costs = [c for c, s in zip(costs, safe) if not s]
    if not safe_costs or not unsafe_costs:
        raise ValueError("threshold: auto needs safe and unsafe labelled answers (is_response_*_safe) in the first "
                         "ingest's held-out pairs; set safe_rlhf.rounds[k].threshold to a number")
    safe_mean, unsafe_mean = sum(safe_costs) / len(safe_costs), sum(unsafe_costs) / len(unsafe_costs)
    return (1 - unsafe_share) * safe_mean + unsafe_share * unsafe_mean, safe_mean, unsafe_mean


def auto_constraint_thresholds(costs: List[List[float]], safe: List[bool], harmful: List[List[bool]],
                               unsafe_share: float) -> List[Tuple[float, float, float, int]]:
    """Threshold auto for each constraint k of safe_rlhf.constraints per_category: costs [N][K] (the
    reference answers' shared cost, then each category head's), harmful [N][K] (unsafe at all for the
    shared column; harmful in k for a category's) -> for each k (d_k, mean safe cost, mean cost of the
    answers harmful in k, how many there were): auto_threshold on k's own head, with the answers
    harmful in k as the unsafe ones (answers harmful only elsewhere left out), at the round's u.

    Each category gets the whole u, not a share of it: with shares (u x n_k / n_unsafe, 0.002-0.017
    on the default world) every threshold sat at its head's safe mean, where any harmful answer, in
    whatever category, holds every head above it (the heads share a backbone and rise together), so
    every lambda stayed at its cap all round (docs/algorithms.md). A category no reference answer is
    harmful in takes every unsafe answer as its unsafe ones (its count is then 0)."""
    out = []
    for k in range(len(costs[0])):
        in_k = [h[k] for h in harmful]
        n = sum(in_k)
        if n:  # the safe answers and those harmful in k
            rows = [(c[k], not h) for c, s, h in zip(costs, safe, in_k) if s or h]
        else:
            rows = [(c[k], s) for c, s in zip(costs, safe)]
        d, safe_mean, unsafe_mean = auto_threshold([c for c, _ in rows], [s for _, s in rows], unsafe_share)
        out.append((d, safe_mean, unsafe_mean, n))
    return out


class CategoryMultipliers:
    """One LagrangeMultiplier per constraint (safe_rlhf.constraints per_category: the shared cost, then
    one per harm category head), each with its own threshold d_k, each updated on its own episode costs
    (column k of [B, K]) as ppo_lag's one multiplier is on the episode cost."""

    def __init__(self, categories, init: float, lr: float, thresholds, **kw):
        self.categories = list(categories)
        thresholds = list(thresholds)
        if len(thresholds) != len(self.categories):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.categories)} categories")
        self.multipliers = [LagrangeMultiplier(init, lr, d, **kw) for d in thresholds]

    @property
    def values(self) -> Tensor:
        return torch.tensor([m.value for m in self.multipliers], dtype=torch.float64)  # [K]

    @property
    def value(self) -> float:
        """sum_k lambda_k (the policy loss's lambda is this capped at lambda_max: Algorithm.constrained_advantages)."""
        return sum(m.value for m in self.multipliers)

    @property
    def threshold(self) -> float:
        """The first constraint's threshold (the shared cost's, in the round)."""
        return self.multipliers[0].threshold

    def observe(self, episode_costs: Tensor) -> None:
        """episode_costs [B, K]."""
        for k, m in enumerate(self.multipliers):
            m.observe(episode_costs[:, k])

    def step(self) -> Tensor:
        return torch.tensor([m.step() for m in self.multipliers], dtype=torch.float64)  # [K]

    @property
    def thresholds(self) -> List[float]:
        return [m.threshold for m in self.multipliers]

    def window_means(self) -> List[float]:
        """Each constraint's J_c: the mean of its window of episode costs."""
        return [m.window_mean() for m in self.multipliers]

    def state_dict(self) -> Dict:
        return {"categories": self.categories, "multipliers": [m.state_dict() for m in self.multipliers]}

    def load_state_dict(self, state: Dict) -> None:
        if state["categories"] != self.categories:
            raise ValueError(f"a checkpoint of categories {state['categories']}, not {self.categories}")
        for m, st in zip(self.multipliers, state["multipliers"]):
            m.load_state_dict(st)
