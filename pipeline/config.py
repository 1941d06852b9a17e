"""A run's config, loaded from YAML and validated before anything starts: the schema is
`stages.run_config.RunConfig` (each section defined where it is read); here, loading, errors
named by dotted path (`ConfigError`), absolute paths, the saved YAML and the hash.

Fields marked `operational` say how a run is carried out, not what it computes (restart counts,
checkpoint cadence, CPUs per actor, the weight-transfer method, the Ray address): they are left out
of every stage's fingerprint, so changing one on `resume` keeps finished stages and in-progress
checkpoints. Relative paths (`model.path` when it names a local directory, annotation sources,
prompt files, judge models) are taken from the working directory of the command that loads the
config, and saved absolute in the run directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from core.schema import in_fingerprint
from stages.run_config import RunConfig

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that does not validate; `errors` holds (dotted path, message) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source, self.errors = source, errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source}: {len(errors)} invalid field(s):\n{lines}")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class inside a field's annotation (X, list[X], X | None), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple[Any, ...], model: type[BaseModel] | None, unknown_key: bool = False) -> str:
    """A dotted path of `model`'s real field names. Pydantic's union-member tags ('float',
    "literal['auto']") are dropped; the last part of an extra_forbidden error is the unknown key and is kept."""
    out = ""
    for i, part in enumerate(loc):
        is_key = isinstance(part, str) and (
            (model is not None and part in model.model_fields) or (unknown_key and i == len(loc) - 1))
        if isinstance(part, int):
            out += f"[{part}]"
        elif is_key:
            out += f".{part}" if out else str(part)
            field = model.model_fields.get(part) if model is not None else None
            model = _submodel(field.annotation) if field is not None else None
    return out or "<root>"


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (a typo?)"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def _errors(e: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    merged: dict[str, list[str]] = {}
    for err in e.errors():
        if err["type"] == "cross_field":  # RunConfig._runnable names each field itself
            for path, msg in err["ctx"]["problems"]:
                merged.setdefault(path, []).append(msg)
            continue
        merged.setdefault(_dotted(err["loc"], model, err["type"] == "extra_forbidden"), []).append(_message(err))
    return [(path, " or ".join(msgs)) for path, msgs in merged.items()]


def validated(model: type[M], data: Any, source: str) -> M:
    """`model` validated from `data` (None: every default); a ConfigError naming `source` and each
    bad field by its dotted path (run configs, sweep files)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("<root>", f"expected a mapping, got {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _errors(e, model)) from None


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    return validated(RunConfig, data, source)


def read_yaml(path: str | Path) -> Any:
    """A YAML file's data; a missing file or bad YAML is a ConfigError naming the file (configs, sweep files)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [("<file>", "no such file")])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [("<file>", f"not valid YAML: {e}")]) from None


def load_config(path: str | Path, base: Path | None = None) -> RunConfig:
    """Load and validate a YAML config; relative paths in it are taken from `base` (the working
    directory by default) and made absolute."""
    return absolute_paths(parse_config(read_yaml(path), str(path)), base or Path.cwd())


def absolute_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """The config with its file paths made absolute against `base`. `model.path` and judge models
    only when they name a local path (else they are hub names); data and prompt files always."""
    def local(p: str | None) -> str | None:
        """A local path (made absolute) unless it reads as a hub name ("org/name", not here)."""
        if p is None or Path(p).is_absolute():
            return p
        parts = Path(p).parts
        is_local = (base / p).exists() or p.startswith(".") or len(parts) > 2 or (base / parts[0]).is_dir()
        return str((base / p).resolve()) if is_local else p

    def data(p: str) -> str:
        return p if Path(p).is_absolute() else str((base / p).resolve())

    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"path": local(cfg.model.path)}),
        "ingest": cfg.ingest.model_copy(update={"sources": [s.model_copy(update={"path": data(s.path)})
                                                            for s in cfg.ingest.sources]}),
        "red_team": cfg.red_team.model_copy(update={"prompt_files": [data(p) for p in cfg.red_team.prompt_files]}),
        "evaluate": cfg.evaluate.model_copy(update={
            "prompt_files": [data(p) for p in cfg.evaluate.prompt_files],
            "prompt_sets": [s.model_copy(update={"path": data(s.path)}) for s in cfg.evaluate.prompt_sets],
            "judge": cfg.evaluate.judge if cfg.evaluate.judge in ("oracle", "cost_model") else local(cfg.evaluate.judge)}),
        "reward": cfg.reward.model_copy(update={"backbone": local(cfg.reward.backbone)}),
        "cost": cfg.cost.model_copy(update={"backbone": local(cfg.cost.backbone)}),
        "annotate": cfg.annotate.model_copy(update={"judge_reward_model": local(cfg.annotate.judge_reward_model),
                                                    "judge_cost_model": local(cfg.annotate.judge_cost_model)}),
    })


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(value: Any) -> str:
    """Stable hash of a config (sub)tree: what a stage's manifest records and compares."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def results_view(cfg: BaseModel) -> dict:
    """The config as JSON without its operational fields, nor its `added` ones at their default
    (core/schema.py): what stage fingerprints are taken of."""
    out = {}
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if not in_fingerprint(info, value):
            continue
        if isinstance(value, BaseModel):
            out[name] = results_view(value)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            out[name] = [results_view(v) for v in value]
        else:
            out[name] = cfg.model_dump(mode="json", include={name})[name]
    return out


def iter_fields(model: type[BaseModel], prefix: str = ""):
    """Yield (dotted name, FieldInfo) for every field of the tree (used by the docs test)."""
    for name, info in model.model_fields.items():
        yield prefix + name, info
        sub = _submodel(info.annotation)
        if sub is not None:
            yield from iter_fields(sub, f"{prefix}{name}.")
