"""Read a task's records and the paper's train/test splits from the data directory."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from fcot.errors import FcotError
from fcot.io import read_json
from fcot.tasks.registry import TASKS, Sample, TaskSpec

_CUSTOM: dict[str, TaskSpec] = {}


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: `explicit` (config), else $FCOT_DATA_DIR, else the user cache."""
    if explicit:
        path = Path(explicit).expanduser()
    elif os.environ.get("FCOT_DATA_DIR"):
        path = Path(os.environ["FCOT_DATA_DIR"]).expanduser()
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = cache / "fcot" / "data"
    return path.resolve()


# Config field types: a task list (one name may be given as a string), and the data directory, absolute and
# filled from $FCOT_DATA_DIR (or the user cache) when the config is validated, so Ray workers read the same one.
TaskNames = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]
DataDir = Annotated[str | None, AfterValidator(lambda v: str(data_dir(v)))]


# The quickstart's files (coin flip's questions, split and recorded 175B log), shipped with fcot and laid out like a
# data dir: read only where the data dir lacks them, so a data dir that has a file wins.
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "bundled"


def data_file(root: Path, rel: str) -> Path:
    """`rel` in the data dir `root`; where the data dir lacks it, fcot's own copy, if it ships one."""
    path = root / rel
    if not path.exists() and (BUNDLED / rel).is_file():
        return BUNDLED / rel
    return path


def _missing(root: Path, rel: str, task: str) -> FcotError:
    """The error for a file of `task` that neither the data dir nor fcot has, naming the way to get it."""
    fix = f"run `fcot data download --task {task}` or set FCOT_DATA_DIR to a data dir that has it"
    if not root.exists():
        return FcotError(f"data dir {root} does not exist: {fix}")
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        return FcotError(f"data dir {root} is not a readable directory")
    return FcotError(f"{root / rel}: file not found (task {task}); {fix}")


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a user task (see `jsonl_task`) loadable by name, like the built-in ones. Registering the same
    definition again keeps the first registration (and what it has read); a new definition replaces it."""
    if spec.name in TASKS:
        raise FcotError(f"task name {spec.name!r} is taken by a built-in task")
    old = _CUSTOM.get(spec.name)
    if old is not None and old.extra.get("definition") == spec.extra.get("definition"):
        return old
    _CUSTOM[spec.name] = spec
    if old is not None:
        _load.cache_clear()
    return spec


def user_task_definition(name: str) -> dict | None:
    """The definition (`UserTask` fields) of a user task registered in this process, if any."""
    spec = _CUSTOM.get(name)
    return dict(spec.extra["definition"]) if spec is not None and "definition" in spec.extra else None


def task_names() -> list[str]:
    return list(TASKS) + list(_CUSTOM)


def get_task(name: str) -> TaskSpec:
    spec = TASKS.get(name) or _CUSTOM.get(name)
    if spec is None:
        raise FcotError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return spec


def _source_path(root: Path, rel: str) -> Path:
    return data_file(root, f"datasets/{rel}") if not Path(rel).is_absolute() else Path(rel)  # a user task's file


@functools.lru_cache(maxsize=32)
def _load(name: str, root: Path) -> tuple[tuple[Sample, ...], tuple[tuple[int, int, str], ...]]:
    """(samples, missing): `missing` lists (first, last, file) index ranges of absent optional files."""
    spec = get_task(name)
    samples: list[Sample] = []
    missing: list[tuple[int, int, str]] = []
    first = 0
    for src in spec.files:
        path = _source_path(root, src.path)
        if not path.exists() and src.path in spec.optional_files:
            missing.append((first, first + src.records - 1, src.path))
            first += src.records  # keep the paper's index space: later files start after it
            continue
        if not path.exists() and "definition" in spec.extra:  # a user task reads its own file, not the data dir's
            raise FcotError(f"{path}: file not found (task {name})")
        if not path.exists():
            raise _missing(root, f"datasets/{src.path}", name)
        part = spec.reader(spec, path, first)
        if src.records is not None and len(part) != src.records:
            raise FcotError(f"{path}: expected {src.records} records, found {len(part)}")
        samples.extend(part)
        first += len(part)
    return tuple(samples), tuple(missing)


def load_records(name: str, root: str | os.PathLike | None = None) -> list[Sample]:
    """All records of a task in file order; `Sample.index` is the paper's index into them."""
    samples, _missing = _load(name, data_dir(root))
    return list(samples)


def split_indices(name: str, kind: str = "default", root: str | os.PathLike | None = None) -> dict[str, list[int]]:
    spec = get_task(name)
    root = data_dir(root)
    if "split" in spec.extra:  # user task: a split file, or a seeded random split computed on first use
        return spec.extra["split"]()
    if kind not in spec.split_kinds:
        raise FcotError(f"task {name} has no {kind!r} split; it has: {', '.join(spec.split_kinds)}")
    rel = f"splits/{name}__{kind}.json"
    path = data_file(root, rel)
    if not path.exists():
        raise _missing(root, rel, name)
    split = read_json(path)
    if not isinstance(split, dict):
        raise FcotError(f"{path}: expected an object with 'train' and 'test' lists")
    for key in ("train", "test"):
        values = split.get(key)
        if not isinstance(values, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
            raise FcotError(f"{path}, key {key!r}: expected a list of integer indices")
    return {"train": split["train"], "test": split["test"]}


def load_split(name: str, split: str = "train", kind: str = "default",
               root: str | os.PathLike | None = None) -> list[Sample]:
    """The samples of one split ("train" or "test"), in the split file's order."""
    if split not in ("train", "test"):
        raise FcotError(f"split must be 'train' or 'test', got {split!r}")
    samples, missing = _load(name, data_dir(root))
    indices = split_indices(name, kind, root)[split]
    by_index = {s.index: s for s in samples}
    out = []
    for pos, i in enumerate(indices):
        if i not in by_index:
            for lo, hi, rel in missing:
                if lo <= i <= hi:
                    raise FcotError(f"task {name}, {split} split needs datasets/{rel} (index {i} lies in it): "
                                    f"run `fcot data download --task {name}`")
            lo, hi = 0, max(s.index for s in samples) if samples else -1
            raise FcotError(f"task {name}, {split} split, position {pos}: index {i} is out of range {lo}–{hi}")
        out.append(by_index[i])
    return out


def require_gold(samples: list[Sample], why: str) -> None:
    """Stop at the first question without its gold answer, naming where it lacks it, and why it is needed."""
    for s in samples:
        if s.answer is None:
            where = get_task(s.task).extra.get("unanswered", {}).get(s.index, f"task {s.task}, question {s.index}")
            n = sum(x.answer is None for x in samples)
            raise FcotError(f"{where}: missing; {why} ({n} of {len(samples)} questions lack it)")


def task_sizes(name: str, kind: str = "default", root: str | os.PathLike | None = None) -> dict[str, int | None]:
    """{"train": n, "test": n}; None for a split that needs an absent optional file (aqua's train)."""
    _samples, missing = _load(name, data_dir(root))
    sizes: dict[str, int | None] = {}
    for split, indices in split_indices(name, kind, root).items():
        absent = any(lo <= i <= hi for lo, hi, _rel in missing for i in indices)
        sizes[split] = None if absent else len(load_split(name, split, kind, root))
    return sizes
