"""Typed configs validated at the edge: a YAML file plus `key=value` overrides (dotted keys).

    cfg = load_config(TeachConfig, "experiments/teach.yaml", ["sampling.num_samples=8"])

Every error names the file and key and says what was expected; nothing runs before the config is valid.

Paths: every path a config holds (`output_dir`, `data_dir`, `engine.path`, model folders, ...) is made absolute
when the config is validated, against the directory the command was started in (for paths written in a YAML
file too: the repository's configs are written for commands run from its root). The driver and every Ray
worker, which runs in a working directory of its own, then see the same file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from fcot.errors import FcotError
from fcot.models import ALIASES, fingerprint

T = TypeVar("T", bound=BaseModel)
WandbMode = Literal["auto", "online", "offline", "disabled"]


class Config(BaseModel):
    """Base for fcot's configs: unknown keys are errors; values, defaults included, are checked (and paths made
    absolute) on validation and on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


def absolute_path(value: str) -> str:
    """`value` as an absolute path against the current directory (`~` expanded); URIs (s3://...) unchanged."""
    if "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def model_ref(value: str) -> str:
    """A model name: an alias of `fcot models` or a hub id stays as it is; a local folder becomes absolute."""
    if value in ALIASES or "://" in value:
        return value
    if value.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(value)):
        return absolute_path(value)
    return value


class _Mark:
    """Metadata on a config field, read by `results_view`."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return self.what


PLACEMENT = _Mark("placement")  # where, on how much, or how visibly a stage runs: never what it computes
MODEL = _Mark("model")  # a model reference: the content of a local folder decides results, not only its name

def file_path(value: str) -> str:
    """A path of fcot's own files (run directories, data, logs): absolute; an object-storage URI is refused, since
    fcot and Ray Train read and write them as files."""
    if "://" in value:
        raise ValueError(f"{value}: object storage URIs are not supported; use a path every node mounts (NFS, or "
                         f"the bucket mounted with mountpoint-s3 or gcsfuse), e.g. /mnt/fcot/runs/NAME")
    return absolute_path(value)


PathStr = Annotated[str, AfterValidator(file_path)]
ModelRef = Annotated[str, AfterValidator(model_ref), MODEL]
RayAddress = Annotated[str | None, PLACEMENT]  # a cluster to join (None: start or join a local one)


def results_view(value: Any) -> Any:
    """What of a config decides its stage's results, as plain data (fcot.run's resume rule): fields marked
    PLACEMENT (replicas, CPUs and GPUs per replica or worker, ray_address, progress, W&B, checkpoint retention)
    are left out, so a run resumed on a resized cluster redoes nothing; a local model folder is joined by the
    content hash of its configs and weights, so a changed model file redoes what reads it."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            if PLACEMENT in field.metadata:
                continue
            v = getattr(value, name)
            out[name] = ({"name": v, "sha256": fingerprint(v)} if MODEL in field.metadata and isinstance(v, str)
                         else results_view(v))
        return out
    if isinstance(value, dict):
        return {str(k): results_view(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [results_view(v) for v in value]
    return value


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from `path`; FcotError naming the file otherwise."""
    path = Path(path)
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


def merge(base: dict, over: dict) -> dict:
    """`over` applied key by key into a copy of `base`: nested sections merge (`train.epochs` keeps the other
    train keys), everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else copy.deepcopy(value)
    return out


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
            msg = err["msg"].removeprefix("Value error, ")  # pydantic's own start capitalized; paths keep their case
            lines.append(f"{source}, key {key!r}: {msg[:1].lower()}{msg[1:]}{shown}")
    return "; ".join(lines)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Build `cls` from `base`, then the YAML file, then overrides; raise FcotError naming the key."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    source = "config"
    if path is not None:
        data.update(read_yaml(path))
        source = str(path)
    for override in overrides or []:
        apply_override(data, override)
    if overrides:
        source += " (with overrides)" if path else "overrides"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise FcotError(_format_validation_error(e, source)) from None


def wandb_mode(mode: WandbMode) -> str:
    """The W&B mode a config's `auto` means: WANDB_MODE if set, else online with WANDB_API_KEY, else offline."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


SECRET_WORDS = ("key", "token", "secret", "password")


def redacted(data: Any) -> Any:
    """A copy of a config dict with the values of secret-looking keys replaced (for files and logs)."""
    if isinstance(data, dict):
        return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) and isinstance(v, str)
                    and not k.lower().endswith("_env") else redacted(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data
