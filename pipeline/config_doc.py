"""docs/configuration.md, written from the config schema (`safe-rlhf config-doc`).

Every field of `pipeline.config.RunConfig` has a one-line description (tests/test_config.py checks
it); this prints them as one reference, a table per section, so the document cannot drift from the
code: tests/test_docs.py checks that the committed file is what this writes.
"""
from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from core.schema import is_operational
from pipeline.config import RunConfig, _submodel

HEADER = """# Configuration reference

Generated from the config schema (`pipeline/config.py` and the settings it composes) by `safe-rlhf config-doc --out
docs/configuration.md`; do not edit by hand (a test checks that this file is current).

A run's config is one YAML file (`configs/tiny.yaml` is the default run's). Every key is optional;
what is left out takes the default below. `safe-rlhf validate FILE` checks a file and names every
bad field (`safe_rlhf.rounds[1].steps: ...`); an unknown key is an error, never ignored.

Fields marked *operational* say how a run is carried out, not what it computes: changing one does
not make a finished stage run again on `resume`. Any other change does, for the stages it feeds.
Relative file paths (data, prompt files, model directories) are read from the directory the command
runs in, and the run's saved `config.yaml` holds them made absolute.
"""


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML: `int`, `float | auto`, `hf | vllm`, `list of rounds`."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"list of {type_name(item)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: Any) -> str:
    if info.default is PydanticUndefined:
        return "required" if info.default_factory is None else default_text_of(info.default_factory())
    return default_text_of(info.default)


def default_text_of(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(below)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} item(s) (below)"
    return f"`{json.dumps(value)}`"


def rows(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple]]:
    """Table rows for the plain fields of `model` (dotted under `prefix`), then tables for its sub-models."""
    out, subs = [], []
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        key = f"{prefix}{name}"
        if sub is not None and typing.get_origin(info.annotation) is list:
            subs.append((f"{key}[]", sub, info))
            out.append(f"| `{key}` | list of mappings (`{key}[]` below) | {default_text(info)} | {cell(info)} |")
        elif sub is not None:
            subs.append((key, sub, info))
        else:
            out.append(f"| `{key}` | {type_name(info.annotation)} | {default_text(info)} | {cell(info)} |")
    return out, subs


def cell(info: Any) -> str:
    text = re.sub(r"\s+", " ", info.description or "").replace("|", "\\|").strip()
    return f"{text} *operational*" if is_operational(info) else text


def section(key: str, model: type[BaseModel], description: str, level: int) -> list[str]:
    plain, subs = rows(model, f"{key}." if key else "")
    lines = [f"{'#' * level} `{key}`" if key else f"{'#' * level} Top level", ""]
    child_level = min(level + 1, 4) if key else level  # the run's sections are headings of the top level's rank
    if description:
        lines += [description, ""]
    if plain:
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |", *plain, ""]
    for sub_key, sub, info in subs:
        lines += section(sub_key, sub, cell(info), child_level)
    return lines


def config_markdown() -> str:
    return "\n".join([HEADER, *section("", RunConfig, "", 2)]).rstrip() + "\n"
