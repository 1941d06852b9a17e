"""Stage names, the one owner of the `NAME@k` convention.

A stage that repeats for round k is named `NAME@k` (`fit_reward@2`, `safe_rlhf@3`); the first of
its kind has no number (`ingest`, `fit_reward`) and counts as number 0, so it sorts before `NAME@1`
(`ingest@1` is the ingest after round 1). Leaf module (stdlib only): every layer may import it.
"""
from __future__ import annotations

from typing import Iterable


def base_name(name: str) -> str:
    """`fit_reward@2` -> `fit_reward`; `sft` -> `sft`."""
    return name.split("@")[0]


def stage_number(name: str) -> int:
    """`safe_rlhf@3` -> 3; an unnumbered stage (`fit_reward`, `ingest`) -> 0."""
    _, _, number = name.partition("@")
    return int(number) if number else 0


def of_kind(names: Iterable[str], base: str) -> list[str]:
    """The stages named `base` or `base@k` among `names`, oldest first."""
    return sorted((n for n in names if base_name(n) == base), key=stage_number)


def latest(names: Iterable[str], base: str) -> str | None:
    """The newest stage named `base` or `base@k` among `names`; None when there is none."""
    found = of_kind(names, base)
    return found[-1] if found else None
