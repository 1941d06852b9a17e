"""stages/stage_names.py: the NAME@k convention, one owner (issue 32)."""
from stages.stage_names import base_name, latest, of_kind, stage_number


def test_an_unnumbered_stage_is_the_first_of_its_kind():
    assert [stage_number(n) for n in ("ingest", "ingest@1", "fit_reward@2", "safe_rlhf@10")] == [0, 1, 2, 10]
    assert base_name("fit_cost@3") == "fit_cost" and base_name("sft") == "sft"
    names = ["ingest@2", "fit_reward", "ingest", "fit_reward@10", "fit_reward@2", "fit_reward_x", "ingest@1"]
    assert of_kind(names, "ingest") == ["ingest", "ingest@1", "ingest@2"]
    # numbers compare as numbers (10 after 2), and another stage that starts alike is not of the kind
    assert of_kind(names, "fit_reward") == ["fit_reward", "fit_reward@2", "fit_reward@10"]
    assert latest(names, "fit_reward") == "fit_reward@10" and latest(names, "evaluate") is None
