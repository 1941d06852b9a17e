"""Behaviour tests for stages.ingest (annotation ingest: validate, dedupe, split, write)."""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.annotation_files import PAIR_SCHEMA, REJECT_REASONS, IngestError, ingest

from tests.conftest import HH_FILE


# ---------------------------------------------------------------- helpers
def pku(prompt="How do I keep my accounts safe?", r0="Use a password manager.",
        r1="Reuse one short password everywhere.", **overrides) -> dict:
    row = {"prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "test",
           "better_response_id": 0, "safer_response_id": 0,
           "is_response_0_safe": True, "is_response_1_safe": False}
    row.update(overrides)
    return row


def convo(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{'Human' if role == 'h' else 'Assistant'}: {text}" for role, text in turns)


def hh(before: list[tuple[str, str]], chosen: str, rejected: str) -> dict:
    return {"chosen": convo(before + [("a", chosen)]), "rejected": convo(before + [("a", rejected)])}


def write_jsonl(path: Path, rows: list, compress: bool = False) -> Path:
    """rows: dicts (dumped) or bytes (written verbatim as one line)."""
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def output_rows(summary: dict, split: str) -> list[dict]:
    return pq.read_table(summary["outputs"][split]).to_pylist()


def split_of_prompts(summary: dict) -> dict[str, str]:
    return {r["prompt"]: split for split in ("train", "eval") for r in output_rows(summary, split)}


def assert_accounting(s: dict) -> None:
    assert s["accepted"] + s["rejected"] + s["duplicates"] == s["read"]
    assert s["train_rows"] + s["eval_rows"] == s["accepted"]
    assert sum(s["by_reason"].values()) == s["rejected"]


# ---------------------------------------------------------------- rejects
def test_each_bad_row_gets_its_exact_reason_field_and_line(tmp_path):
    lines = [
        pku(),                                                          # 1 valid
        b"   \t",                                                       # 2 blank: not a row
        b'{"prompt": "caf\xe9", "response_0": "a", "response_1": "b"}',  # 3 invalid_utf8
        pku(prompt="x" * 5000),                                         # 4 oversized_row
        b"{this is not json",                                           # 5 unparseable
        [1, 2, 3],                                                      # 6 not_an_object
        {k: v for k, v in pku().items() if k != "response_1"},          # 7 missing_field
        pku(better_response_id="1"),                                    # 8 wrong_type
        pku(safer_response_id=2),                                       # 9 bad_id
        pku(prompt="  \n\t "),                                          # 10 empty_text
        pku(r0="Call  the police.", r1=" call the POLICE. "),           # 11 identical_answers
        pku(is_response_0_safe=False, is_response_1_safe=True),         # 12 contradictory_labels
        {"chosen": convo([("h", "hi"), ("a", "A")]),                    # 13 mismatched_conversations
         "rejected": convo([("h", "hello"), ("a", "B")])},
        {"chosen": convo([("h", "hi"), ("a", "A"), ("h", "more?")]),    # 14 malformed_conversation
         "rejected": convo([("h", "hi"), ("a", "B")])},
        hh([("h", "Can you help me pick a lock?")], "No.", "Sure, here is how."),  # 15 valid HH
        pku(r0="reuse ONE short password   everywhere.", r1="Use a password manager."),  # 16 duplicate of 1
        pku(prompt="Is it safe to eat raw chicken?", r0="No.", r1="Yes, always."),  # 17 valid
    ]
    src = write_jsonl(tmp_path / "mixed.jsonl", lines)
    s = ingest([src], tmp_path / "out", max_row_bytes=2000)

    got = [(r["line"], r["reason"], r["field"]) for r in read_jsonl(s["rejects_path"])]
    assert got == [
        (3, "invalid_utf8", None), (4, "oversized_row", None), (5, "unparseable", None),
        (6, "not_an_object", None), (7, "missing_field", "response_1"),
        (8, "wrong_type", "better_response_id"), (9, "bad_id", "safer_response_id"),
        (10, "empty_text", "prompt"), (11, "identical_answers", None),
        (12, "contradictory_labels", None), (13, "mismatched_conversations", None),
        (14, "malformed_conversation", "chosen"),
    ]
    assert s["by_reason"] == {reason: 1 for reason in REJECT_REASONS}
    assert (s["read"], s["accepted"], s["rejected"], s["duplicates"]) == (16, 3, 12, 1)
    assert_accounting(s)
    assert read_jsonl(s["outputs"]["duplicates"]) == [
        {"source": str(src), "line": 16, "duplicate_of": {"source": str(src), "line": 1}}]
    kept = sorted((r["source_row"], r["source_format"]) for sp in ("train", "eval") for r in output_rows(s, sp))
    assert kept == [(1, "pku"), (15, "hh"), (17, "pku")]


def test_row_with_several_errors_is_rejected_once_with_all_errors_recorded(tmp_path):
    row = {k: v for k, v in pku(better_response_id="x", safer_response_id=5).items() if k != "prompt"}
    s = ingest([write_jsonl(tmp_path / "a.jsonl", [row])], tmp_path / "out")
    (rej,) = read_jsonl(s["rejects_path"])
    assert (rej["reason"], rej["field"]) == ("missing_field", "prompt")  # first error is primary
    assert [(e["reason"], e["field"]) for e in rej["errors"]] == [
        ("missing_field", "prompt"), ("wrong_type", "better_response_id"), ("bad_id", "safer_response_id")]
    assert s["rejected"] == 1 and s["by_reason"]["missing_field"] == 1 and s["by_reason"]["bad_id"] == 0


def test_rejects_keep_the_original_text_needed_to_fix_the_row(tmp_path):
    bad_bytes = b'{"prompt": "caf\xe9"}'
    wrong = pku(better_response_id="1")
    src = write_jsonl(tmp_path / "a.jsonl", [bad_bytes, pku(prompt="y" * 3000), wrong])
    s = ingest([src], tmp_path / "out", max_row_bytes=1500)
    utf8, big, typed = read_jsonl(s["rejects_path"])
    assert utf8["raw"] == '{"prompt": "caf\\xe9"}'  # bad byte shown, not dropped
    assert len(big["raw"]) == 1000 and big["raw"].startswith('{"prompt": "yyy')
    assert big["raw_bytes"] == len(json.dumps(pku(prompt="y" * 3000)).encode())
    assert json.loads(typed["raw"]) == wrong and "raw_bytes" not in typed
    assert typed["message"] and typed["errors"][0]["message"] == typed["message"]


@pytest.mark.parametrize("value, field", [
    (1.0, "better_response_id"), (True, "better_response_id"), ("0", "safer_response_id"),
    ("true", "is_response_0_safe"), (1, "is_response_1_safe"), (5, "prompt"),
])
def test_strict_types_are_not_coerced(tmp_path, value, field):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", [pku(**{field: value})])], tmp_path / "out")
    (rej,) = read_jsonl(s["rejects_path"])
    assert (rej["reason"], rej["field"]) == ("wrong_type", field)


def test_null_required_field_counts_as_missing(tmp_path):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", [pku(response_0=None)])], tmp_path / "out")
    assert [(r["reason"], r["field"]) for r in read_jsonl(s["rejects_path"])] == [("missing_field", "response_0")]


def test_lone_surrogate_escape_in_jsonl_is_invalid_utf8(tmp_path):
    line = json.dumps(pku()).replace("accounts", "acc\\udc80ounts").encode()
    s = ingest([write_jsonl(tmp_path / "a.jsonl", [line])], tmp_path / "out")
    assert s["by_reason"]["invalid_utf8"] == 1 and s["accepted"] == 0


def test_pku_optional_fields_are_validated_and_written(tmp_path):
    good = pku(response_0_harm_category={"Violence": False, "Privacy": False},
               response_1_harm_category={"Violence": True, "Cybercrime": True, "Privacy": False},
               response_0_severity_level=0, response_1_severity_level=2)
    bad_cat = pku(prompt="p2", response_0_harm_category={"Violence": "yes"})
    bad_sev = pku(prompt="p3", response_1_severity_level=300)  # does not fit int8
    s = ingest([write_jsonl(tmp_path / "a.jsonl", [good, bad_cat, bad_sev])], tmp_path / "out", eval_fraction=0)
    (row,) = output_rows(s, "train")
    assert row["response_0_harm_category"] == [] and row["response_1_harm_category"] == ["Violence", "Cybercrime"]
    assert (row["response_0_severity_level"], row["response_1_severity_level"]) == (0, 2)
    assert (row["better_response_id"], row["safer_response_id"], row["is_response_1_safe"]) == (0, 0, False)
    assert [(r["reason"], r["field"]) for r in read_jsonl(s["rejects_path"])] == [
        ("wrong_type", "response_0_harm_category.Violence"), ("wrong_type", "response_1_severity_level")]


@pytest.mark.parametrize("fmt, row, field", [
    ("hh", pku(), "chosen"), ("pku", hh([("h", "q")], "no", "yes"), "prompt")])
def test_forced_format_validates_against_that_schema(tmp_path, fmt, row, field):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", [row])], tmp_path / "out", fmt=fmt)
    assert [(r["reason"], r["field"]) for r in read_jsonl(s["rejects_path"])] == [("missing_field", field)]


# ---------------------------------------------------------------- containers
ROWS = [pku(prompt=f"question {i}", r0=f"safe answer {i}", r1=f"unsafe answer {i}") for i in range(3)]
BAD = {k: v for k, v in pku(prompt="question bad").items() if k != "response_1"}


def _gz_jsonl(p):  # deliberately misleading suffixes: detection is by content
    return write_jsonl(p / "rows.json", ROWS + [BAD], compress=True)


def _json_array(p):
    (p / "rows.jsonl").write_text("\n  " + json.dumps(ROWS + [BAD], indent=1))
    return p / "rows.jsonl"


def _gz_json_array(p):
    (p / "rows.dat").write_bytes(gzip.compress(json.dumps(ROWS + [BAD]).encode()))
    return p / "rows.dat"


def _parquet(p):
    pq.write_table(pa.Table.from_pylist(ROWS + [BAD]), p / "rows.json")  # BAD's response_1 -> null
    return p / "rows.json"


def _gz_parquet(p):
    pq.write_table(pa.Table.from_pylist(ROWS + [BAD]), p / "x.parquet")
    (p / "rows.bin").write_bytes(gzip.compress((p / "x.parquet").read_bytes()))
    return p / "rows.bin"


@pytest.mark.parametrize("make, pos_key, bad_pos, fmt", [
    (_gz_jsonl, "line", 4, "jsonl.gz"), (_json_array, "index", 3, "json"),
    (_gz_json_array, "index", 3, "json.gz"), (_parquet, "index", 3, "parquet"),
    (_gz_parquet, "index", 3, "parquet.gz")])
def test_every_container_is_read_by_content(tmp_path, make, pos_key, bad_pos, fmt):
    src = make(tmp_path)
    s = ingest([src], tmp_path / "out", eval_fraction=0)
    assert (s["read"], s["accepted"], s["rejected"]) == (4, 3, 1)
    assert s["by_source"][str(src)]["format"] == fmt
    (rej,) = read_jsonl(s["rejects_path"])
    assert (rej[pos_key], rej["reason"], rej["field"]) == (bad_pos, "missing_field", "response_1")
    out = output_rows(s, "train")
    assert [r["prompt"] for r in out] == ["question 0", "question 1", "question 2"]
    first = 1 if pos_key == "line" else 0
    assert [r["source_row"] for r in out] == [first, first + 1, first + 2]


def test_json_array_bad_bytes_are_invalid_utf8_by_index(tmp_path):
    body = b'[' + json.dumps(ROWS[0]).encode() + b', {"prompt": "caf\xe9"}, [1], 7]'
    (tmp_path / "a.json").write_bytes(body)
    s = ingest([tmp_path / "a.json"], tmp_path / "out")
    rejects = read_jsonl(s["rejects_path"])
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, "invalid_utf8"), (2, "not_an_object"), (3, "not_an_object")]
    assert rejects[0]["raw"] == '{"prompt": "caf\\xe9"}'
    assert s["accepted"] == 1


def test_json_array_oversized_element_is_rejected(tmp_path):
    big = pku(prompt="z" * 3000)
    (tmp_path / "a.json").write_text(json.dumps([ROWS[0], big]))
    s = ingest([tmp_path / "a.json"], tmp_path / "out", max_row_bytes=500)
    (rej,) = read_jsonl(s["rejects_path"])
    assert (rej["index"], rej["reason"]) == (1, "oversized_row")
    assert rej["raw_bytes"] == len(json.dumps(big).encode()) and len(rej["raw"]) == 1000


def test_unparseable_json_array_is_one_reject_not_an_exception(tmp_path):
    (tmp_path / "a.json").write_text('[{"prompt": "x", ')
    s = ingest([tmp_path / "a.json"], tmp_path / "out")
    assert (s["read"], s["rejected"], s["by_reason"]["unparseable"]) == (1, 1, 1)
    (rej,) = read_jsonl(s["rejects_path"])
    assert rej["index"] is None and rej["raw"] == '[{"prompt": "x", '


def test_truncated_gzip_keeps_good_rows_and_accounts_for_the_rest(tmp_path):
    rows = [pku(prompt=f"q{i}", r0=f"a{i} " * 50, r1=f"b{i} " * 50) for i in range(300)]
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) - 200])
    s = ingest([tmp_path / "t.jsonl.gz"], tmp_path / "out")
    assert_accounting(s)
    assert s["accepted"] > 0 and read_jsonl(s["rejects_path"])[-1]["reason"] == "unparseable"


def test_missing_input_file_raises_before_writing(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ingest([write_jsonl(tmp_path / "a.jsonl", ROWS), missing], tmp_path / "out")
    assert not (tmp_path / "out" / "train.parquet").exists()


# ---------------------------------------------------------------- HH
def test_hh_three_turn_conversation_gives_prompt_context_and_answers(tmp_path):
    before = [("h", "  How do I bake bread? "), ("a", "Mix flour and water.  "),
              ("h", "How long?"), ("a", "About an hour."), ("h", " And how do I poison someone's bread?")]
    row = hh(before, "  I can't help with that. ", "Add some rat poison.")
    s = ingest([write_jsonl(tmp_path / "hh.jsonl", [row])], tmp_path / "out", eval_fraction=0)
    (out,) = output_rows(s, "train")
    assert out["prompt"] == "And how do I poison someone's bread?"
    assert out["context"] == [
        {"role": "user", "text": "How do I bake bread?"}, {"role": "assistant", "text": "Mix flour and water."},
        {"role": "user", "text": "How long?"}, {"role": "assistant", "text": "About an hour."}]
    assert (out["response_0"], out["response_1"]) == ("I can't help with that.", "Add some rat poison.")
    assert (out["safer_response_id"], out["better_response_id"]) == (0, None)
    assert (out["is_response_0_safe"], out["is_response_1_safe"], out["source_format"]) == (None, None, "hh")


def test_hh_empty_final_answer_is_empty_text(tmp_path):
    row = hh([("h", "hi")], "", "go away")
    s = ingest([write_jsonl(tmp_path / "hh.jsonl", [row])], tmp_path / "out")
    assert [(r["reason"], r["field"]) for r in read_jsonl(s["rejects_path"])] == [("empty_text", "chosen")]


def test_real_hh_file_is_fully_accounted_for(tmp_path):
    s = ingest([HH_FILE], tmp_path / "out")
    assert s["read"] == 2312
    assert_accounting(s)
    # known data defects: 4 empty final answers, 5 turns glued without "\n\n" before "Human:"
    assert (s["accepted"], s["rejected"], s["duplicates"]) == (2303, 9, 0)
    assert {k: v for k, v in s["by_reason"].items() if v} == {"empty_text": 4, "malformed_conversation": 5}
    assert len(read_jsonl(s["rejects_path"])) == 9
    assert all(r["context"] is not None for r in output_rows(s, "eval"))


# ---------------------------------------------------------------- dedupe and split
def test_duplicates_across_files_point_to_the_kept_row(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], ROWS[1]])
    b = write_jsonl(tmp_path / "b.jsonl", [pku(prompt="other"), dict(ROWS[1], safer_response_id=1,
                                                                      is_response_0_safe=False,
                                                                      is_response_1_safe=True)])
    s = ingest([a, b], tmp_path / "out")
    assert read_jsonl(s["outputs"]["duplicates"]) == [
        {"source": str(b), "line": 2, "duplicate_of": {"source": str(a), "line": 2}}]
    assert s["by_source"][str(b)]["duplicates"] == 1 and s["by_source"][str(a)]["accepted"] == 2


def _prompt_rows(n_prompts: int, answers_per_prompt: int = 1) -> list[dict]:
    return [pku(prompt=f"Prompt number {p}", r0=f"good {p}.{k}", r1=f"bad {p}.{k}")
            for p in range(n_prompts) for k in range(answers_per_prompt)]


def test_split_never_puts_a_prompt_in_both_splits(tmp_path):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", _prompt_rows(200, 3))], tmp_path / "out", eval_fraction=0.3)
    train = {r["prompt"] for r in output_rows(s, "train")}
    evals = {r["prompt"] for r in output_rows(s, "eval")}
    assert train and evals and not train & evals
    assert s["accepted"] == 600 and len(train | evals) == 200


def test_split_is_independent_of_row_order_and_other_files(tmp_path):
    rows = _prompt_rows(300)
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    base = ingest([write_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "o1", eval_fraction=0.2)
    again = ingest([write_jsonl(tmp_path / "b.jsonl", shuffled)], tmp_path / "o2", eval_fraction=0.2)
    extra = write_jsonl(tmp_path / "c.jsonl", [pku(prompt=f"extra {i}") for i in range(50)])
    more = ingest([extra, tmp_path / "a.jsonl"], tmp_path / "o3", eval_fraction=0.2)
    expected = split_of_prompts(base)
    assert 0 < base["eval_rows"] < 300
    assert split_of_prompts(again) == expected
    assert {p: sp for p, sp in split_of_prompts(more).items() if not p.startswith("extra")} == expected


def test_eval_share_is_near_eval_fraction(tmp_path):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", _prompt_rows(2000))], tmp_path / "out", eval_fraction=0.1)
    assert s["accepted"] == 2000
    assert 0.08 <= s["eval_rows"] / 2000 <= 0.12


def test_output_rows_keep_input_order(tmp_path):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", _prompt_rows(50))], tmp_path / "out", eval_fraction=0.5)
    for split in ("train", "eval"):
        rows = [r["source_row"] for r in output_rows(s, split)]
        assert rows == sorted(rows) and rows


# ---------------------------------------------------------------- limits and outputs
def test_too_many_rejects_raise_after_outputs_are_written(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS[:2] + [b"nope", pku(safer_response_id=3)])
    out = tmp_path / "out"
    with pytest.raises(IngestError) as info:
        ingest([src], out, max_reject_fraction=0.25)
    msg = str(info.value)
    assert "0.5" in msg and "0.25" in msg and str(out / "rejects.jsonl") in msg
    assert len(read_jsonl(out / "rejects.jsonl")) == 2
    assert json.loads((out / "summary.json").read_text())["rejected"] == 2
    assert pq.read_table(out / "train.parquet").num_rows + pq.read_table(out / "eval.parquet").num_rows == 2
    # at exactly the limit it passes: only *exceeding* it is an error
    assert ingest([src], tmp_path / "out2", max_reject_fraction=0.5)["rejected"] == 2


def test_outputs_have_the_declared_schema_even_when_empty(tmp_path):
    s = ingest([write_jsonl(tmp_path / "a.jsonl", ROWS + [hh([("h", "q")], "no", "yes")])],
               tmp_path / "out", eval_fraction=0)
    assert s["eval_rows"] == 0 and s["train_rows"] == 4
    for split in ("train", "eval"):
        assert pq.read_schema(s["outputs"][split]).equals(PAIR_SCHEMA)
        assert pq.read_table(s["outputs"][split]).schema.equals(PAIR_SCHEMA)


def test_summary_file_matches_return_value_and_no_temp_files_remain(tmp_path):
    out = tmp_path / "out"
    s = ingest([write_jsonl(tmp_path / "a.jsonl", ROWS)], out)
    assert json.loads((out / "summary.json").read_text()) == s
    assert set(s) == {"read", "accepted", "rejected", "duplicates", "by_reason", "rejects_path", "outputs",
                      "train_rows", "eval_rows", "by_source"}
    assert s["outputs"] == {"train": str(out / "train.parquet"), "eval": str(out / "eval.parquet"),
                            "rejects": str(out / "rejects.jsonl"), "duplicates": str(out / "duplicates.jsonl")}
    assert sorted(os.listdir(out)) == ["duplicates.jsonl", "eval.parquet", "rejects.jsonl",
                                       "summary.json", "train.parquet"]


def test_progress_reports_every_10000_rows_and_at_end_of_file(tmp_path):
    lines: list[str] = []
    src = write_jsonl(tmp_path / "a.jsonl", _prompt_rows(10_050))
    ingest([src], tmp_path / "out", progress=lines.append)
    assert len(lines) == 2 and "10000" in lines[0]
    assert str(src) in lines[1] and "10050 read" in lines[1]
