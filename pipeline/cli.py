"""`python -m pipeline COMMAND`: run, resume, status, validate, ingest.

    run      [--config C] [--run-dir D] [--until S]
                                                 run every stage that is not done (up to S)
    resume   [--run-dir D] [--from-stage S | --only-stage S] [--until S]
                                                 continue a run with its saved config
    status   [--run-dir D] [--json]              each stage's state and metrics
    validate CONFIG                              check a config; every invalid field by dotted path
    plan     CONFIG [--gpu-memory GIB]           resource plan and memory estimate per role
    ingest   PATH... --out DIR [--format auto|pku|hh]
                                                 validate annotation files into train/eval Parquet

Exit codes: 0 done, 1 a stage failed, 2 bad input (config, paths, arguments), 3 waiting for a person.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"
RUNS = Path("runs")
LATEST = RUNS / "LATEST"  # names the run directory `status` and `resume` use by default


def _default_run_dir(args_run_dir: str | None) -> Path:
    if args_run_dir:
        return Path(args_run_dir)
    if LATEST.is_file():
        return Path(LATEST.read_text().strip())
    raise SystemExit("error: no --run-dir given and no runs/LATEST here; pass --run-dir")


def _print_status(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {status['run_dir']}")
    for col in ("stage", "state", "time", "key figures"):
        table.add_column(col)
    colours = {"done": "green", "failed": "red", "running": "yellow", "waiting": "magenta", "pending": "dim"}
    for s in status["stages"]:
        figs = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in list(s["metrics"].items())[:5] if not isinstance(v, (dict, list)))
        if s.get("message"):
            figs = s["message"]
        dur = f"{s['duration_s']:.0f}s" if "duration_s" in s else ""
        table.add_row(s["name"], f"[{colours[s['state']]}]{s['state']}[/]", dur, figs)
    Console().print(table)


def cmd_validate(args) -> int:
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    from pipeline.graph import stage_names

    print(f"{args.config}: valid ({cfg.name}); stages: {', '.join(stage_names(cfg))}")
    return 0


def _run(driver, **kw) -> int:
    from pipeline.driver import log

    try:
        state = driver.run(**kw)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        log(f"run stopped: a stage failed ({type(e).__name__}: {e}). Fix it and `python -m pipeline resume --run-dir {driver.rd.root}`")
        return 1
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
    return _run(Driver(cfg, run_dir), until=args.until)


def cmd_resume(args) -> int:
    from pipeline.driver import Driver

    try:
        driver = Driver.from_run_dir(_default_run_dir(args.run_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run(driver, from_stage=args.from_stage, only_stage=args.only_stage, until=args.until)


def cmd_status(args) -> int:
    from pipeline.driver import Driver

    try:
        driver = Driver.from_run_dir(_default_run_dir(args.run_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_status(driver.status(), args.json)
    return 0


def cmd_plan(args) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.plan import format_plan, plan

    try:
        cfg = load_config(args.config)
        print(format_plan(plan(cfg, args.gpu_memory)))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_ingest(args) -> int:
    from stages.ingest import IngestError, ingest

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


def main(argv: list[str] | None = None) -> int:
    import os

    # Quiet per-load progress bars (weights reload every PPO step); Ray workers inherit this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m pipeline", description="Safe RLHF on Ray: the pipeline driver.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every stage that is not done")
    r.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML); default configs/tiny.yaml")
    r.add_argument("--run-dir", help="run directory; default runs/<config name>")
    r.add_argument("--until", help="stop after this stage (e.g. ingest)")
    r.set_defaults(fn=cmd_run)

    r = sub.add_parser("resume", help="continue a run with its saved config")
    r.add_argument("--run-dir", help="run directory; default: the last one `run` used (runs/LATEST)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--from-stage", help="re-run this stage and everything after it, from scratch")
    g.add_argument("--only-stage", help="re-run this stage alone (from its checkpoints if it was interrupted)")
    r.add_argument("--until", help="stop after this stage")
    r.set_defaults(fn=cmd_resume)

    r = sub.add_parser("status", help="each stage's state and metrics")
    r.add_argument("--run-dir", help="run directory; default: the last one `run` used")
    r.add_argument("--json", action="store_true", help='print {"stages": [{"name", "state", "metrics"}]}')
    r.set_defaults(fn=cmd_status)

    r = sub.add_parser("validate", help="check a config file")
    r.add_argument("config")
    r.set_defaults(fn=cmd_validate)

    r = sub.add_parser("plan", help="resource plan and memory estimate per role, before launch")
    r.add_argument("config")
    r.add_argument("--gpu-memory", type=float, help="GiB per GPU, to check whether the roles fit")
    r.set_defaults(fn=cmd_plan)

    r = sub.add_parser("ingest", help="validate annotation files into train/eval Parquet")
    r.add_argument("paths", nargs="+", help="JSONL, JSON array or Parquet files, gzip or not")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--format", default="auto", choices=["auto", "pku", "hh"])
    r.add_argument("--eval-fraction", type=float, default=0.1)
    r.add_argument("--max-reject-fraction", type=float, default=1.0,
                   help="fail (exit 1) when more than this share of rows is rejected; default never")
    r.add_argument("--max-row-bytes", type=int, default=1_000_000)
    r.set_defaults(fn=cmd_ingest)

    args = p.parse_args(argv)
    return args.fn(args)
