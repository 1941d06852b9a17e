"""pipeline/console.py: the driver's own lines on the console, other programs' in the run's log,
errors on both (the run itself is checked in test_cli: every line on its console is the driver's)."""
import io
import logging
import sys

from pipeline.console import RunConsole, say

RAY_TRAIN = "\x1b[36m(RayTrainWorker pid=7)\x1b[0m Checkpoint successfully created at: Checkpoint(path=/x)"
HARMLESS = ("\x1b[36m(TrainController pid=8)\x1b[0m [2026-12-04 03:09:50,392 E 19945 19976] core_worker.cc:2465: "
            "Actor with class name: 'PreemptionWatcher' and ID: 'b7' has constructor arguments in the object store")
TRACEBACK = ["\x1b[36m(Learner pid=9)\x1b[0m Traceback (most recent call last):",
             "\x1b[36m(Learner pid=9)\x1b[0m   File \"actors/learner.py\", line 3, in step",
             "\x1b[36m(Learner pid=9)\x1b[0m     loss.backward()",
             "\x1b[36m(Learner pid=9)\x1b[0m RuntimeError: element 0 of tensors does not require grad"]


def run_console(tmp_path, monkeypatch, verbose=False):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    return RunConsole(tmp_path, verbose=verbose), out, err


def test_other_programs_lines_go_to_the_log_and_errors_to_both(tmp_path, monkeypatch):
    console, out, err = run_console(tmp_path, monkeypatch)
    handler = logging.StreamHandler(err)  # as Ray's, made before the console: bound to the real stream
    logger = logging.getLogger("test_console_ray")
    logger.addHandler(handler)
    try:
        with console:
            say("[03:09:23] start world")
            print(RAY_TRAIN)
            print(HARMLESS, file=sys.stderr)
            logger.warning("Token authentication is enabled for this Ray cluster.")
            sys.stderr.write("\n".join(TRACEBACK) + "\nafter the traceback\n")
            print("a last line without its newline", end="")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == ["[03:09:23] start world", *TRACEBACK]
    log = (tmp_path / "logs" / "console.log").read_text().splitlines()
    assert log[0].startswith("--- ")  # when, and the command
    assert log[1:] == ["[03:09:23] start world", RAY_TRAIN, HARMLESS, "Token authentication is enabled for this Ray cluster.",
                       *TRACEBACK, "after the traceback", "a last line without its newline"]
    assert sys.stdout is out and sys.stderr is err and handler.stream is err  # all put back


def test_verbose_shows_everything_and_still_logs_it(tmp_path, monkeypatch):
    console, out, err = run_console(tmp_path, monkeypatch, verbose=True)
    with console:
        print(RAY_TRAIN)
        print(HARMLESS, file=sys.stderr)
    assert out.getvalue().splitlines() == [RAY_TRAIN] and err.getvalue().splitlines() == [HARMLESS]
    assert (tmp_path / "logs" / "console.log").read_text().splitlines()[1:] == [RAY_TRAIN, HARMLESS]


def test_the_live_view_shows_each_stage_and_the_rounds_steps_from_the_drivers_lines():
    from rich.console import Console

    from pipeline.console import LiveView

    view = LiveView(["world", "sft", "safe_rlhf@1", "evaluate"])
    for line in ["[03:09:23] skip  world: done, inputs and config unchanged (pairs=3000)",
                 "[03:10:37] done  sft in 63.4s [2/4, 1m14s] (eval_loss=0.38)",
                 "[03:11:00] start safe_rlhf@1",
                 "[03:11:15]   [safe_rlhf@1] step 16/50 (15s) reward=0.7014 cost=-4.956 lam=7.853"]:
        view.read(line)
    assert view.state == {"world": "skip", "sft": "done", "safe_rlhf@1": "running", "evaluate": "pending"}
    screen = Console(width=120, record=True, file=io.StringIO())
    screen.print(view)
    text = screen.export_text()
    assert "stages 2/4 finished" in text and "sft 63s" in text
    # 16 of 50 steps in 15 s: 34 more at 15/16 s each
    assert "16/50" in text and "reward=0.7014 cost=-4.956 lam=7.853" in text and "~32s left" in text
    view.read("[03:11:50] done  safe_rlhf@1 in 50.0s [3/4, 2m27s] (steps=50)")
    # a fit's progress, from Ray Train's report line (another program's), while the fit runs
    view.read("[03:12:00] start fit_cost@2")
    view.read_other("\x1b[36m(RayTrainWorker pid=1)\x1b[0m Reporting training result 2: TrainingReport(checkpoint=Checkpoint("
                    "filesystem=local, path=/r/stages/fit_cost@2/ray_train/fit_cost-2/checkpoint_1), metrics={'eval_loss': "
                    "0.9469, 'epoch': 1, 'global_step': 89, 'train_loss': 2.8036}, validation=False) from rank 0")
    screen = Console(width=120, record=True, file=io.StringIO())
    screen.print(view)
    assert "fit_cost@2  epoch 1  global_step 89  train_loss 2.804  eval_loss 0.9469" in screen.export_text()
    # and a kept learner's (cluster/train.py LocalSession.report)
    view.read_other("\x1b[36m(Learner pid=2)\x1b[0m fit checkpoint /r/stages/fit_cost@2/ray_train/fit_cost-2/checkpoint_2026-12-06"
                    "_03-00-00.000001, metrics={'global_step': 100, 'loss': 0.25}")
    screen = Console(width=120, record=True, file=io.StringIO())
    screen.print(view)
    assert "fit_cost@2  epoch 1  global_step 100  loss 0.25" in screen.export_text()
    assert view.state["safe_rlhf@1"] == "done" and not view.steps
