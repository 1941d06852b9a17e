"""Confidence intervals for evaluation figures. A leaf module: the standard library only.

- `wilson(k, n)`: the Wilson score interval of a rate k/n (95% by default): well behaved near 0
  and 1, where the normal approximation gives negative lower bounds.
- `cluster_bootstrap(groups)`: a percentile interval for a mean over answers grouped by prompt,
  resampling whole prompts (answers to one prompt are not independent).
- `auc(high, low)` and `cluster_bootstrap_auc(high_groups, low_groups)`: how often a value of one
  sample exceeds one of the other (the area under the ROC curve), with the same interval by prompt.
"""
from __future__ import annotations

import math
import random
from statistics import NormalDist


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) for a share k of n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cluster_bootstrap(groups: list[list[float]], resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile interval of the mean of all values, resampling the groups (prompts)
    with replacement; deterministic by seed."""
    groups = [g for g in groups if g]
    if not groups:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    sums, counts = [sum(g) for g in groups], [len(g) for g in groups]
    means = []
    for _ in range(resamples):
        picks = [rng.randrange(len(groups)) for _ in groups]
        means.append(sum(sums[i] for i in picks) / sum(counts[i] for i in picks))
    means.sort()
    lo = means[int((1 - confidence) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + confidence) / 2 * resamples))]
    return lo, hi


def auc(high: list[float], low: list[float]) -> float:
    """P(a value of `high` > a value of `low`), ties counted half (the Mann-Whitney U over
    len(high) * len(low)): 1.0 when every `high` value is above every `low` one, 0.5 when the two
    cannot be told apart; nan when either is empty. By ranks, O(n log n)."""
    if not high or not low:
        return float("nan")
    values = sorted([(v, 1) for v in high] + [(v, 0) for v in low])
    rank_sum, i = 0.0, 0
    while i < len(values):  # tied values share the mean of their ranks (1-based)
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        rank_sum += (i + 1 + j) / 2 * sum(flag for _, flag in values[i:j])
        i = j
    n_high = len(high)
    return (rank_sum - n_high * (n_high + 1) / 2) / (n_high * len(low))


def cluster_bootstrap_auc(high_groups: list[list[float]], low_groups: list[list[float]], resamples: int = 1000,
                          confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile interval of `auc`, resampling the prompts of each side with
    replacement (a prompt's values are drawn together); deterministic by seed."""
    high_groups, low_groups = [g for g in high_groups if g], [g for g in low_groups if g]
    if not high_groups or not low_groups:
        return float("nan"), float("nan")
    rng = random.Random(seed)

    def draw(groups):
        return [v for _ in groups for v in groups[rng.randrange(len(groups))]]

    values = sorted(auc(draw(high_groups), draw(low_groups)) for _ in range(resamples))
    return values[int((1 - confidence) / 2 * resamples)], values[min(resamples - 1, int((1 + confidence) / 2 * resamples))]
