"""A console a person can read: during `fcot run` and `fcot sweep`, fcot's own lines on the console, the rest in a log.

Ray (its core's log lines, and its workers' output, which it forwards to the driver), DeepSpeed, vLLM, W&B and
Python's warnings all write to the process's stdout and stderr. `to_log(path)` points file descriptors 1 and 2 at a
pipe; a thread appends every line to `path` and passes to the console only fcot's own: progress and stage lines
(`[stage] ...`, from the driver or forwarded from a worker, shown without Ray's `(Worker pid=...)` prefix) and
`fcot: ...` lines (warnings, errors). Everything stays in the log, nothing is lost; `--verbose` shows it all.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

# Ray's prefix on a line it forwards from a worker: "(RayTrainWorker pid=1, ip=10.0.0.2) " in cyan, maybe repeated x3
_RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\([\w.:-]+ pid=\d+(?:, ip=[\w.:-]+)?\)(?:\x1b\[0m)? ")
_FCOT_LINE = re.compile(r"^(?:\[[a-z][\w .:-]*\] |fcot: )")


def for_console(line: str) -> str | None:
    """The text the console shows for one output line, or None for a line only the log keeps."""
    text = _RAY_PREFIX.sub("", line)
    return text if _FCOT_LINE.match(text) else None


@contextmanager
def to_log(path: str | os.PathLike, verbose: bool = False):
    """Within: fds 1 and 2 go to `path` (appended: a resumed run keeps the last one's), fcot's lines also to the
    console. Yields `say(message)`, which writes a line to both whatever it looks like."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    read_end, write_end = os.pipe()
    log = path.open("a", encoding="utf-8", buffering=1)
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            log.write(message + "\n")
            console.write(message + "\n")

    def pump() -> None:
        pending = b""
        while True:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                shown = line if verbose else for_console(line)
                with lock:
                    log.write(line + "\n")
                    if shown is not None:
                        console.write(shown + "\n")
        if pending:
            log.write(pending.decode("utf-8", "replace") + "\n")

    reader = threading.Thread(target=pump, name="fcot-console", daemon=True)
    reader.start()
    for fd in (1, 2):
        os.dup2(write_end, fd)
    os.close(write_end)
    say(f"fcot: the output of Ray, DeepSpeed, vLLM and W&B goes to {path}")
    try:
        yield say
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():  # the pipe's last write ends close: the reader drains it and stops
            os.dup2(copy, fd)
            os.close(copy)
        reader.join(timeout=5)  # bounded: a process started within that still holds the pipe keeps it open
        if not reader.is_alive():
            log.close()
            os.close(read_end)
        console.close()
