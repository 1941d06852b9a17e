"""The `ingest` and `ingest@k` stages: every annotation source so far, validated into train/eval Parquet
(stages/common/annotation_files.py does the work; `python -m pipeline ingest` is the same for any file).
"""
from __future__ import annotations

from pathlib import Path

from stages.base import StageResult
from stages.common.annotation_files import ingest


def run(ctx):
    """Ingest the world's annotations (when enabled), every round's labels so far (`annotate@k`)
    and every configured source: refits train on all data so far."""
    cfg = ctx.cfg.ingest
    paths: list[Path] = []
    formats: set[str] = set()
    if "world" in ctx.inputs:
        paths.append(ctx.input("world", "pairs"))
        formats.add("pku")
    for name in sorted(n for n in ctx.inputs if n.startswith("annotate@")):
        paths.append(ctx.input(name, "labels"))
        formats.add("pku")
    for src in cfg.sources:
        paths.append(Path(src.path))
        formats.add(src.format)
    # One format for all files, or per-row detection when the sources differ.
    fmt = formats.pop() if len(formats) == 1 else "auto"
    summary = ingest(paths, ctx.out_dir, fmt=fmt, eval_fraction=cfg.eval_fraction,
                     max_reject_fraction=cfg.max_reject_fraction, max_row_bytes=cfg.max_row_bytes,
                     progress=ctx.log, limits={str(Path(s.path)): s.limit for s in cfg.sources if s.limit is not None})
    metrics = {k: summary[k] for k in ("read", "accepted", "rejected", "duplicates", "train_rows", "eval_rows")}
    metrics["by_reason"] = {k: v for k, v in summary["by_reason"].items() if v}
    return StageResult({"train": "train.parquet", "eval": "eval.parquet", "rejects": "rejects.jsonl",
                        "duplicates": "duplicates.jsonl", "summary": "summary.json"}, metrics)
