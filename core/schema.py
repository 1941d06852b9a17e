"""The config schema's building blocks, shared by every layer that defines the settings it reads:
a strict model (an unknown key is an error), a field with its one-line description, the
`operational` mark (how a run is carried out, not what it computes: left out of every stage's
fingerprint) and the `added` mark (in a fingerprint only off its default). Leaf: pydantic only."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def F(default: Any, description: str, operational: bool = False, added: bool = False, **kw: Any) -> Any:
    """A field with its one-line description (a test checks that every field has one).
    `operational`: how the run is carried out, not what it computes (left out of fingerprints).
    `added`: a field added after runs were first made: it joins a stage's fingerprint only off its
    default, so that adding it does not re-run the finished stages of earlier runs."""
    marks = {k: True for k, on in (("operational", operational), ("added", added)) if on}
    return Field(default, description=description, **({"json_schema_extra": marks} if marks else {}), **kw)


def _mark(info: Any, name: str) -> bool:
    return bool(info.json_schema_extra.get(name)) if isinstance(info.json_schema_extra, dict) else False


def is_operational(info: Any) -> bool:
    return _mark(info, "operational")


def is_added(info: Any) -> bool:
    return _mark(info, "added")


def in_fingerprint(info: Any, value: Any) -> bool:
    """Whether a field with this value is part of what a stage computes from: not operational, and
    not an `added` field at its default. The one rule, for the config view and the stage graph."""
    return not _mark(info, "operational") and not (_mark(info, "added") and value == info.default)
