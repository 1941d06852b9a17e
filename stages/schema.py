"""The config schema's building blocks, shared by every layer that defines the settings it reads:
a strict model (an unknown key is an error), a field with its one-line description, and the
`operational` mark (how a run is carried out, not what it computes: left out of every stage's
fingerprint). Leaf: pydantic only."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Device = Literal["cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def F(default: Any, description: str, operational: bool = False, **kw: Any) -> Any:
    """A field with its one-line description (a test checks that every field has one).
    `operational`: how the run is carried out, not what it computes (left out of fingerprints)."""
    extra = {"json_schema_extra": {"operational": True}} if operational else {}
    return Field(default, description=description, **extra, **kw)


def is_operational(info: Any) -> bool:
    return bool((info.json_schema_extra or {}).get("operational")) if isinstance(info.json_schema_extra, dict) else False
