"""Annotation ingest: preference files in, validated train/eval Parquet out.

Reads PKU-SafeRLHF rows (two answers, helpfulness *and* safety labels) and
Anthropic HH-RLHF rows (chosen/rejected conversations, harmlessness only),
validates every row with pydantic, de-duplicates, splits train/eval by prompt
hash and writes Parquet with the declared ``PAIR_SCHEMA``.  Every row read is
accounted for: it is accepted (train or eval), rejected (``rejects.jsonl``,
with the original text so it can be fixed) or a duplicate
(``duplicates.jsonl``, pointing at the row that was kept).

Containers (JSONL, JSON array, Parquet, each optionally gzipped) are detected
by content, not suffix.  Row positions: JSONL rows are identified by their
1-based line number (blank or whitespace-only lines are skipped but still
counted as lines, so numbers match an editor); JSON array elements and Parquet
rows by their 0-based index.  A file that cannot be parsed as a whole (a broken
JSON array, a corrupt Parquet file, a truncated gzip stream) becomes one
``unparseable`` reject with a null position instead of an exception.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt,
                      StrictStr, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from stages.text import in_eval_split, normalize, pair_key, prompt_key

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
_RAW_PREVIEW = 1_000     # characters of an oversized row kept in the rejects file
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates = bytes that were not UTF-8
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


def _parse_conversation(text: str) -> list[tuple[str, str]]:
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
Conversation = Annotated[StrictStr, AfterValidator(_parse_conversation)]  # holds turns once valid


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
    Shared with the world generator (stages/text.py), so its eval prompts land in the eval split."""
    return (pair_key(rec["prompt"], rec["response_0"], rec["response_1"], rec["context"]),
            prompt_key(rec["prompt"], rec["context"]))


# ---------------------------------------------------------------- reading
class _Item(NamedTuple):
    pos_key: str                 # "line" or "index"
    pos: Optional[int]
    value: Any                   # the parsed row (None if it failed before parsing)
    raw: str
    error: Optional[dict] = None  # a reading-level reject, before validation
    raw_bytes: Optional[int] = None


def _has_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: deeply nested rows must not hit the recursion limit
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _err(reason: str, message: str) -> dict:
    return {"reason": reason, "field": None, "message": message}


def _open(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _detect(path: Path) -> tuple[str, bool]:
    """Container by content: gzip magic, then PAR1, else JSON array vs JSONL by first byte."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with _open(path, gz) as f:
            buf = f.read(4)
            if buf == b"PAR1":
                return "parquet", gz
            buf = buf.removeprefix(b"\xef\xbb\xbf")
            while buf:
                stripped = buf.lstrip()
                if stripped:
                    return ("json" if stripped[:1] == b"[" else "jsonl"), gz
                buf = f.read(65536)
    except (OSError, EOFError, zlib.error):
        pass  # corrupt gzip: the reader reports it as an unparseable reject
    return "jsonl", gz


def _show_bytes(text: str) -> str:
    """Text holding escaped bad bytes (U+DC80..U+DCFF) -> the original bytes shown as \\x.. escapes."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates (from JSON \\u escapes)
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "backslashreplace")


def _check_object(item: _Item, value: Any, max_row_bytes: int) -> _Item:
    """Row-level checks for JSON array elements and Parquet rows (JSONL checks its bytes instead)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    size = len(text.encode("utf-8", "surrogatepass"))  # UTF-8 size, as for a JSONL line
    bad_utf8 = _has_surrogate(value)
    if bad_utf8:
        text = _show_bytes(text)
    if size > max_row_bytes:
        return item._replace(raw=text[:_RAW_PREVIEW], raw_bytes=size, error=_err(
            "oversized_row", f"row is {size} bytes, limit is {max_row_bytes}"))
    if bad_utf8:
        return item._replace(raw=text, error=_err("invalid_utf8", "row contains bytes that are not valid UTF-8"))
    if not isinstance(value, dict):
        return item._replace(raw=text, error=_err("not_an_object", f"row is a JSON {type(value).__name__}, not an object"))
    return item._replace(raw=text, value=value)


def _iter_jsonl(f, max_row_bytes: int) -> Iterator[_Item]:
    lineno = 0
    while True:
        # readline with a limit keeps memory bounded even for a multi-GB line
        chunk = f.readline(max_row_bytes + 2)
        if not chunk:
            return
        lineno += 1
        if lineno == 1:
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")
        size, blank, last = len(chunk), not chunk.strip(), chunk
        while len(last) and not last.endswith(b"\n") and size > max_row_bytes:
            last = f.readline(1 << 20)  # drain the rest of an oversized line
            size += len(last)
            blank = blank and not last.strip()
        if blank:
            continue  # blank lines are not rows (but still count as lines)
        size -= last.endswith(b"\n") + last.endswith(b"\r\n")  # exclude the line terminator
        item = _Item("line", lineno, None, "")
        if size > max_row_bytes:
            preview = chunk[:4 * _RAW_PREVIEW].decode("utf-8", "backslashreplace")[:_RAW_PREVIEW]
            yield item._replace(raw=preview, raw_bytes=size, error=_err(
                "oversized_row", f"line is {size} bytes, limit is {max_row_bytes}"))
            continue
        content = chunk[:size]
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield item._replace(raw=content.decode("utf-8", "backslashreplace"),
                                error=_err("invalid_utf8", f"not valid UTF-8: {exc}"))
            continue
        item = item._replace(raw=text)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            yield item._replace(error=_err("unparseable", f"not valid JSON: {exc}"))
            continue
        if _has_surrogate(value):  # a lone \\u escape: valid JSON, but not encodable text
            yield item._replace(error=_err("invalid_utf8", "row contains a lone surrogate escape"))
        elif not isinstance(value, dict):
            yield item._replace(error=_err("not_an_object", f"row is a JSON {type(value).__name__}, not an object"))
        else:
            yield item._replace(value=value)


def _iter_json_array(f, max_row_bytes: int) -> Iterator[_Item]:
    data = f.read()
    # surrogateescape: bad bytes survive as U+DC80..U+DCFF and are rejected per element
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    try:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError("top-level value is not an array")
    except (ValueError, RecursionError) as exc:
        preview = data[:4 * _RAW_PREVIEW].decode("utf-8", "backslashreplace")[:_RAW_PREVIEW]
        yield _Item("index", None, None, preview, _err("unparseable", f"JSON array does not parse: {exc}"), len(data))
        return
    del data, text
    for i, value in enumerate(rows):
        yield _check_object(_Item("index", i, None, ""), value, max_row_bytes)


def _iter_parquet(f, max_row_bytes: int) -> Iterator[_Item]:
    index = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            yield _check_object(_Item("index", index, None, ""), value, max_row_bytes)
            index += 1


def _iter_rows(path: Path, container: str, gz: bool, max_row_bytes: int) -> Iterator[_Item]:
    reader = {"jsonl": _iter_jsonl, "json": _iter_json_array, "parquet": _iter_parquet}[container]
    pos_key = "line" if container == "jsonl" else "index"
    try:
        with _open(path, gz) as f:
            if container == "parquet" and gz:
                f = io.BytesIO(f.read())  # Parquet needs random access
            yield from reader(f, max_row_bytes)
    except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException) as exc:
        # corrupt/truncated file: rows read so far stand; the rest is one reject, not a crash
        yield _Item(pos_key, None, None, "", _err("unparseable", f"could not read the rest of the file: {exc}"))


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


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- driver
def ingest(paths: list[str | Path], out_dir: str | Path, *, fmt: str = "auto", eval_fraction: float = 0.1,
           max_reject_fraction: float = 1.0, max_row_bytes: int = 1_000_000,
           progress: Callable[[str], None] | None = None) -> dict:
    """Ingest preference files into out_dir; return (and write to summary.json) the accounting."""
    if fmt not in ("auto", "pku", "hh"):
        raise ValueError(f"fmt must be 'auto', 'pku' or 'hh', got {fmt!r}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if max_row_bytes <= 0:
        raise ValueError(f"max_row_bytes must be positive, got {max_row_bytes}")
    paths = [Path(p) for p in paths]
    for p in paths:  # fail before writing anything
        if not p.is_file():
            raise FileNotFoundError(2, "ingest input file not found", str(p))
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
            container, gz = _detect(path)
            stats = by_source.setdefault(src, {"read": 0, "accepted": 0, "rejected": 0, "duplicates": 0,
                                               "format": container + (".gz" if gz else "")})
            for item in _iter_rows(path, container, gz, max_row_bytes):
                where = {"source": src, item.pos_key: item.pos}
                if item.error:
                    row_fmt, rec, errors = None, None, [item.error]
                else:
                    row_fmt, rec, errors = _record_from(item.value, fmt)
                if errors:
                    outcome = "rejected"
                    by_reason[errors[0]["reason"]] += 1
                    reject = {**where, **errors[0], "errors": errors, "raw": item.raw}
                    if item.raw_bytes is not None:
                        reject["raw_bytes"] = item.raw_bytes
                    outputs.line("rejects.jsonl", reject)
                else:
                    pair_id, prompt_id = _keys(rec)
                    if pair_id in seen:
                        outcome = "duplicates"
                        outputs.line("duplicates.jsonl", {**where, "duplicate_of": seen[pair_id]})
                    else:
                        outcome = "accepted"
                        seen[pair_id] = where
                        # split on the prompt alone: no prompt leaks across splits, order-independent
                        split = "eval" if in_eval_split(rec["prompt"], eval_fraction, rec["context"]) else "train"
                        split_rows[split] += 1
                        outputs.add(split, {"pair_id": pair_id, "prompt_id": prompt_id, **rec, "source": src,
                                            "source_row": item.pos, "source_format": row_fmt})
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
    _write_json_atomic(out / "summary.json", summary)

    if totals["read"] and totals["rejected"] / totals["read"] > max_reject_fraction:
        frac = totals["rejected"] / totals["read"]
        raise IngestError(
            f"{totals['rejected']} of {totals['read']} rows rejected (fraction {frac:.4f}), above "
            f"max_reject_fraction={max_reject_fraction}; see {final['rejects.jsonl']}", summary)
    return summary


# ---------------------------------------------------------------- the `ingest` stage
def run(ctx):
    """Ingest the world's annotations (when enabled), every round's labels so far (`annotate@k`)
    and every configured source: refits train on all data so far."""
    from stages.base import StageResult

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
                     progress=ctx.log)
    metrics = {k: summary[k] for k in ("read", "accepted", "rejected", "duplicates", "train_rows", "eval_rows")}
    metrics["by_reason"] = {k: v for k, v in summary["by_reason"].items() if v}
    return StageResult({"train": "train.parquet", "eval": "eval.parquet", "rejects": "rejects.jsonl",
                        "duplicates": "duplicates.jsonl", "summary": "summary.json"}, metrics)
