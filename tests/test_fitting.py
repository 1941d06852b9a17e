"""SFT, reward and cost fitting (in kept learners by default, or on Ray Train) with DeepSpeed: quality,
metrics, faults and resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def manifest(run_dir, stage):
    return json.loads((Path(run_dir) / "stages" / stage / "manifest.json").read_text())


def test_sft_model_is_helpful_but_unsafe(small_pipeline):
    m = manifest(small_pipeline["run_dir"], "sft")["metrics"]
    assert m["check_harmful_rate"] > 0.3  # like Alpaca-7B: it complies with harmful requests
    assert m["check_helpfulness"] > 1.5  # and answers benign ones with facts (an untrained model scores 0)
    assert m["eval_loss"] < m["eval_loss_curve"][0] * 1.01 and m["loss_curve"][-1] < m["loss_curve"][0]


def test_reward_and_cost_fits_beat_chance_on_held_out_pairs(small_pipeline):
    reward = manifest(small_pipeline["run_dir"], "fit_reward")["metrics"]
    cost = manifest(small_pipeline["run_dir"], "fit_cost")["metrics"]
    assert reward["eval_accuracy"] > 0.75 and reward["eval_pairs"] > 50
    assert cost["eval_accuracy"] > 0.75 and cost["eval_sign_accuracy"] > 0.8
    assert cost["safe_cost_mean"] < 0 < cost["unsafe_cost_mean"]
    assert reward["policy_accuracy"] is not None and reward["policy_pairs"] > 20
    assert cost["policy_accuracy"] > 0.6
    for stage in ("fit_reward", "fit_cost"):
        png = Path(small_pipeline["run_dir"]) / "stages" / stage / "score_hist.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_metrics_appear_in_status_json(small_pipeline):
    status = json.loads(run_cli("status", "--run-dir", small_pipeline["run_dir"], "--json").stdout)
    by_name = {s["name"]: s for s in status["stages"]}
    assert [s["name"] for s in status["stages"]][:5] == ["world", "ingest", "sft", "fit_reward", "fit_cost"]
    assert len(status["stages"]) == 8
    assert all(s["state"] == "done" for s in status["stages"])
    assert {"eval_accuracy", "policy_accuracy", "loss_curve"} <= set(by_name["fit_reward"]["metrics"])
    assert {"eval_accuracy", "eval_sign_accuracy", "policy_accuracy"} <= set(by_name["fit_cost"]["metrics"])


def test_fitted_model_reloads_with_the_recorded_accuracy(small_pipeline):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from actors.score_model import ScoreModel
    from stages.fit_preference import _items, preference_metrics, score_pairs

    run = Path(small_pipeline["run_dir"])
    model_dir = run / "stages" / "fit_reward" / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    items = _items(pq.read_table(run / "stages" / "ingest" / "eval.parquet").to_pylist(), "reward", tok,
                   {"max_prompt_tokens": 64, "max_answer_tokens": 48})
    a, b = score_pairs(ScoreModel.from_pretrained(model_dir).eval(), items, tok.pad_token_id, "cpu")
    recorded = manifest(run, "fit_reward")["metrics"]["eval_accuracy"]
    assert preference_metrics("reward", items, a, b)["eval_accuracy"] == pytest.approx(recorded, abs=1e-6)


@pytest.mark.parametrize("kind", ["reward", "cost"])
def test_policy_accuracy_is_the_exported_models_accuracy_on_the_fresh_pairs(small_pipeline, kind):
    """The Ray Train worker measures policy_accuracy on its engine; the exported model, scoring the
    SFT stage's fresh pairs the way a scorer actor does (its own tokenisation and batches), counts
    the same pairs right, and the oracle's ties are left out."""
    from actors.scorer import Scorer
    from core.files import read_jsonl

    run = Path(small_pipeline["run_dir"])
    rows = read_jsonl(run / "stages" / "sft" / "policy_pairs.jsonl")
    tie, label = ("better_is_tie", "better_response_id") if kind == "reward" else ("safer_is_tie", "safer_response_id")
    pairs = [r for r in rows if not r[tie]]
    assert 0 < len(pairs) < len(rows)  # some pairs are ties, and they are not counted
    scorer = Scorer(kind, str(run / "stages" / f"fit_{kind}" / "model"))
    prompts = [r["prompt"] for r in pairs]
    scores = scorer.score_texts(prompts + prompts, [r[f"response_{r[label]}"] for r in pairs]
                                + [r[f"response_{1 - r[label]}"] for r in pairs], 64, 48)
    right = [x > y if kind == "reward" else x < y for x, y in zip(scores[:len(pairs)], scores[len(pairs):])]
    m = manifest(run, f"fit_{kind}")["metrics"]
    assert m["policy_pairs"] == len(pairs)
    assert m["policy_accuracy"] == round(sum(right) / len(right), 4)
    assert m["policy_accuracy_curve"][-1] == m["policy_accuracy"] and len(m["policy_accuracy_curve"]) == 2


def _copy_run(small_pipeline, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(small_pipeline["run_dir"], dst)
    return dst


def test_a_learner_killed_during_its_fit_is_replaced_and_goes_on_from_the_last_checkpoint(small_pipeline, ray_cluster, tmp_path):
    """The default path (reward.runner auto, kept actors on CPU): the fit runs in the round's kept
    critic learner. SIGKILLed from outside by its PID (Ray's actor table) once a checkpoint is
    written, it is replaced by a new learner, which goes on from the newest checkpoint and trains
    the same model as the uninterrupted fit."""
    run = _copy_run(small_pipeline, tmp_path)
    ckpts = run / "stages" / "fit_reward" / "ray_train" / "fit_reward"
    shutil.rmtree(ckpts)  # the copied run's: the fit below writes its own
    before = {a["actor_id"] for a in ray_cluster.list_actors()}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--only-stage", "fit_reward"],
                            cwd=REPO, env=ray_cluster.driver_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, pids = time.time() + 600, []
        while not pids and time.time() < deadline:  # its PID first (the table is slow to ask), then the moment
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            pids = [int(a["pid"]) for a in ray_cluster.list_actors() if a["actor_id"] not in before
                    and a["name"] == "learner-reward_critic-0" and a["state"] == "ALIVE"]
        assert len(pids) == 1, pids
        while time.time() < deadline and not list(ckpts.glob("checkpoint_*")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        os.kill(pids[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "in the kept learner learner-reward_critic-0" in err and "learner-reward_critic-0 died during the fit" in err
    m = manifest(run, "fit_reward")["metrics"]
    uninterrupted = manifest(small_pipeline["run_dir"], "fit_reward")["metrics"]
    assert m["restarts"] == 1 and len(m["resumed_from_steps"]) == 1 and m["resumed_from_steps"][0] % 10 == 0
    assert m["global_step"] == uninterrupted["global_step"]  # and it finished the same number of steps
    assert (m["eval_accuracy"], m["train_loss"]) == (uninterrupted["eval_accuracy"], uninterrupted["train_loss"])


def test_ray_train_fits_the_same_model_as_a_kept_learner_and_restarts_a_crashed_worker(small_pipeline, tmp_path):
    """reward.runner ray_train (operational: the fit's fingerprint is the same): the fit on a Ray
    Train worker, crashed once at step 25, gives the model the kept learner gave, weight for weight."""
    import yaml
    from safetensors.torch import load_file

    run = _copy_run(small_pipeline, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["reward"]["runner"] = "ray_train"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SAFE_RLHF_FAULT": "fit_reward:25"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run), "--only-stage", "fit_reward"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray Train: 1 worker(s), cpu, fp32, ZeRO-0" in proc.stderr and "kept learner" not in proc.stderr
    assert list((run / "stages" / "fit_reward" / "ray_train" / "fit_reward").glob("checkpoint_manager_snapshot*"))  # Ray Train's
    m = manifest(run, "fit_reward")["metrics"]
    before = manifest(small_pipeline["run_dir"], "fit_reward")["metrics"]
    assert m["restarts"] == 1
    # Ray Train registers a report asynchronously, so a crash soon after the step-20 report may restore step 10
    assert m["resumed_from_steps"] in ([10], [20])
    assert {k: m[k] for k in ("global_step", "eval_accuracy", "policy_accuracy", "train_loss")} == \
        {k: before[k] for k in ("global_step", "eval_accuracy", "policy_accuracy", "train_loss")}
    ours, theirs = (load_file(r / "stages" / "fit_reward" / "model" / "model.safetensors")
                    for r in (run, Path(small_pipeline["run_dir"])))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_local_session_checkpoints_are_whole_the_newest_two_and_restored_newest_first(tmp_path, capsys):
    """cluster.train.LocalSession (a kept learner's fit): each report copies the checkpoint in under
    a temporary name and renames it, keeps the newest two, and restores the newest with a loop state;
    a half-written one (a process killed mid-copy) is never restored."""
    from cluster.train import LocalSession

    s = LocalSession(tmp_path / "fit_reward", "cpu")
    with s.latest_checkpoint() as d:
        assert d is None
    for step in (10, 20, 30):
        src = tmp_path / f"src{step}"
        src.mkdir()
        (src / "loop_state.json").write_text(json.dumps({"step": step}))
        s.report({"global_step": step}, str(src))
    kept = sorted(p.name for p in (tmp_path / "fit_reward").iterdir())
    assert len(kept) == 2 and all(k.startswith("checkpoint_") for k in kept)
    with s.latest_checkpoint() as d:
        assert json.loads((d / "loop_state.json").read_text()) == {"step": 30}
    (tmp_path / "fit_reward" / "checkpoint_9999-12-31_00-00-00.000000").mkdir()  # no loop state: partial
    (tmp_path / "fit_reward" / ".checkpoint_9999-12-31_00-00-01.000000.partial").mkdir()
    with s.latest_checkpoint() as d:
        assert json.loads((d / "loop_state.json").read_text()) == {"step": 30}
    assert "fit checkpoint " in capsys.readouterr().out  # the live view's progress line
    assert s.rank_world() == (0, 1) and str(s.device()) == "cpu"


def test_interrupted_fit_resumes_from_its_checkpoint(small_pipeline, tmp_path):
    run = _copy_run(small_pipeline, tmp_path)
    ckpt_root = run / "stages" / "fit_cost" / "ray_train" / "fit_cost"
    shutil.rmtree(run / "stages" / "fit_cost")  # as if fit_cost had never finished
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "resume", "--run-dir", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list(ckpt_root.glob("checkpoint_*")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        assert list(ckpt_root.glob("checkpoint_*")), "no checkpoint appeared"
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
    status = json.loads(run_cli("status", "--run-dir", run, "--json").stdout)
    state = {s["name"]: s["state"] for s in status["stages"]}
    assert state["fit_cost"] == "failed" and state["fit_reward"] == "done"
    out = run_cli("resume", "--run-dir", run, "--only-stage", "fit_cost", timeout=900)
    assert "resume fit_cost" in out.stderr
    m = manifest(run, "fit_cost")["metrics"]
    assert m["restarts"] == 1 and m["resumed_from_steps"] and m["resumed_from_steps"][0] >= 10
    assert m["eval_accuracy"] > 0.75


def test_two_workers_zero3_bf16_fit_over_gloo(small_pipeline, tmp_path):
    """The multi-worker path: two Ray Train workers form one gloo group, ZeRO-3 shards the model,
    bf16 compute; the exported model is the gathered whole (it reloads with the same accuracy)."""
    import yaml

    run = _copy_run(small_pipeline, tmp_path)
    cfg = yaml.safe_load(Path(small_pipeline["config"]).read_text())
    cfg["cost"].update(num_workers=2, zero_stage=3, precision="bf16", epochs=1)
    cfg_path = tmp_path / "z3.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # A relative --run-dir, as the README's `runs/tiny`: Ray Train workers do not share the driver's cwd.
    out = run_cli("run", "--config", cfg_path, "--run-dir", run.relative_to(tmp_path), "--until", "fit_cost",
                  cwd=tmp_path, timeout=900)
    assert "skip  fit_reward" in out.stderr and "2 worker(s), cpu, bf16, ZeRO-3" in out.stderr
    log = [json.loads(l) for l in (run / "stages" / "fit_cost" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2
    m = manifest(run, "fit_cost")["metrics"]
    assert m["eval_accuracy"] > 0.75 and m["policy_accuracy"] > 0.6


@pytest.mark.parametrize("n, world", [(65, 2), (1, 3), (0, 2), (7, 7), (10, 4)])
def test_every_rank_scores_as_many_pairs_and_each_pair_is_kept_once(n, world):
    """Under ZeRO-3 a forward is a collective: ranks with different numbers of forwards would hang
    (65 pairs on 2 ranks: 33 and 32, two batches of 64 sequences against one)."""
    from cluster.train import rank_share

    shares = [rank_share(n, r, world) for r in range(world)]
    assert len({len(idx) for idx, _ in shares}) == 1  # the same count on every rank
    kept = sorted(k for idx, real in shares for k in idx[:real])
    assert kept == list(range(n))


def test_refits_measure_policy_accuracy_on_the_latest_red_teams_pairs():
    from stages.fit_preference import fresh_pairs_stage

    pairs = {"policy_pairs": "p.jsonl"}
    # fit_reward@3's inputs: ingest@2, sft and red_team@2 (sorted by name, "sft" comes after "red_team@")
    assert fresh_pairs_stage({"ingest@2": {}, "sft": pairs, "red_team@2": pairs, "red_team@10": pairs}) == "red_team@10"
    assert fresh_pairs_stage({"ingest": {}, "sft": pairs}) == "sft"
    assert fresh_pairs_stage({"ingest@1": {}, "red_team@1": {"pairs": "x"}, "sft": pairs}) == "sft"  # world off: no pairs
    assert fresh_pairs_stage({"ingest": {}}) is None


def test_a_warm_refit_trains_on_the_new_pairs_and_a_seeded_replay_of_earlier_ones():
    from stages.fit_preference import refit_rows

    rows = [{"pair_id": f"p{i}", "better_response_id": None if i == 3 else i % 2, "safer_response_id": 0} for i in range(10)]
    earlier = {f"p{i}" for i in range(7)}  # p7-p9 are new; p3 has no helpfulness label
    picked, new, replayed = refit_rows(rows, earlier, "reward", replay=1.0, seed=0)
    ids = [r["pair_id"] for r in picked]
    assert (new, replayed) == (3, 3) and len(ids) == 6
    assert ids[-3:] == ["p7", "p8", "p9"] and "p3" not in ids and ids == sorted(ids)  # file order
    assert refit_rows(rows, earlier, "reward", 1.0, seed=0)[0] == picked  # the seed decides the draw
    draws = {tuple(r["pair_id"] for r in refit_rows(rows, earlier, "reward", 1.0, seed=s)[0]) for s in range(10)}
    assert len(draws) > 1  # and it is a draw, not the first earlier pairs
    assert [r["pair_id"] for r in refit_rows(rows, earlier, "reward", 0.0, 0)[0]] == ["p7", "p8", "p9"]
    everything, _, replayed = refit_rows(rows, earlier, "cost", 10.0, 0)  # capped at the earlier pairs there are
    assert replayed == 7 and len(everything) == 10  # the cost label is on every row, p3 included


def test_refit_warm_reads_the_last_fit_and_leaves_the_first_fits_fingerprint_alone():
    from pipeline.config import parse_config, results_view
    from pipeline.driver import config_slice
    from pipeline.graph import build_graph

    two = {"safe_rlhf": {"rounds": [{}, {}, {}]}}
    scratch, warm = parse_config(two), parse_config({**two, "reward": {"refit": "warm"}})
    specs = {s.name: s for s in build_graph(warm)}
    assert set(specs["fit_reward@2"].deps) == {"ingest@1", "sft", "red_team@1", "fit_reward", "ingest"}
    assert set(specs["fit_reward@3"].deps) == {"ingest@2", "sft", "red_team@2", "fit_reward@2", "ingest@1"}
    assert set(specs["fit_cost@2"].deps) == {"ingest@1", "sft", "red_team@1"}  # cost refits from scratch
    view = {"scratch": results_view(scratch), "warm": results_view(warm)}
    first, refit = specs["fit_reward"], specs["fit_reward@2"]
    assert config_slice(view["scratch"], first) == config_slice(view["warm"], first)
    assert config_slice(view["scratch"], refit) != config_slice(view["warm"], refit)
    assert "refit" not in config_slice(view["scratch"], refit)["reward"]  # at its default: old runs keep their fingerprints


def test_a_warm_probe_refit_computes_only_the_new_pairs_features(tmp_path):
    """The saved features come back by pair (its token ids), in the new items' order, whatever the
    earlier order; only the pairs the earlier probe did not see are left to compute."""
    import torch

    from stages.common.linear_probe import all_features, load_features, pair_key

    earlier = [{"a": [1, 2], "b": [3]}, {"a": [4], "b": [5, 6]}, {"a": [7], "b": [8]}]
    feats = {pair_key(i): (torch.full((2,), float(n)), torch.full((2,), -float(n))) for n, i in enumerate(earlier)}
    torch.save({"keys": list(feats), "a": torch.stack([v[0] for v in feats.values()]),
                "b": torch.stack([v[1] for v in feats.values()])}, tmp_path / "f.pt")
    known = load_features(str(tmp_path / "f.pt"))
    items = [earlier[2], {"a": [9], "b": [9, 9]}, earlier[0], {"a": [1, 2], "b": [4]}]  # two new pairs
    keys = [pair_key(i) for i in items]
    todo = [k for k, key in enumerate(keys) if key not in known]
    assert todo == [1, 3] and load_features(None) == {}
    fa, fb = all_features(keys, known, todo, torch.tensor([[10.0, 10.0], [30.0, 30.0]]), torch.zeros(2, 2))
    assert fa[:, 0].tolist() == [2.0, 10.0, 0.0, 30.0] and fb[:, 0].tolist() == [-2.0, 0.0, 0.0, 0.0]


def test_warm_start_writes_the_refits_pairs_or_falls_back_to_scratch_with_nothing_new(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import parse_config
    from stages.base import StageContext
    from stages.fit_preference import _warm_start

    def pair(i):
        return {"pair_id": f"p{i}", "better_response_id": 0, "safer_response_id": None}

    for name, n in (("ingest", 20), ("ingest@1", 23), ("same", 20)):
        pq.write_table(pa.Table.from_pylist([pair(i) for i in range(n)]), tmp_path / f"{name}.parquet")
    cfg = parse_config({"reward": {"refit": "warm", "refit_replay": 2.0, "refit_lr": 1e-4}})
    inputs = {"ingest": {"train": tmp_path / "ingest.parquet"}, "ingest@1": {"train": tmp_path / "ingest@1.parquet"},
              "fit_reward": {"model": tmp_path / "last_model"}}
    ctx = StageContext("fit_reward@2", cfg, tmp_path, inputs, tmp_path, log=lambda msg: None)
    loop = {"train_data": str(tmp_path / "ingest@1.parquet"), "train": cfg.reward.model_dump()}
    assert _warm_start(ctx, "reward", cfg.reward, loop) == "fit_reward"
    rows = pq.read_table(loop["train_data"]).to_pylist()
    assert loop["train_data"].endswith("refit_train.parquet") and loop["init_model"] == str(tmp_path / "last_model")
    assert len(rows) == 3 + 6 and {"p20", "p21", "p22"} <= {r["pair_id"] for r in rows} and loop["train"]["lr"] == 1e-4
    assert _warm_start(ctx, "cost", cfg.cost, dict(loop)) is None  # cost refits from scratch here
    # no reward pair that the last fit did not have: a fit from the backbone, on every pair
    ctx.inputs["ingest@1"]["train"] = tmp_path / "same.parquet"
    loop = {"train_data": str(tmp_path / "same.parquet"), "train": cfg.reward.model_dump()}
    assert _warm_start(ctx, "reward", cfg.reward, loop) is None and "init_model" not in loop
