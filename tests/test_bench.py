"""The benchmarks' own arithmetic (the benchmarks themselves print figures; they are not tests)."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_step_counts_the_time_some_actor_runs_once_however_many_run_together():
    covered_s = load("round_step").covered_s
    spans = sorted([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.2, 5.4)])  # overlapping, and one inside another
    # window 0.5-5.5: 0.5-3 (2.5 s, two actors at once for part of it) and 5-5.5 (0.5 s)
    assert covered_s(spans, 0.5, 5.5) == pytest.approx(3.0)
    assert covered_s(spans, 3.0, 5.0) == 0.0  # nothing runs: all of it is the driver's and Ray's
    assert covered_s(spans, 0.0, 10.0) == pytest.approx(4.0)
    assert covered_s([(0.0, 10.0), (2.0, 3.0)], 1.0, 4.0) == pytest.approx(3.0)
