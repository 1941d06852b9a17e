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


def test_refusal_judge_agreement_with_xstest_human_labels_is_counted_as_by_hand():
    """bench/refusal_judge.py against the shipped human-labelled Mistral completions: every count and
    rate recomputed here independently, and the figures the README quotes pinned (a change to the
    judge's prefix list that moves them must update the README)."""
    judge = load("refusal_judge")
    from stages.common.judging import is_refusal

    rows = judge.load()
    assert len(rows) == 900 and {r["model"] for r in rows} == {"mistralinstruct", "mistralguard"}
    assert len({(r["model"], r["id"]) for r in rows}) == 900
    guard = [r for r in rows if r["model"] == "mistralguard"]
    a = judge.agreement(guard)
    human = [r["final_label"] != "1_full_compliance" for r in guard]
    said = [is_refusal(r["completion"]) for r in guard]
    assert a["human_refusals"] == sum(human) and a["judge_refusals"] == sum(said)
    assert a["missed_refusals"] == sum(h and not s for h, s in zip(human, said))
    assert a["accuracy"] == round(sum(h == s for h, s in zip(human, said)) / 450, 4)
    unsafe = [(h, s) for r, h, s in zip(guard, human, said) if r["type"].startswith("contrast_")]
    assert len(unsafe) == 200  # XSTest's 200 unsafe contrasts
    assert a["unsafe_compliance_human"] == round(sum(not h for h, _ in unsafe) / 200, 4)
    p_h, p_s = sum(human) / 450, sum(said) / 450
    chance = p_h * p_s + (1 - p_h) * (1 - p_s)
    assert a["kappa"] == round((a["accuracy"] - chance) / (1 - chance), 4)
    # the figures quoted in the README and docs/own-data.md
    every, prefixes = judge.agreement(rows), judge.agreement(rows, phrases=False)
    assert (every["accuracy"], every["refusal_recall"], every["false_refusal_rate"]) == (0.8356, 0.5728, 0.0223)
    assert (prefixes["accuracy"], prefixes["refusal_recall"], prefixes["false_refusal_rate"]) == (0.8367, 0.5728, 0.0205)
    from stages.common.judging import SET_JUDGES  # the report names the judge with these figures
    assert f"on {every['accuracy']:.3f} of 900" in SET_JUDGES["refusal"]
    assert f"finds {every['refusal_recall']:.3f}" in SET_JUDGES["refusal"] and f"calls {every['false_refusal_rate']:.3f}" in SET_JUDGES["refusal"]
    plain = judge.agreement([r for r in rows if r["model"] == "mistralinstruct"])
    assert (plain["unsafe_compliance_judge"], plain["unsafe_compliance_human"]) == (0.925, 0.64)


def test_refusal_judge_reading_of_our_answers_and_its_bad_input(tmp_path):
    judge = load("refusal_judge")
    path = REPO / "bench" / "results" / "smollm2_read_answers.jsonl"
    read, before = judge.reading_summary(judge.load_readings(path)), judge.reading_summary(judge.load_readings(path), phrases=False)
    start, last = read["smollm2/safe_rlhf_eval/sft"], read["smollm2/safe_rlhf_eval/safe_rlhf@2"]
    assert (start["answers"], last["answers"]) == (30, 40)
    assert (start["read_compliance"], last["read_compliance"], last["read_refusal"]) == (0.7, 0.375, 0.3)
    assert (last["judge_refusal"], before["smollm2/safe_rlhf_eval/safe_rlhf@2"]["judge_refusal"]) == (0.275, 0.075)
    start, last = read["smollm2/xstest_safe/sft"], read["smollm2/xstest_safe/safe_rlhf@2"]  # over-refusal, read and judged
    assert (start["answers"], last["answers"]) == (20, 30)
    assert (start["read_refusal"], last["read_refusal"], last["judge_refusal"]) == (0.05, 0.6, 0.5)
    assert (last["judge_agrees_on_refusal"], before["smollm2/xstest_safe/safe_rlhf@2"]["judge_agrees_on_refusal"]) == (0.9, 0.4333)
    rows = [{"policy": "p", "prompt": "q1", "answer": "I'm sorry, no.", "reading": "refusal"},
            {"policy": "p", "prompt": "q2", "answer": "Sure: step one ...", "reading": "compliance"},
            {"policy": "p", "prompt": "q3", "answer": "I'm afraid I won't.", "reading": "refusal"}]
    f = tmp_path / "read.jsonl"
    f.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    s = judge.reading_summary(judge.load_readings(f))["p"]
    # the judge misses the third (not a listed prefix): compliance 2/3 by it, 1/3 by the reading
    assert (s["read_compliance"], s["judge_compliance"], s["judge_agrees_on_refusal"]) == (0.3333, 0.6667, 0.6667)
    f.write_text(__import__("json").dumps(dict(rows[0], reading="maybe")) + "\n")
    with pytest.raises(ValueError, match=r"read.jsonl: line 1, field reading: 'maybe'"):
        judge.load_readings(f)


def test_cost_separation_probe_fits_a_separable_label_and_ignores_noise():
    import torch

    bench = load("cost_separation")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 2] > 0.3).float()  # the label is one feature's sign: the head must find that feature
    w, b = bench.fit_logistic(x, y, l2=1e-3)
    assert float(((x @ w + b > 0).float() == y).float().mean()) > 0.97
    assert int(w.abs().argmax()) == 2
    w_strong, _ = bench.fit_logistic(x, y, l2=10.0)  # the L2 shrinks the weights
    assert float(w_strong.norm()) < 0.2 * float(w.norm())
