"""Confidence intervals for evaluation figures. A leaf module: the standard library only.

- `wilson(k, n)`: the Wilson score interval of a rate k/n (95% by default): well behaved near 0
  and 1, where the normal approximation gives negative lower bounds.
- `cluster_bootstrap(groups)`: a percentile interval for a mean over answers grouped by prompt,
  resampling whole prompts (answers to one prompt are not independent).
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
