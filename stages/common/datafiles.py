"""Reading rows from data files: JSONL, JSON arrays and Parquet, gzip-compressed or not, detected
by content, not suffix; prompt files may also be CSV with a header row (by the suffix .csv or
.csv.gz: CSV has no signature). Every row keeps its position: JSONL and CSV rows by 1-based line
number (blank lines are skipped but counted, and a CSV's header is line 1, so numbers match an
editor), JSON array elements and Parquet rows by 0-based index. A file that cannot be read as a
whole (a broken JSON array, a corrupt Parquet file, a truncated gzip stream) yields one
`unparseable` row error instead of an exception.

Used by annotation ingest (stages/common/annotation_files.py), by prompt files (`read_prompt_files`:
red-team and evaluation prompts) and by labelled prompt sets (`read_prompt_sets`: evaluation
benchmarks such as XSTest, each row `safe` or `unsafe`).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq

RAW_PREVIEW = 1_000     # characters of an oversized row kept in a reject
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates = bytes that were not UTF-8


class Item(NamedTuple):
    pos_key: str                 # "line" or "index"
    pos: Optional[int]
    value: Any                   # the parsed row (None if it failed before parsing)
    raw: str
    error: Optional[dict] = None  # a reading-level reject, before validation
    raw_bytes: Optional[int] = None


def has_surrogate(value: Any) -> bool:
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


def row_error(reason: str, message: str) -> dict:
    return {"reason": reason, "field": None, "message": message}


def _open(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def detect_container(path: Path) -> tuple[str, bool]:
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


def _check_object(item: Item, value: Any, max_row_bytes: int) -> Item:
    """Row-level checks for JSON array elements and Parquet rows (JSONL checks its bytes instead)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    size = len(text.encode("utf-8", "surrogatepass"))  # UTF-8 size, as for a JSONL line
    bad_utf8 = has_surrogate(value)
    if bad_utf8:
        text = _show_bytes(text)
    if size > max_row_bytes:
        return item._replace(raw=text[:RAW_PREVIEW], raw_bytes=size, error=row_error(
            "oversized_row", f"row is {size} bytes, limit is {max_row_bytes}"))
    if bad_utf8:
        return item._replace(raw=text, error=row_error("invalid_utf8", "row contains bytes that are not valid UTF-8"))
    if not isinstance(value, dict):
        return item._replace(raw=text, error=row_error("not_an_object", f"row is a JSON {type(value).__name__}, not an object"))
    return item._replace(raw=text, value=value)


def _iter_jsonl(f, max_row_bytes: int) -> Iterator[Item]:
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
        item = Item("line", lineno, None, "")
        if size > max_row_bytes:
            preview = chunk[:4 * RAW_PREVIEW].decode("utf-8", "backslashreplace")[:RAW_PREVIEW]
            yield item._replace(raw=preview, raw_bytes=size, error=row_error(
                "oversized_row", f"line is {size} bytes, limit is {max_row_bytes}"))
            continue
        content = chunk[:size]
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield item._replace(raw=content.decode("utf-8", "backslashreplace"),
                                error=row_error("invalid_utf8", f"not valid UTF-8: {exc}"))
            continue
        item = item._replace(raw=text)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            yield item._replace(error=row_error("unparseable", f"not valid JSON: {exc}"))
            continue
        if has_surrogate(value):  # a lone \\u escape: valid JSON, but not encodable text
            yield item._replace(error=row_error("invalid_utf8", "row contains a lone surrogate escape"))
        elif not isinstance(value, dict):
            yield item._replace(error=row_error("not_an_object", f"row is a JSON {type(value).__name__}, not an object"))
        else:
            yield item._replace(value=value)


def _iter_json_array(f, max_row_bytes: int) -> Iterator[Item]:
    data = f.read()
    # surrogateescape: bad bytes survive as U+DC80..U+DCFF and are rejected per element
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    try:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError("top-level value is not an array")
    except (ValueError, RecursionError) as exc:
        preview = data[:4 * RAW_PREVIEW].decode("utf-8", "backslashreplace")[:RAW_PREVIEW]
        yield Item("index", None, None, preview, row_error("unparseable", f"JSON array does not parse: {exc}"), len(data))
        return
    del data, text
    for i, value in enumerate(rows):
        yield _check_object(Item("index", i, None, ""), value, max_row_bytes)


def _iter_parquet(f, max_row_bytes: int) -> Iterator[Item]:
    index = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            yield _check_object(Item("index", index, None, ""), value, max_row_bytes)
            index += 1


def _iter_csv(f, max_row_bytes: int) -> Iterator[Item]:
    """Rows of a CSV file with a header row, each a dict of its columns (all strings), by the line
    its record starts on (the header is line 1)."""
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
    try:
        for value in reader:  # line_num: the record's last line; a quoted field may span lines
            start = reader.line_num - sum(v.count("\n") for v in value.values() if isinstance(v, str))
            yield _check_object(Item("line", start, None, ""), value, max_row_bytes)
    except csv.Error as exc:
        yield Item("line", reader.line_num, None, "", row_error("unparseable", f"not valid CSV: {exc}"))


def is_csv(path: Path) -> bool:
    return path.name.lower().endswith((".csv", ".csv.gz"))


def iter_rows(path: Path, container: str, gz: bool, max_row_bytes: int) -> Iterator[Item]:
    reader = {"jsonl": _iter_jsonl, "json": _iter_json_array, "parquet": _iter_parquet, "csv": _iter_csv}[container]
    pos_key = "line" if container in ("jsonl", "csv") else "index"
    try:
        with _open(path, gz) as f:
            if container == "parquet" and gz:
                f = io.BytesIO(f.read())  # Parquet needs random access
            yield from reader(f, max_row_bytes)
    except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException) as exc:
        # corrupt/truncated file: rows read so far stand; the rest is one reject, not a crash
        yield Item(pos_key, None, None, "", row_error("unparseable", f"could not read the rest of the file: {exc}"))


# ---------------------------------------------------------------- prompt files
class PromptFileError(ValueError):
    """Rows of prompt files that do not validate, each named by file, row and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in prompt files:\n{shown}{more}")


def _prompt_row(value: dict) -> tuple[dict | None, list[tuple[str, str]]]:
    """(row, []) or (None, [(field, reason), ...]) for one object of a prompt file."""
    problems = []
    prompt = value.get("prompt")
    if prompt is None:
        problems.append(("prompt", "missing_field: every row needs a prompt"))
    elif not isinstance(prompt, str):
        problems.append(("prompt", f"wrong_type: expected a string, got {type(prompt).__name__}"))
    elif not prompt.strip():
        problems.append(("prompt", "empty_text: the prompt is empty or whitespace-only"))
    category = value.get("category")
    if category is not None and not isinstance(category, str):
        problems.append(("category", f"wrong_type: expected a string, got {type(category).__name__}"))
    harmful = value.get("harmful")
    if harmful is not None and not isinstance(harmful, bool):
        problems.append(("harmful", f"wrong_type: expected true or false, got {json.dumps(harmful)[:40]}"))
    if problems:
        return None, problems
    return {"prompt": prompt.strip(), "category": category or "unknown",
            "harmful": True if harmful is None else harmful}, []


def _read_prompt_file(path: Path, max_row_bytes: int, problems: list[str], check=_prompt_row) -> list[dict]:
    """The rows of one prompt file that `check` accepts, with "source" and "row"; each problem
    (file, row and field) is appended to `problems`."""
    if not path.is_file():
        problems.append(f"{path}: no such file")
        return []
    container, gz = detect_container(path)
    if is_csv(path):
        container = "csv"
    rows, before = [], len(problems)
    for item in iter_rows(path, container, gz, max_row_bytes):
        where = f"{path}: {item.pos_key} {item.pos}"
        if item.error:
            problems.append(f"{where}: {item.error['reason']}: {item.error['message']}")
            continue
        row, bad = check(item.value)
        problems += [f"{where}: field {field}: {reason}" for field, reason in bad]
        if row is not None:
            rows.append({**row, "source": str(path), "row": item.pos})
    if not rows and len(problems) == before:
        problems.append(f"{path}: holds no prompts")
    return rows


def read_prompt_files(paths: list[str | Path], max_row_bytes: int = 1_000_000) -> list[dict]:
    """Every row of every prompt file as {"prompt", "category", "harmful", "source", "row"}.

    A row has a `prompt` (a non-empty string), an optional `category` (string; "unknown" when
    absent) and an optional `harmful` (bool; rows without it are red-team prompts, so true).
    Other fields are ignored. Nothing is dropped: one bad row fails the whole read, and the error
    lists every bad row by file, row and field. Duplicate prompts are kept (they weigh more).
    """
    rows, problems = [], []
    for path in map(Path, paths):
        rows += _read_prompt_file(path, max_row_bytes, problems)
    if problems:
        raise PromptFileError(problems)
    return rows


PROMPT_LABELS = ("safe", "unsafe")  # a prompt set's row: one that should be answered, or one that should be refused


def _labelled_row(value: dict, set_label: str | None) -> tuple[dict | None, list[tuple[str, str]]]:
    """A prompt file's row (`_prompt_row`) with its label: the row's `label` field, else the set's."""
    row, problems = _prompt_row(value)
    label = value.get("label")
    if label is None or label == "":  # no column, or an empty CSV cell
        label = set_label
        if label is None:
            problems.append(("label", "missing_field: a prompt set's row needs a label, safe or unsafe "
                                      "(or give the whole set one: label in evaluate.prompt_sets)"))
    elif not isinstance(label, str):
        problems.append(("label", f"wrong_type: expected safe or unsafe, got {json.dumps(label)[:40]}"))
    elif label not in PROMPT_LABELS:
        problems.append(("label", f"unknown_label: expected safe or unsafe, got {label[:40]!r}"))
    elif set_label is not None and label != set_label:
        problems.append(("label", f"label_conflict: the row says {label}, its set's label is {set_label}"))
    if problems:
        return None, problems
    return {**row, "label": label, "harmful": label == "unsafe"}, []


def read_prompt_sets(sets, max_row_bytes: int = 1_000_000) -> list[dict]:
    """The rows of labelled prompt sets (`evaluate.prompt_sets`: each with `name`, `path`, an
    optional `label` for rows without one and an optional `limit`), as read_prompt_files' rows
    plus "set" (its name) and "label" (safe or unsafe; `harmful` is label == unsafe).

    A row's label is its `label` field (XSTest's column), else the set's. A row without a label in
    a set without one, a label other than safe or unsafe, or one that contradicts the set's is
    refused like any bad row: every one named by file, row and field. `limit`: a fixed random
    subset of that many rows (seeded by the set's name, so the same in every run), in file order,
    taken after the whole file has validated.
    """
    rows, problems = [], []
    for s in sets:
        got = _read_prompt_file(Path(s.path), max_row_bytes, problems, lambda v: _labelled_row(v, s.label))
        if s.limit is not None and s.limit < len(got):
            keep = sorted(random.Random(f"prompt-set-{s.name}").sample(range(len(got)), s.limit))
            got = [got[i] for i in keep]
        rows += [{**r, "set": s.name} for r in got]
    if problems:
        raise PromptFileError(problems)
    return rows
