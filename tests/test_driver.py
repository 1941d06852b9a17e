"""The driver: manifests written last, skip when unchanged, re-run on change, resume, status."""
import json

import pytest

from pipeline.driver import Driver, RunInterrupted, StageFailed
from pipeline.graph import StageSpec
from tests import fake_stages
from tests.conftest import small_config


def graph(consumer_keys=()):
    return [StageSpec("a", "tests.fake_stages", (), ("world.n_pairs",)),
            StageSpec("b", "tests.fake_consume", ("a",), consumer_keys)]


@pytest.fixture(autouse=True)
def fake_modules(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("tests.fake_consume")
    mod.run = fake_stages.consume
    monkeypatch.setitem(sys.modules, "tests.fake_consume", mod)
    fake_stages.CALLS.clear()
    monkeypatch.delenv("FAKE_CRASH", raising=False)
    monkeypatch.delenv("FAKE_INTERRUPT", raising=False)


def names():
    return [c[0] for c in fake_stages.CALLS]


def states(driver):
    return {s["name"]: s["state"] for s in driver.status()["stages"]}


def test_second_run_skips_every_done_stage(tmp_path):
    cfg = small_config()
    Driver(cfg, tmp_path, graph()).run()
    assert names() == ["a", "b"]
    Driver(cfg, tmp_path, graph()).run()
    assert names() == ["a", "b"]  # nothing ran again
    assert states(Driver(cfg, tmp_path, graph())) == {"a": "done", "b": "done"}
    events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] == "skip"] == ["skip", "skip"]


def test_manifest_records_config_inputs_outputs_and_metrics(tmp_path):
    Driver(small_config(), tmp_path, graph()).run()
    m = json.loads((tmp_path / "stages" / "b" / "manifest.json").read_text())
    assert set(m) >= {"fingerprint", "config_hash", "inputs", "outputs", "metrics"}
    assert list(m["inputs"]) == ["a"] and m["outputs"]["double"]["path"] == "double.txt"
    assert len(m["outputs"]["double"]["sha256"]) == 64 and m["metrics"] == {"length": 3}


def test_changed_config_reruns_the_stage_and_everything_after_it(tmp_path):
    Driver(small_config(), tmp_path, graph()).run()
    Driver(small_config(**{"world.n_pairs": 301}), tmp_path, graph()).run()
    assert names() == ["a", "b", "a", "b"]
    assert (tmp_path / "stages" / "b" / "double.txt").read_text() == "301301"


def test_config_a_stage_does_not_read_does_not_rerun_it(tmp_path):
    Driver(small_config(), tmp_path, graph(("ingest",))).run()
    Driver(small_config(**{"ingest.eval_fraction": 0.2}), tmp_path, graph(("ingest",))).run()
    assert names() == ["a", "b", "b"]  # a is skipped, b (which reads `ingest`) re-runs


def test_missing_output_makes_a_stage_pending_and_rerun(tmp_path):
    cfg = small_config()
    Driver(cfg, tmp_path, graph()).run()
    (tmp_path / "stages" / "b" / "double.txt").unlink()
    assert states(Driver(cfg, tmp_path, graph()))["b"] == "pending"
    Driver(cfg, tmp_path, graph()).run()
    assert names() == ["a", "b", "b"]


def test_failed_stage_leaves_no_manifest_and_resume_continues_from_its_checkpoint(tmp_path, monkeypatch):
    cfg = small_config()
    monkeypatch.setenv("FAKE_CRASH", "a")
    with pytest.raises(StageFailed, match="injected crash"):
        Driver(cfg, tmp_path, graph()).run()
    assert not (tmp_path / "stages" / "a" / "manifest.json").exists()
    st = Driver(cfg, tmp_path, graph()).status()["stages"]
    assert st[0]["state"] == "failed" and "injected crash" in st[0]["message"]
    assert st[1]["state"] == "pending"
    monkeypatch.delenv("FAKE_CRASH")
    Driver(cfg, tmp_path, graph()).run()
    # The second attempt found the first attempt's checkpoint and continued from it.
    assert fake_stages.CALLS[:2] == [("a", False), ("a", True)]
    m = json.loads((tmp_path / "stages" / "a" / "manifest.json").read_text())
    assert m["metrics"]["resumed_from_step"] == 1


def test_changed_config_discards_stale_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "a")
    with pytest.raises(StageFailed):
        Driver(small_config(), tmp_path, graph()).run()
    monkeypatch.delenv("FAKE_CRASH")
    Driver(small_config(**{"world.n_pairs": 999}), tmp_path, graph()).run()
    assert fake_stages.CALLS[1] == ("a", False)  # a checkpoint of other settings is not reused


def test_driver_killed_mid_stage_shows_failed_then_resumes(tmp_path):
    cfg = small_config()
    d = Driver(cfg, tmp_path, graph())
    (tmp_path / "stages" / "a").mkdir(parents=True)
    fp = d.expected_fingerprint(d.by_name["a"])[0]
    d.rd.set_state("a", "running", fingerprint=fp)
    state = json.loads((tmp_path / "stages" / "a" / "state.json").read_text())
    assert states(d)["a"] == "running"  # our own pid is alive
    state["pid"] = 2**22 + 12345  # a pid that does not exist: the driver was killed
    (tmp_path / "stages" / "a" / "state.json").write_text(json.dumps(state))
    (tmp_path / "stages" / "a" / "checkpoint.json").write_text('{"step": 7}')
    st = d.status()["stages"][0]
    assert st["state"] == "failed" and "interrupted" in st["message"]
    d.run()
    assert json.loads((tmp_path / "stages" / "a" / "manifest.json").read_text())["metrics"]["resumed_from_step"] == 7


def test_from_stage_reruns_it_and_downstream_from_scratch(tmp_path):
    cfg = small_config()
    Driver(cfg, tmp_path, graph()).run()
    Driver(cfg, tmp_path, graph()).run(from_stage="b")
    assert names() == ["a", "b", "b"]
    Driver(cfg, tmp_path, graph()).run(from_stage="a")
    assert names() == ["a", "b", "b", "a", "b"]
    assert fake_stages.CALLS[3] == ("a", False)  # from scratch: the old folder was cleared


def test_only_stage_reruns_just_that_stage(tmp_path):
    cfg = small_config()
    Driver(cfg, tmp_path, graph()).run()
    Driver(cfg, tmp_path, graph()).run(only_stage="a")
    assert names() == ["a", "b", "a"]
    assert states(Driver(cfg, tmp_path, graph())) == {"a": "done", "b": "done"}  # same outputs


def test_unknown_stage_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'c'.*a, b"):
        Driver(small_config(), tmp_path, graph()).run(from_stage="c")


def test_two_drivers_cannot_share_a_run_directory(tmp_path):
    d = Driver(small_config(), tmp_path, graph())
    lock = d.rd.lock()
    try:
        with pytest.raises(RuntimeError, match="another driver"):
            d.run()
    finally:
        lock.close()


def test_external_input_change_reruns_ingest(tmp_path):
    src = tmp_path / "extra.jsonl"
    row = {"prompt": "how do i bake bread ?", "response_0": "knead the dough", "response_1": "no",
           "better_response_id": 0, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True}
    src.write_text(json.dumps(row) + "\n")
    cfg = small_config(**{"ingest.sources": [{"path": str(src), "format": "pku"}]})
    Driver(cfg, tmp_path / "run").run(until="ingest")
    first = json.loads((tmp_path / "run" / "stages" / "ingest" / "manifest.json").read_text())
    assert first["metrics"]["read"] == 301
    src.write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt": "how do i cook rice ?"}) + "\n")
    d = Driver(cfg, tmp_path / "run")
    assert {k: v for k, v in states(d).items() if k in ("world", "ingest")} == {"world": "done", "ingest": "pending"}
    d.run(until="ingest")
    second = json.loads((tmp_path / "run" / "stages" / "ingest" / "manifest.json").read_text())
    assert second["metrics"]["read"] == 302


def test_too_many_rejects_fails_the_ingest_stage_with_a_clear_message(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("not json\n" * 50)
    cfg = small_config(**{"ingest.sources": [{"path": str(src)}], "ingest.max_reject_fraction": 0.05})
    with pytest.raises(Exception, match="reject"):
        Driver(cfg, tmp_path / "run").run(until="ingest")
    st = {s["name"]: s for s in Driver(cfg, tmp_path / "run").status()["stages"]}
    assert st["ingest"]["state"] == "failed" and "rejects.jsonl" in st["ingest"]["message"]
    assert (tmp_path / "run" / "stages" / "ingest" / "rejects.jsonl").read_text().count("\n") == 50


def test_independent_stages_run_side_by_side(tmp_path, monkeypatch):
    import time
    import types

    def slow(ctx):
        fake_stages.CALLS.append((ctx.name, False))
        time.sleep(1.0)
        (ctx.out_dir / "v.txt").write_text(ctx.name)
        return fake_stages.StageResult({"v": "v.txt"})

    import sys

    monkeypatch.setitem(sys.modules, "tests.fake_slow", types.SimpleNamespace(run=slow))
    g = [StageSpec("a", "tests.fake_slow"), StageSpec("b", "tests.fake_slow"), StageSpec("c", "tests.fake_slow", ("a", "b"))]
    Driver(small_config(), tmp_path, g).run()
    ev = {(e["stage"], e["event"]): e["time"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())}
    assert ev[("b", "start")] < ev[("a", "done")] and ev[("a", "start")] < ev[("b", "done")]  # a and b overlap
    assert ev[("c", "start")] >= max(ev[("a", "done")], ev[("b", "done")])  # c waits for both
    fake_stages.CALLS.clear()
    Driver(small_config(), tmp_path, g).run(max_parallel_stages=1)  # all done: skipped
    assert fake_stages.CALLS == []


@pytest.mark.parametrize("cpus_b, local_cpus, overlap", [
    (2.0, 2.0, False),  # 1 + 2 > 2 on a local cluster: b starts when a is done
    (1.0, 2.0, True),   # 1 + 1 fit side by side
    (2.0, None, True),  # a joined cluster (it may grow): Ray decides
])
def test_a_fit_waits_for_the_cpus_a_running_fit_holds_on_a_local_cluster(tmp_path, monkeypatch, capsys, cpus_b, local_cpus, overlap):
    import sys
    import time
    import types

    def slow(ctx):
        time.sleep(1.0)
        (ctx.out_dir / "v.txt").write_text(ctx.name)
        return fake_stages.StageResult({"v": "v.txt"})

    monkeypatch.setitem(sys.modules, "tests.fake_slow", types.SimpleNamespace(run=slow))
    g = [StageSpec("a", "tests.fake_slow", needs_ray=True, cpus=lambda cfg: 1.0),
         StageSpec("b", "tests.fake_slow", needs_ray=True, cpus=lambda cfg: cpus_b),
         StageSpec("c", "tests.fake_slow", needs_ray=True)]  # holds no CPUs: never waits
    d = Driver(small_config(), tmp_path, g)
    d._ray_checked, d._local_cpus = True, local_cpus  # as after _ensure_ray started (or joined) a cluster
    d.run()
    ev = {(e["stage"], e["event"]): e["time"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())}
    assert (ev[("b", "start")] < ev[("a", "done")]) is overlap
    assert ev[("c", "start")] < ev[("a", "done")]
    said = "b waits for a: it reserves 2 CPU(s), and 1 of the local cluster's 2 are taken"
    assert (said in capsys.readouterr().err) is not overlap


def test_a_failing_stage_lets_the_running_one_finish_and_resume_picks_up_the_rest(tmp_path, monkeypatch):
    import sys
    import time
    import types

    def fails(ctx):
        raise RuntimeError("boom")

    def slow(ctx):
        time.sleep(1.0)
        (ctx.out_dir / "v.txt").write_text("ok")
        return fake_stages.StageResult({"v": "v.txt"})

    monkeypatch.setitem(sys.modules, "tests.fake_fails", types.SimpleNamespace(run=fails))
    monkeypatch.setitem(sys.modules, "tests.fake_slow2", types.SimpleNamespace(run=slow))
    g = [StageSpec("a", "tests.fake_fails"), StageSpec("b", "tests.fake_slow2"), StageSpec("c", "tests.fake_slow2", ("a", "b"))]
    with pytest.raises(StageFailed, match="boom"):
        Driver(small_config(), tmp_path, g).run()
    assert states(Driver(small_config(), tmp_path, g)) == {"a": "failed", "b": "done", "c": "pending"}
    assert (tmp_path / "stages" / "b" / "v.txt").read_text() == "ok"  # the other stage's outputs are intact
    monkeypatch.setitem(sys.modules, "tests.fake_fails", types.SimpleNamespace(run=slow))  # fixed
    before = len((tmp_path / "events.jsonl").read_text().splitlines())
    Driver(small_config(), tmp_path, g).run()
    events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()][before:]
    assert {(e["stage"], e["event"]) for e in events if e["event"] in ("skip", "start")} == {
        ("a", "start"), ("b", "skip"), ("c", "start")}
    assert states(Driver(small_config(), tmp_path, g)) == {"a": "done", "b": "done", "c": "done"}


def test_a_stage_status_looks_at_each_upstream_stage_once(tmp_path):
    """A chain of diamonds (every stage reads the two before it, as report reads the rounds and
    fits): status walks the graph once per stage, not once per path (2^k paths for k diamonds)."""
    spec = [StageSpec("s0", "tests.fake_stages", (), ("world.n_pairs",))]
    spec += [StageSpec(f"s{i}", "tests.fake_stages", tuple(f"s{j}" for j in range(max(0, i - 2), i)), ())
             for i in range(1, 16)]
    driver = Driver(small_config(), tmp_path, spec)
    driver.run()
    reads = []
    manifest = driver.rd.manifest
    driver.rd.manifest = lambda name: (reads.append(name), manifest(name))[1]
    assert driver.status_of("s15") == "done"
    # each stage: its own manifest, and once more for each of its (up to two) readers' fingerprints
    assert set(reads) == {f"s{i}" for i in range(16)} and len(reads) <= 3 * 16  # not one per path (~2,000)
    (tmp_path / "stages" / "s3" / "value.txt").unlink()  # an upstream output goes missing:
    assert driver.status_of("s15") == "pending"  # no stale answer is kept between calls


def test_the_first_round_this_run_runs_has_its_actors_started_ahead_once(tmp_path, monkeypatch):
    """With kept actors the driver starts the first pending round's actors (the graph's `prestart`)
    once every stage the round depends on is running or done, before the round starts; a done
    round is not started ahead again, and the round after it is the one started ahead next run."""
    import sys
    import time
    import types

    class FakePool:
        def close(self):
            pass

    started_ahead = []

    def record_prestart(cfg, params, pool, log):
        started_ahead.append((params["round"], isinstance(pool, FakePool), time.time()))
        return ["rollout-0"]

    def slow(ctx):
        time.sleep(0.5)
        (ctx.out_dir / "v.txt").write_text(ctx.name)
        return fake_stages.StageResult({"v": "v.txt"})

    monkeypatch.setitem(sys.modules, "tests.fake_prestart", types.SimpleNamespace(prestart=record_prestart, run=slow))
    g = [StageSpec("a", "tests.fake_stages"), StageSpec("b", "tests.fake_prestart", ("a",)),
         StageSpec("r1", "tests.fake_consume", ("a", "b"), params=(("round", 1),), prestart="tests.fake_prestart:prestart"),
         StageSpec("r2", "tests.fake_consume", ("a", "r1"), params=(("round", 2),), prestart="tests.fake_prestart:prestart")]

    def driver():
        d = Driver(small_config(), tmp_path, g)
        d._ray_checked, d.actor_pool = True, FakePool()  # as after _ensure_ray with safe_rlhf.keep_actors
        return d

    def events():
        return {(e["stage"], e["event"]): e["time"] for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())}

    driver().run(until="r1")
    (k, pooled, at), = started_ahead
    ev = events()
    assert k == 1 and pooled
    assert ev[("a", "done")] <= at < ev[("b", "done")] < ev[("r1", "start")]  # once b, the last input, runs
    started_ahead.clear()
    driver().run()  # r1 is done: r2 is the first round to run (its inputs are done: started ahead at once)
    assert [r for r, _, _ in started_ahead] == [2] and started_ahead[0][2] < events()[("r2", "start")]
    started_ahead.clear()
    driver().run()  # nothing to run: nothing started ahead
    assert started_ahead == []
    driver().run(from_stage="a")  # a and b run again: their old outputs do not count as done
    (k, _, at), = started_ahead
    assert k == 1 and events()[("a", "done")] <= at < events()[("r1", "start")]
    started_ahead.clear()
    no_pool = Driver(small_config(), tmp_path, g)
    no_pool._ray_checked = True  # Ray up, keep_actors off: no pool, nothing started ahead
    no_pool.run(from_stage="r2")
    assert started_ahead == []

    def broken(cfg, params, pool, log):
        raise RuntimeError("no actors today")

    monkeypatch.setitem(sys.modules, "tests.fake_prestart", types.SimpleNamespace(prestart=broken, run=slow))
    driver().run(from_stage="r1")  # a failed start ahead is a lost speed-up, not a failed run
    assert Driver(small_config(), tmp_path, g).status_of("r2") == "done"


def test_the_fits_declare_the_cpus_their_ray_train_runs_reserve():
    from pipeline.config import parse_config
    from pipeline.graph import build_graph

    cfg = parse_config({"name": "t", "reward": {"num_workers": 2}, "cost": {"cpus_per_worker": 1.5}})
    cpus = {s.name: s.cpus(cfg) for s in build_graph(cfg)}
    assert cpus["fit_reward"] == cpus["fit_reward@2"] == 2.0 and cpus["fit_cost"] == cpus["fit_cost@3"] == 1.5
    assert {n for n, c in cpus.items() if c} == {n for n in cpus if n.startswith(("fit_reward", "fit_cost"))}


def test_ctrl_c_records_the_stage_interrupted_with_its_fingerprint_and_resume_continues_it(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT to this process) while `resume --only-stage a` runs a, in a thread of its own
    as every stage (the CLI's path, SIGINT to its process group mid-round, is in test_operations.py)."""
    cfg = small_config()
    monkeypatch.setenv("FAKE_INTERRUPT", "a")
    driver = Driver(cfg, tmp_path, graph())
    with pytest.raises(RunInterrupted) as stopped:
        driver.run(only_stage="a")
    assert stopped.value.stages == ["a"]
    state = json.loads((tmp_path / "stages" / "a" / "state.json").read_text())
    assert state["state"] == "failed" and state["error"].startswith("interrupted (Ctrl-C)")
    assert state["fingerprint"] == driver.expected_fingerprint(driver.by_name["a"])[0]  # kept: resume uses its folder
    events = [json.loads(l)["event"] for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "interrupt"]  # not "fail"
    monkeypatch.delenv("FAKE_INTERRUPT")
    Driver(cfg, tmp_path, graph()).run()
    assert fake_stages.CALLS == [("a", False), ("a", True), ("b", False)]  # a continued from its checkpoint
