"""Typed configs validated at the edge: a YAML file plus `key=value` overrides (dotted keys).

    cfg = load_config(TeachConfig, "experiments/teach.yaml", ["sampling.num_samples=8"])

Every error names the file and key and says what was expected; nothing runs before the config is valid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fcot.errors import FcotError

T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base for fcot's configs: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FcotError(f"{path}: config file not found") from None
    except OSError as e:
        raise FcotError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise FcotError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FcotError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to nested dict `data`."""
    if "=" not in override:
        raise FcotError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise FcotError(f"override {override!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise FcotError(f"override {override!r}: key {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}, key {key!r}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{source}, key {key!r}: required")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r:.60})"
            lines.append(f"{source}, key {key!r}: {err['msg'].lower().removeprefix('value error, ')}{shown}")
    return "; ".join(lines)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Build `cls` from `base`, then the YAML file, then overrides; raise FcotError naming the key."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        data.update(_read_yaml(Path(path)))
        source = str(path)
    for override in overrides or []:
        apply_override(data, override)
    if overrides:
        source += " (with overrides)" if path else "overrides"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise FcotError(_format_validation_error(e, source)) from None


SECRET_WORDS = ("key", "token", "secret", "password")


def redacted(data: Any) -> Any:
    """A copy of a config dict with the values of secret-looking keys replaced (for files and logs)."""
    if isinstance(data, dict):
        return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) and isinstance(v, str)
                    and not k.lower().endswith("_env") else redacted(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data
