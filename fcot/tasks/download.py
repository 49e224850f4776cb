"""`fcot data download`: fetch the tasks' public files, check sha256, write atomically, skip what is there."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from fcot.errors import FcotError
from fcot.io import atomic_write_bytes
from fcot.tasks.loading import data_dir, get_task
from fcot.tasks.registry import KOJIMA_LOGS, SPLIT_SHA256, SPLITS, TASKS, TEACHER_LOG_SHA256, TEACHER_LOGS, teacher_log


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _planned(tasks: list[str], mirror: str | None) -> list[tuple[str, str, str | None]]:
    """(path relative to the data dir, url, sha256) for every file the tasks need."""
    plan = []
    for name in tasks:
        spec = get_task(name)
        for src in spec.files:
            url = f"{mirror}/datasets/{src.path}" if mirror else src.url
            plan.append((f"datasets/{src.path}", url, src.sha256))
        for kind in spec.split_kinds:
            key = f"{name}__{kind}"
            url = f"{mirror}/splits/{key}.json" if mirror else f"{SPLITS}/{key}.json"
            plan.append((f"splits/{key}.json", url, SPLIT_SHA256[key]))
        if name in TEACHER_LOGS:  # the recorded 175B teacher (`engine: {kind: recorded, log: TASK}`)
            rel = teacher_log(name)
            url = f"{mirror}/{rel}" if mirror else f"{KOJIMA_LOGS}/{rel.split('/')[-1]}"
            plan.append((rel, url, TEACHER_LOG_SHA256.get(TEACHER_LOGS[name])))
    return list(dict.fromkeys(plan))  # two tasks never share a file today, but keep it idempotent


def download(tasks: list[str] | None = None, root: str | os.PathLike | None = None, mirror: str | None = None,
             timeout: float = 60.0, log=lambda msg: None) -> dict[str, str]:
    """Fetch the files of `tasks` (all 12 by default) into the data dir; returns {path: status}.

    `mirror` replaces the public sources with one base URL laid out like the data dir
    (`{mirror}/datasets/...`, `{mirror}/splits/...`). A file already there with the right sha256 is
    kept; a download whose sha256 differs is refused and nothing is written.
    """
    root = data_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for rel, url, sha in _planned(tasks or list(TASKS), mirror.rstrip("/") if mirror else None):
        target = root / rel
        if target.exists() and (sha is None or _sha256(target) == sha):
            status[rel] = "present"
            continue
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as e:
            raise FcotError(f"{url}: download failed ({e}); nothing was written to {target}") from None
        got = hashlib.sha256(data).hexdigest()
        if sha is not None and got != sha:
            raise FcotError(f"{url}: sha256 {got} does not match the expected {sha}; {target} not written")
        atomic_write_bytes(target, data)
        status[rel] = "downloaded" if sha else f"downloaded (sha256 {got}, not pinned)"
    return status
