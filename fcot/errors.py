"""One error type for everything a user can fix: bad input, bad config, missing files."""

from __future__ import annotations

import re

_IN_TRACEBACK = re.compile(r"fcot\.errors\.FcotError: (.+)")


class FcotError(Exception):
    """A problem with the user's input, stated so that it names the file, record and key.

    The CLI prints these as one line (no traceback); everything else is a bug and keeps its traceback.
    """


def where(path=None, record=None, key=None, line=None) -> str:
    """Format a location like `data.jsonl, line 12, key 'question'` for error messages: `line` as an editor numbers
    the lines of a JSONL file (from 1), `record` a position in a JSON list (from 0)."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if line is not None:
        parts.append(f"line {line}")
    if record is not None:
        parts.append(f"record {record}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)


def user_error(exc: BaseException) -> FcotError | None:
    """The FcotError behind `exc`, if any, found through the wrappers Ray puts around a worker's error.

    Ray re-raises a task's or actor's exception as `RayTaskError(FcotError)` (an FcotError whose text is the
    remote traceback; the original is its `cause`), Ray Data chains it, Ray Train collects each worker's
    error in `worker_failures`, and Tune keeps a trial's. The one returned is the original, with its message;
    where a wrapper kept only the remote traceback's text (Ray Data's UserCodeException), it is read from there."""
    seen, stack, texts = set(), [exc], []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts.append(str(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, FcotError) and not isinstance(cause, BaseException):
            return e
        stack += [e.__context__, e.__cause__, cause if isinstance(cause, BaseException) else None]
        for attr in ("worker_failures", "errors"):
            more = getattr(e, attr, None)
            if isinstance(more, dict):
                stack += [v for v in more.values() if isinstance(v, BaseException)]
            elif isinstance(more, (list, tuple)):
                stack += [v for v in more if isinstance(v, BaseException)]
    found = [m for text in texts for m in _IN_TRACEBACK.findall(text)]
    return FcotError(found[-1].strip()) if found else None
