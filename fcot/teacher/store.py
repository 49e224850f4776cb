"""Teacher records as parquet shards, content-addressed by sample key.

A key is sha256(model, prompt, sampling params, sample index, seed): the same sample is never generated
twice. Each shard is written atomically and named by the keys it holds, so a retried batch rewrites the
same file instead of adding duplicates. Ray Data (`ray.data.read_parquet`) and `datasets`
(`load_dataset("parquet", data_files=...)`) read the folder directly.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fcot.io import atomic_write_bytes

SCHEMA = pa.schema([
    ("task", pa.string()), ("index", pa.int64()), ("sample_index", pa.int32()), ("key", pa.string()),
    ("question", pa.string()), ("gold", pa.string()), ("prompt", pa.string()), ("rationale", pa.string()),
    ("answer_text", pa.string()), ("prediction", pa.string()), ("correct", pa.bool_()),
    ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
    ("answer_prompt_tokens", pa.int32()), ("answer_completion_tokens", pa.int32()),
    ("engine", pa.string()), ("model", pa.string()), ("prompt_style", pa.string()), ("temperature", pa.float32()),
    ("top_p", pa.float32()), ("max_new_tokens", pa.int32()), ("seed", pa.int64()), ("created_at", pa.float64()),
])


def sample_key(model: str, prompt: str, sampling: dict, sample_index: int, seed: int) -> str:
    blob = json.dumps([model, prompt, sampling, sample_index, seed], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_seed(base_seed: int, task: str, index: int, sample_index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{task}:{index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RecordStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("*.parquet")) if self.root.exists() else []

    def shard_path(self, keys: list[str]) -> Path:
        return self.root / (hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24] + ".parquet")

    def write(self, rows: list[dict]) -> Path:
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return atomic_write_bytes(self.shard_path([r["key"] for r in rows]), buf.getvalue())

    def keys(self) -> set[str]:
        keys: set[str] = set()
        for shard in self.shards():
            keys.update(pq.read_table(shard, columns=["key"]).column("key").to_pylist())
        return keys

    def read(self, keys: set[str] | None = None) -> pa.Table:
        """All records (or those with `keys`), one row per key."""
        tables = [pq.read_table(s, schema=SCHEMA) for s in self.shards()]
        if not tables:
            return SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        seen: set[str] = set()
        keep = []
        for i, key in enumerate(table.column("key").to_pylist()):
            if key not in seen and (keys is None or key in keys):
                seen.add(key)
                keep.append(i)
        return table.take(keep)
