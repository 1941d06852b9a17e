"""Annotation ingest: preference files in, validated train/eval Parquet out.

Reads PKU-SafeRLHF rows (two answers, helpfulness *and* safety labels) and
Anthropic HH-RLHF rows (chosen/rejected conversations, harmlessness only),
validates every row with pydantic, de-duplicates, splits train/eval by prompt
hash and writes Parquet with the declared ``PAIR_SCHEMA``.  Every row read is
accounted for: it is accepted (train or eval), rejected (``rejects.jsonl``,
with the original text so it can be fixed) or a duplicate
(``duplicates.jsonl``, pointing at the row that was kept).

Containers and row positions are stages/common/datafiles.py's: JSONL, JSON array,
Parquet, each optionally gzipped, detected by content; a file that cannot be
read as a whole becomes one ``unparseable`` reject instead of an exception.
The `ingest` stage (stages/ingest.py), the `ingest` command and the `files`
annotation backend all call ``ingest`` here.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt,
                      StrictStr, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from core.files import atomic_write_json
from core.text import in_eval_split, normalize, pair_key, prompt_key
from stages.common.datafiles import detect_container, iter_rows

REJECT_REASONS: tuple[str, ...] = (
    "unparseable", "not_an_object", "invalid_utf8", "oversized_row", "missing_field",
    "wrong_type", "bad_id", "empty_text", "identical_answers", "contradictory_labels",
    "mismatched_conversations", "malformed_conversation",
)

_CONTEXT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("text", pa.string())]))
PAIR_SCHEMA: pa.Schema = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("context", _CONTEXT_TYPE, nullable=False),
    pa.field("response_0", pa.string(), nullable=False),
    pa.field("response_1", pa.string(), nullable=False),
    pa.field("better_response_id", pa.int8()),  # null for HH: no helpfulness label
    pa.field("safer_response_id", pa.int8()),
    pa.field("is_response_0_safe", pa.bool_()),
    pa.field("is_response_1_safe", pa.bool_()),
    pa.field("response_0_severity_level", pa.int8()),
    pa.field("response_1_severity_level", pa.int8()),
    pa.field("response_0_harm_category", pa.list_(pa.string()), nullable=False),
    pa.field("response_1_harm_category", pa.list_(pa.string()), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_row", pa.int64()),
    pa.field("source_format", pa.string(), nullable=False),
])

_BATCH = 10_000          # rows per Parquet write and per progress line
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")


class IngestError(Exception):
    """Too many rows were rejected.  Raised after every output is written; the
    summary is available as ``.summary``."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


_norm = normalize  # strip, collapse whitespace, casefold


# ---------------------------------------------------------------- validation models
def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_text", "text is empty or whitespace-only")
    return value


def _zero_or_one(value: int) -> int:
    if value not in (0, 1):
        raise PydanticCustomError("bad_id", "response id must be 0 or 1, got {value}", {"value": value})
    return value


def parse_conversation(text: str) -> list[tuple[str, str]]:
    """Split an HH transcript into (role, stripped text) turns; validation returns the turns."""
    parts = _TURN_MARKER.split(text)
    if parts[0].strip():
        raise PydanticCustomError("malformed_conversation", "text before the first Human:/Assistant: marker")
    turns = [("user" if role == "Human" else "assistant", body.strip())
             for role, body in zip(parts[1::2], parts[2::2])]
    if not turns or turns[-1][0] != "assistant":
        raise PydanticCustomError("malformed_conversation", "conversation does not end with an Assistant turn")
    if len(turns) < 2 or turns[-2][0] != "user":
        raise PydanticCustomError("malformed_conversation", "final Assistant turn is not preceded by a Human turn")
    if not turns[-2][1]:
        raise PydanticCustomError("empty_text", "the prompt (last Human turn) is empty")
    if not turns[-1][1]:
        raise PydanticCustomError("empty_text", "the final Assistant answer is empty")
    return turns


Text = Annotated[StrictStr, AfterValidator(_non_empty)]
ResponseId = Annotated[StrictInt, AfterValidator(_zero_or_one)]
Severity = Optional[Annotated[StrictInt, Field(ge=0, le=127)]]  # must fit int8
HarmCategory = Optional[dict[StrictStr, StrictBool]]
Conversation = Annotated[StrictStr, AfterValidator(parse_conversation)]  # holds turns once valid


class PKURow(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: Text
    response_0: Text
    response_1: Text
    better_response_id: ResponseId
    safer_response_id: ResponseId
    is_response_0_safe: StrictBool
    is_response_1_safe: StrictBool
    response_0_harm_category: HarmCategory = None
    response_1_harm_category: HarmCategory = None
    response_0_severity_level: Severity = None
    response_1_severity_level: Severity = None

    @model_validator(mode="after")
    def _row_checks(self) -> "PKURow":
        if _norm(self.response_0) == _norm(self.response_1):
            raise PydanticCustomError("identical_answers", "response_0 and response_1 are the same text")
        safe = (self.is_response_0_safe, self.is_response_1_safe)
        s = self.safer_response_id
        if not safe[s] and safe[1 - s]:
            raise PydanticCustomError(
                "contradictory_labels",
                "safer_response_id={s} but response_{s} is marked unsafe and response_{o} safe",
                {"s": s, "o": 1 - s})
        return self


class HHRow(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    chosen: Conversation
    rejected: Conversation

    @model_validator(mode="after")
    def _pair_checks(self) -> "HHRow":
        if self.chosen[:-1] != self.rejected[:-1]:
            raise PydanticCustomError("mismatched_conversations",
                                      "chosen and rejected differ before the final answer")
        if _norm(self.chosen[-1][1]) == _norm(self.rejected[-1][1]):
            raise PydanticCustomError("identical_answers", "chosen and rejected final answers are the same")
        return self


def _error_entry(err: dict) -> dict:
    """Map one pydantic error to {reason, field, message}; the reason comes from its type."""
    kind = err["type"]
    if kind in REJECT_REASONS:
        reason = kind
    elif kind == "missing" or (kind.endswith("_type") and err.get("input", 0) is None):
        reason = "missing_field"  # null counts as missing (Parquet has no "absent", only null)
    elif kind == "literal_error":
        reason = "bad_id"
    else:
        reason = "wrong_type"     # string_type, int_type, bool_type, dict_type, range errors...
    field = ".".join(str(p) for p in err["loc"]) or None
    return {"reason": reason, "field": field, "message": err["msg"]}


def _record_from(value: dict, fmt: str) -> tuple[str, dict | None, list[dict]]:
    """Validate one object; return (format, output record or None, errors)."""
    if fmt == "auto":
        is_hh = "chosen" in value and "rejected" in value and value.get("response_0") is None
        fmt = "hh" if is_hh else "pku"
    model = HHRow if fmt == "hh" else PKURow
    try:
        row = model.model_validate(value)
    except ValidationError as exc:
        return fmt, None, [_error_entry(e) for e in exc.errors(include_url=False)]
    if fmt == "hh":
        return fmt, {
            "prompt": row.chosen[-2][1],
            "context": [{"role": r, "text": t} for r, t in row.chosen[:-2]],
            "response_0": row.chosen[-1][1], "response_1": row.rejected[-1][1],
            "better_response_id": None, "safer_response_id": 0,  # harmlessness only
            "is_response_0_safe": None, "is_response_1_safe": None,
            "response_0_severity_level": None, "response_1_severity_level": None,
            "response_0_harm_category": [], "response_1_harm_category": [],
        }, []
    rec = {"prompt": row.prompt.strip(), "context": [],
           "response_0": row.response_0.strip(), "response_1": row.response_1.strip()}
    for name in ("better_response_id", "safer_response_id", "is_response_0_safe",
                 "is_response_1_safe", "response_0_severity_level", "response_1_severity_level"):
        rec[name] = getattr(row, name)
    for i in (0, 1):
        cats = getattr(row, f"response_{i}_harm_category") or {}
        rec[f"response_{i}_harm_category"] = [k for k, on in cats.items() if on]
    return fmt, rec, []


def _keys(rec: dict) -> tuple[str, str]:
    """(pair_id, prompt_id): dedupe key over prompt+context+answer pair, split key over prompt+context.
    Shared with the world generator (core/text.py), so its eval prompts land in the eval split."""
    return (pair_key(rec["prompt"], rec["response_0"], rec["response_1"], rec["context"]),
            prompt_key(rec["prompt"], rec["context"]))


# ---------------------------------------------------------------- writing
class _Outputs:
    """All output files, written under temp names in out_dir and renamed into place at the end."""

    def __init__(self, out_dir: Path):
        self.final = {name: out_dir / name for name in
                      ("train.parquet", "eval.parquet", "rejects.jsonl", "duplicates.jsonl")}
        self.tmp = {n: out_dir / f".{n}.{os.getpid()}.tmp" for n in self.final}
        self.parquet = {s: pq.ParquetWriter(self.tmp[f"{s}.parquet"], PAIR_SCHEMA) for s in ("train", "eval")}
        self.buffers: dict[str, list[dict]] = {"train": [], "eval": []}
        # backslashreplace: never fail on text that cannot be encoded
        self.jsonl = {n: open(self.tmp[n], "w", encoding="utf-8", errors="backslashreplace")
                      for n in ("rejects.jsonl", "duplicates.jsonl")}

    def add(self, split: str, rec: dict) -> None:
        self.buffers[split].append(rec)
        if len(self.buffers[split]) >= _BATCH:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if self.buffers[split]:
            self.parquet[split].write_batch(pa.RecordBatch.from_pylist(self.buffers[split], schema=PAIR_SCHEMA))
            self.buffers[split] = []

    def line(self, name: str, obj: dict) -> None:
        self.jsonl[name].write(json.dumps(obj, ensure_ascii=False) + "\n")

    def close(self, commit: bool) -> None:
        for split, writer in self.parquet.items():
            if commit:
                self._flush(split)
            writer.close()
        for f in self.jsonl.values():
            f.close()
        for name, tmp in self.tmp.items():
            if commit:
                os.replace(tmp, self.final[name])
            elif tmp.exists():
                tmp.unlink()


# ---------------------------------------------------------------- driver
def _checked_arguments(paths: list[str | Path], fmt: str, eval_fraction: float, max_row_bytes: int) -> list[Path]:
    """The input paths, once every argument is valid and every file is there: nothing is written before."""
    if fmt not in ("auto", "pku", "hh"):
        raise ValueError(f"fmt must be 'auto', 'pku' or 'hh', got {fmt!r}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if max_row_bytes <= 0:
        raise ValueError(f"max_row_bytes must be positive, got {max_row_bytes}")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(2, "ingest input file not found", str(p))
    return paths


def _ingest_row(item, src: str, fmt: str, eval_fraction: float, outputs, seen: dict, by_reason: dict, split_rows: dict) -> str:
    """One row read from `src`: rejected (with its reasons), a duplicate of a pair kept before, or
    accepted into its split -> the outcome's counter name."""
    where = {"source": src, item.pos_key: item.pos}
    if item.error:
        row_fmt, rec, errors = None, None, [item.error]
    else:
        row_fmt, rec, errors = _record_from(item.value, fmt)
    if errors:
        by_reason[errors[0]["reason"]] += 1
        reject = {**where, **errors[0], "errors": errors, "raw": item.raw}
        if item.raw_bytes is not None:
            reject["raw_bytes"] = item.raw_bytes
        outputs.line("rejects.jsonl", reject)
        return "rejected"
    pair_id, prompt_id = _keys(rec)
    if pair_id in seen:
        outputs.line("duplicates.jsonl", {**where, "duplicate_of": seen[pair_id]})
        return "duplicates"
    seen[pair_id] = where
    # split on the prompt alone: no prompt leaks across splits, order-independent
    split = "eval" if in_eval_split(rec["prompt"], eval_fraction, rec["context"]) else "train"
    split_rows[split] += 1
    outputs.add(split, {"pair_id": pair_id, "prompt_id": prompt_id, **rec, "source": src, "source_row": item.pos,
                        "source_format": row_fmt})
    return "accepted"


def ingest(paths: list[str | Path], out_dir: str | Path, *, fmt: str = "auto", eval_fraction: float = 0.1,
           max_reject_fraction: float = 1.0, max_row_bytes: int = 1_000_000,
           progress: Callable[[str], None] | None = None, limits: dict | None = None) -> dict:
    """Ingest preference files into out_dir; return (and write to summary.json) the accounting.
    limits: {path: N} reads only a file's first N rows."""
    paths = _checked_arguments(paths, fmt, eval_fraction, max_row_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _line: None)

    totals = {"read": 0, "accepted": 0, "rejected": 0, "duplicates": 0}
    by_reason = {r: 0 for r in REJECT_REASONS}
    by_source: dict[str, dict] = {}
    split_rows = {"train": 0, "eval": 0}
    seen: dict[str, dict] = {}  # pair_id -> where it was first kept
    outputs = _Outputs(out)
    try:
        for path in paths:
            src = str(path)
            container, gz = detect_container(path)
            stats = by_source.setdefault(src, {"read": 0, "accepted": 0, "rejected": 0, "duplicates": 0,
                                               "format": container + (".gz" if gz else "")})
            limit = (limits or {}).get(src)
            for item in iter_rows(path, container, gz, max_row_bytes):
                if limit is not None and stats["read"] >= limit:
                    break
                outcome = _ingest_row(item, src, fmt, eval_fraction, outputs, seen, by_reason, split_rows)
                for counter in (totals, stats):
                    counter["read"] += 1
                    counter[outcome] += 1
                if stats["read"] % _BATCH == 0:
                    say(f"{src}: {stats['read']} rows read")
            say(f"{src}: done, {stats['read']} read, {stats['accepted']} accepted, "
                f"{stats['rejected']} rejected, {stats['duplicates']} duplicates ({stats['format']})")
    except BaseException:
        outputs.close(commit=False)
        raise
    outputs.close(commit=True)

    assert totals["accepted"] + totals["rejected"] + totals["duplicates"] == totals["read"], totals
    assert split_rows["train"] + split_rows["eval"] == totals["accepted"], split_rows
    final = {k: str(v) for k, v in outputs.final.items()}
    summary = {**totals, "by_reason": by_reason, "rejects_path": final["rejects.jsonl"],
               "outputs": {"train": final["train.parquet"], "eval": final["eval.parquet"],
                           "rejects": final["rejects.jsonl"], "duplicates": final["duplicates.jsonl"]},
               "train_rows": split_rows["train"], "eval_rows": split_rows["eval"], "by_source": by_source}
    atomic_write_json(out / "summary.json", summary)

    if totals["read"] and totals["rejected"] / totals["read"] > max_reject_fraction:
        frac = totals["rejected"] / totals["read"]
        raise IngestError(
            f"{totals['rejected']} of {totals['read']} rows rejected (fraction {frac:.4f}), above "
            f"max_reject_fraction={max_reject_fraction}; see {final['rejects.jsonl']}", summary)
    return summary
