"""core/stage_names.py: the NAME@k convention, one owner (issue 32)."""
from core.stage_names import base_name, latest, of_kind, stage_number


def test_an_unnumbered_stage_is_the_first_of_its_kind():
    assert [stage_number(n) for n in ("ingest", "ingest@1", "fit_reward@2", "safe_rlhf@10")] == [0, 1, 2, 10]
    assert base_name("fit_cost@3") == "fit_cost" and base_name("sft") == "sft"
    names = ["ingest@2", "fit_reward", "ingest", "fit_reward@10", "fit_reward@2", "fit_reward_x", "ingest@1"]
    assert of_kind(names, "ingest") == ["ingest", "ingest@1", "ingest@2"]
    # numbers compare as numbers (10 after 2), and another stage that starts alike is not of the kind
    assert of_kind(names, "fit_reward") == ["fit_reward", "fit_reward@2", "fit_reward@10"]
    assert latest(names, "fit_reward") == "fit_reward@10" and latest(names, "evaluate") is None


def test_serve_and_the_sweep_find_a_runs_latest_finished_stages(tmp_path):
    """RunDir.finished_stages (a manifest: done) under serve's and the sweep's lookups."""
    from pipeline.config import parse_config
    from pipeline.rundir import RunDir
    from pipeline.serve import last_fitted, served_policies
    from pipeline.sweep import sweep_inputs

    for name in ("sft", "ingest", "ingest@1", "fit_reward", "fit_reward@2", "fit_reward@10", "fit_cost", "fit_cost@2",
                 "safe_rlhf@1", "safe_rlhf@2", "safe_rlhf@10"):
        (tmp_path / "stages" / name).mkdir(parents=True)
        (tmp_path / "stages" / name / "manifest.json").write_text("{}")
        (tmp_path / "stages" / name / ("policy" if name.startswith("safe_rlhf") else "model")).mkdir()
    (tmp_path / "stages" / "fit_cost@3").mkdir()  # interrupted: no manifest
    assert sorted(RunDir(tmp_path).finished_stages()) == sorted(p.name for p in (tmp_path / "stages").iterdir()
                                                                if p.name != "fit_cost@3")
    assert last_fitted(tmp_path, "fit_reward") == tmp_path / "stages" / "fit_reward@10" / "model"
    assert last_fitted(tmp_path, "fit_cost") == tmp_path / "stages" / "fit_cost@2" / "model"
    assert list(served_policies(tmp_path, parse_config({}), None)) == ["safe_rlhf@10"]
    inputs = sweep_inputs(tmp_path, parse_config({}), None)
    assert (inputs["reward_model"], inputs["cost_model"], inputs["train_pairs"]) == (
        str(tmp_path / "stages" / "fit_reward@10" / "model"), str(tmp_path / "stages" / "fit_cost@2" / "model"),
        str(tmp_path / "stages" / "ingest@1" / "train.parquet"))
    assert RunDir(tmp_path / "nowhere").finished_stages() == []
