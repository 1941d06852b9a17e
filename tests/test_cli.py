"""The command line end to end, as a user runs it (subprocesses, real files)."""
import gzip
import json
import re
import time

import yaml

from tests.conftest import HH_FILE, SMALL_STAGES, run_cli


def write_config(tmp_path, **world):
    cfg = {"name": "cli-test", "world": {"n_pairs": 300, "n_sft": 100, **world}, "model": {"small": {"vocab_size": 600}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_status_rerun_and_resume(small_pipeline):
    run_dir, first = small_pipeline["run_dir"], small_pipeline["proc"]
    for stage in SMALL_STAGES:
        assert f"done  {stage}" in first.stderr
    # The driver joins Ray from its main thread: joined from a stage's thread, which ends, Ray's
    # shutdown waited out 15 s of flush timeouts at the end of every run.
    others = (run_dir / "logs" / "console.log").read_text()
    assert "current thread is not the main thread" not in first.stderr + others
    # The console holds the driver's own lines; other programs' output went to the run's log.
    shown = (first.stdout + first.stderr).splitlines()
    ours = re.compile(r"^\[\d\d:\d\d:\d\d\] ")
    assert [l for l in shown if not ours.match(l)] == [], "lines on the console that are not the driver's"
    assert len(shown) <= 120 and shown[-1].endswith(str(run_dir / "logs" / "console.log"))
    # routed, not dropped: the fits' reports from the kept learners they ran in (runner auto)
    assert re.search(r"\(Learner pid=\d+\).* fit checkpoint .*/stages/sft/ray_train/sft/checkpoint_", others)
    assert re.search(r"done  safe_rlhf@1 in [\d.]+s \[\d+/%d, \d+m\d\ds\]" % len(SMALL_STAGES), first.stderr)
    status = json.loads(run_cli("status", "--run-dir", run_dir, "--json").stdout)
    assert [s["state"] for s in status["stages"]] == ["done"] * len(SMALL_STAGES)
    ingest = status["stages"][1]["metrics"]
    assert ingest["read"] == 1000 == ingest["accepted"] + ingest["rejected"] + ingest["duplicates"]

    t0 = time.time()
    second = run_cli("run", "--config", small_pipeline["config"], "--run-dir", run_dir)
    assert second.stderr.count("] skip ") == len(SMALL_STAGES) and "] start " not in second.stderr
    assert time.time() - t0 < 20  # seconds, not minutes (mostly interpreter start-up)

    again = run_cli("resume", "--run-dir", run_dir, "--only-stage", "ingest")
    assert "start ingest" in again.stderr and "start sft" not in again.stderr
    # Ingest is deterministic: same outputs, so the stages after it are still done.
    status = json.loads(run_cli("status", "--run-dir", run_dir, "--json").stdout)
    assert [s["state"] for s in status["stages"]] == ["done"] * len(SMALL_STAGES)
    table = run_cli("status", "--run-dir", run_dir).stdout
    assert "fit_cost" in table and "done" in table


def test_bad_config_and_unknown_stage_exit_2(tmp_path, small_pipeline):
    bad = tmp_path / "bad.yaml"
    bad.write_text("wrold: {}\n")
    proc = run_cli("run", "--config", bad, "--run-dir", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "wrold: unknown key" in proc.stderr
    proc = run_cli("resume", "--run-dir", small_pipeline["run_dir"], "--from-stage", "nope", check=False)
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr
    proc = run_cli("status", "--run-dir", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_status_and_resume_without_a_run_directory_exit_2(tmp_path):
    # In a directory with no runs/LATEST and no --run-dir: bad input, not a failed stage.
    for command in ("status", "resume"):
        proc = run_cli(command, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "pass --run-dir" in proc.stderr, (command, proc.stderr)


def test_an_error_raised_inside_a_stage_exits_1_with_a_resume_hint(tmp_path, capsys):
    # A ValueError or FileNotFoundError from a stage's own work is a failed stage (1, resume), not
    # bad input (2); errors before any stage runs (unknown stage, missing input file) stay 2.
    import sys
    import types

    from pipeline.cli import _run
    from pipeline.driver import Driver
    from pipeline.graph import StageSpec
    from tests.conftest import small_config

    def raises(ctx):
        raise ValueError("a value the stage could not use")

    sys.modules["tests.fake_value_error"] = types.SimpleNamespace(run=raises)
    try:
        graph = [StageSpec("a", "tests.fake_value_error")]
        assert _run(Driver(small_config(), tmp_path / "r", graph)) == 1
        err = capsys.readouterr().err
        assert "stage a failed (ValueError: a value the stage could not use)" in err and "pipeline resume --run-dir" in err
        assert _run(Driver(small_config(), tmp_path / "r", graph), from_stage="nope") == 2
    finally:
        del sys.modules["tests.fake_value_error"]


def test_run_until_stops_after_the_named_stage(tmp_path):
    out = run_cli("run", "--config", write_config(tmp_path), "--run-dir", tmp_path / "r", "--until", "ingest")
    assert "done  ingest" in out.stderr and "start sft" not in out.stderr
    status = json.loads(run_cli("status", "--run-dir", tmp_path / "r", "--json").stdout)
    states = [s["state"] for s in status["stages"]]
    assert states[:2] == ["done", "done"] and set(states[2:]) == {"pending"} and len(states) > 5


def test_ingest_command_accounts_for_every_hh_row(tmp_path):
    out = json.loads(run_cli("ingest", HH_FILE, "--out", tmp_path / "hh", "--format", "hh").stdout)
    assert out["read"] == 2312
    assert out["accepted"] + out["rejected"] + out["duplicates"] == 2312
    assert out["accepted"] > 2250
    assert set(out) == {"read", "accepted", "rejected", "duplicates", "by_reason", "rejects_path", "outputs"}
    rejects = [json.loads(l) for l in open(out["rejects_path"])]
    assert len(rejects) == out["rejected"] and all(r["source"] and r["line"] and r["reason"] for r in rejects)


def test_ingest_command_reports_mixed_bad_rows_exactly(tmp_path):
    good = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0,
            "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": True}
    lines = [json.dumps(good), "{oops", json.dumps({**good, "better_response_id": 2}),
             json.dumps({**good, "response_1": "  A "}), json.dumps({k: v for k, v in good.items() if k != "prompt"}),
             json.dumps({**good, "is_response_0_safe": False, "safer_response_id": 0})]
    src = tmp_path / "mixed.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join(lines) + "\n")
    out = json.loads(run_cli("ingest", src, "--out", tmp_path / "o").stdout)
    assert (out["read"], out["accepted"], out["rejected"]) == (6, 1, 5)
    rejects = [(r["line"], r["reason"], r["field"]) for r in map(json.loads, open(out["rejects_path"]))]
    assert rejects == [(2, "unparseable", None), (3, "bad_id", "better_response_id"),
                       (4, "identical_answers", None), (5, "missing_field", "prompt"),
                       (6, "contradictory_labels", None)]
    proc = run_cli("ingest", src, "--out", tmp_path / "o2", "--max-reject-fraction", "0.5", check=False)
    assert proc.returncode == 1 and "reject" in proc.stderr


def test_ctrl_c_on_any_command_ends_it_with_one_line_and_exit_code_130(tmp_path):
    """make-model, as every command without its own handling: SIGINT to the process group once it
    has said what it does, mid-work; one line and exit code 130 instead of a traceback."""
    from tests.conftest import ctrl_c

    proc, _, err, _ = ctrl_c("make-model", "--out", tmp_path / "model", "--data", HH_FILE, "--warmup-epochs", 50,
                             ready=lambda out, err: "[make-model] " in err, after_s=0.5)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "python -m pipeline make-model: interrupted (Ctrl-C)"
    assert not (tmp_path / "model" / "model.safetensors").exists()  # 50 warm-up epochs: far from done
