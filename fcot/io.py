"""Atomic writes and strict readers: a crash never leaves a half-written file, a bad file is named."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from fcot.errors import FcotError, where


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file written in a temp file in the same folder, fsynced and renamed over `path` when the block ends
    (an error in the block leaves `path` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FcotError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FcotError(f"{path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FcotError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-empty line; a bad line raises naming file and line."""
    path = Path(path)
    try:
        f = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise FcotError(f"{path}: file not found") from None
    except OSError as e:
        raise FcotError(f"{path}: cannot read ({e})") from None
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FcotError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise FcotError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError as e:
            raise FcotError(f"{path}: not UTF-8 text ({e})") from None


def require(obj: dict, key: str, typ: type | tuple[type, ...], *, path=None, record=None, line=None) -> Any:
    """obj[key], checked for presence and type, with an error that names file, record (or line) and key."""
    if key not in obj:
        raise FcotError(f"{where(path, record, key, line)}: missing")
    value = obj[key]
    if not isinstance(value, typ) or (typ in (int, float) and isinstance(value, bool)):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise FcotError(f"{where(path, record, key, line)}: expected {names}, got {type(value).__name__} {value!r:.60}")
    return value
