"""One constraint per harm category on Ray, end to end (issue 29, section 3): the small pipeline's
run with `cost.per_category: true` and `safe_rlhf.constraints: per_category`, resumed as a user
resumes it on the session's test cluster: the cost fit runs again with a head per frequent
category, and round 1 keeps a multiplier and a threshold per constraint."""
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def category_round(small_pipeline, ray_cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("category_round") / "run"
    shutil.copytree(small_pipeline["run_dir"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["cost"].update(per_category=True, min_category_pairs=10)
    cfg["safe_rlhf"].update(constraints="per_category", steps_per_round=3)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("resume", "--run-dir", run, "--until", "safe_rlhf@1", env=ray_cluster.driver_env, timeout=1200)
    return {"run": run, "proc": proc}


def test_the_cost_fit_runs_again_with_a_head_per_frequent_category(category_round):
    from actors.score_model import ScoreModel

    stage = Path(category_round["run"]) / "stages" / "fit_cost"
    model = ScoreModel.from_pretrained(stage / "model")
    assert len(model.categories) >= 2
    log = category_round["proc"].stderr
    assert f"cost heads per category ({len(model.categories)}): {', '.join(model.categories)}" in log
    assert "skip  fit_reward" in log  # the reward fit reads nothing that changed
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    accuracies = {k: v for k, v in metrics.items() if k.startswith("eval_sign_accuracy_")}
    assert set(accuracies) == {f"eval_sign_accuracy_{c}" for c in model.categories}
    assert all(0.0 <= v <= 1.0 for v in accuracies.values())


def test_round_keeps_a_multiplier_and_a_threshold_per_constraint(category_round):
    from actors.score_model import score_model_categories

    run = Path(category_round["run"])
    constraints = ["shared", *score_model_categories(run / "stages" / "fit_cost" / "model")]
    stage = run / "stages" / "safe_rlhf@1"
    steps = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        lambdas = [m[f"lambda_{c}"] for c in constraints]
        # the loss's lambda is their sum, capped at lambda_max (the small pipeline's default 5)
        assert m["lambda"] == pytest.approx(min(sum(lambdas), 5.0), rel=1e-5)
        assert {f"episode_cost_{c}" for c in constraints} | {f"cost_mean_{c}" for c in constraints} <= set(m)
        assert m["cost_mean_shared"] == pytest.approx(m["cost_mean"], rel=1e-5)  # column 0 is the shared head
    # each multiplier moves on its own costs (lambda_lr 0.5): after three steps they no longer agree
    last = [steps[-1][f"lambda_{c}"] for c in constraints]
    assert len({round(v, 4) for v in last}) > 1
    assert all(steps[0][f"lambda_{c}"] != steps[-1][f"lambda_{c}"] for c in constraints)
    manifest = json.loads((stage / "manifest.json").read_text())["metrics"]
    thresholds = [manifest[f"threshold_{c}"] for c in constraints]
    assert manifest["threshold"] == thresholds[0]
    assert len(set(thresholds)) == len(thresholds)  # threshold auto on each head's own scale
    assert "auto per constraint" in manifest["threshold_rule"]
    # the checkpoint holds every multiplier, by name, for resume
    from stages.safe_rlhf.checkpoints import RoundCheckpoints

    saved = RoundCheckpoints(stage / "ckpt").latest()
    assert saved["step"] == 3 and saved["lagrange"]["categories"] == constraints
    assert [math.exp(m["log_lambda"]) for m in saved["lagrange"]["multipliers"]] == pytest.approx(last, rel=1e-5)
