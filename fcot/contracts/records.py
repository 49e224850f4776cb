"""Teacher records as parquet shards, content-addressed by sample key.

Rule: a sample is generated once. Its key is sha256(teacher_id, prompt, sample index, seed) (fcot.teacher.plan)
and every record carries its teacher's id and identity, so one store holds many teachers without mixing them.
Each shard is written atomically and named TEACHER_ID-HASH, HASH of the keys it holds, so a retried batch rewrites
the same file instead of adding duplicates, and a teacher's shards are found by name, none opened (shards of an
older fcot, named HASH only, are opened to read their teacher ids). A record is made by `record` alone, the live
teacher's and the importer's alike. Its `logprobs` column (teacher.sampling.logprobs: the top-k distribution at
each rationale token, float16) is read only when asked for by name; shards written without it read as null.
Ray Data (`ray.data.read_parquet`) and `datasets` (`load_dataset("parquet", data_files=...)`) read the folder directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fcot.io import atomic_write_bytes

SCHEMA = pa.schema([
    ("task", pa.string()), ("index", pa.int64()), ("sample_index", pa.int32()), ("key", pa.string()),
    ("teacher_id", pa.string()), ("teacher", pa.string()),  # the identity as JSON (fcot.teacher.plan)
    ("question", pa.string()), ("gold", pa.string()), ("prompt", pa.string()), ("rationale", pa.string()),
    ("answer_text", pa.string()), ("prediction", pa.string()), ("correct", pa.bool_()),
    ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
    ("answer_prompt_tokens", pa.int32()), ("answer_completion_tokens", pa.int32()),
    ("engine", pa.string()), ("model", pa.string()), ("prompt_style", pa.string()), ("temperature", pa.float32()),
    ("top_p", pa.float32()), ("max_new_tokens", pa.int32()), ("seed", pa.int64()), ("created_at", pa.float64()),
    ("logprobs", pa.struct([("tokens", pa.list_(pa.int32())), ("top_ids", pa.list_(pa.list_(pa.int32()))),
                            ("top_logprobs", pa.list_(pa.list_(pa.float16())))])),
])
UNLESS_ASKED = {"logprobs"}  # columns `RecordStore.read` leaves out unless named: they dwarf the rest
OPTIONAL = {"answer_text": "", "answer_prompt_tokens": 0, "answer_completion_tokens": 0, "logprobs": None}


def record(**fields) -> dict:
    """A teacher record: every column of SCHEMA by name (those of OPTIONAL may be left out); a missing or unknown
    name is a bug, and raised here rather than written as null."""
    row = {**OPTIONAL, **fields}
    if row.keys() != set(SCHEMA.names):
        names = set(SCHEMA.names)
        raise KeyError(f"a record's fields differ from the store's schema: missing {sorted(names - row.keys())}, "
                       f"unknown {sorted(row.keys() - names)}")
    if dataclasses.is_dataclass(row["logprobs"]):  # fcot.engines.TokenLogprobs: its fields are the column's
        row["logprobs"] = dataclasses.asdict(row["logprobs"])
    return row


class RecordStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def shards(self, teacher_id: str | None = None) -> list[Path]:
        """The store's shards; with `teacher_id`, those holding that teacher's records (a shard is one batch of
        one teacher)."""
        found = sorted(self.root.glob("*.parquet")) if self.root.exists() else []
        if teacher_id is None:
            return found
        older = [s for s in found if "-" not in s.stem and self._fits(s)
                 and teacher_id in pq.read_table(s, columns=["teacher_id"]).column("teacher_id").to_pylist()]
        return [s for s in found if s.stem.startswith(f"{teacher_id}-")] + older

    def shard_path(self, teacher_id: str, keys: list[str]) -> Path:
        digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]
        return self.root / f"{teacher_id}-{digest}.parquet"

    def write(self, rows: list[dict]) -> Path:
        [tid] = {r["teacher_id"] for r in rows}  # a shard holds one teacher's records
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return atomic_write_bytes(self.shard_path(tid, [r["key"] for r in rows]), buf.getvalue())

    def footprint(self, teacher_id: str) -> dict:
        """What a teacher's records take on disk, from the shards' parquet footers (no data read): records, bytes,
        and the bytes of the `logprobs` column among them (compressed column chunks)."""
        records = size = logprobs = 0
        for shard in self.shards(teacher_id):
            meta = pq.ParquetFile(shard).metadata
            records += meta.num_rows
            size += shard.stat().st_size
            logprobs += sum(rg.column(c).total_compressed_size for rg in map(meta.row_group, range(meta.num_row_groups))
                            for c in range(rg.num_columns) if rg.column(c).path_in_schema.startswith("logprobs."))
        return {"records": records, "bytes": size, "logprobs_bytes": logprobs}

    @staticmethod
    def _fits(path: Path) -> bool:
        return "teacher_id" in pq.read_schema(path).names  # shards of an older fcot have no teacher identity

    def keys(self, teacher_id: str | None = None) -> set[str]:
        """The sample keys in the store (of `teacher_id`'s shards), read from their key column only."""
        keys: set[str] = set()
        for shard in self.shards(teacher_id):
            if "-" in shard.stem or self._fits(shard):
                keys.update(pq.read_table(shard, columns=["key"]).column("key").to_pylist())
        return keys

    def read(self, teacher_id: str | None = None, shards: list[Path] | None = None,
             columns: list[str] | None = None) -> pa.Table:
        """Records (of `teacher_id`, in `shards`), one row per key: `columns`, or all but UNLESS_ASKED."""
        columns = columns or [c for c in SCHEMA.names if c not in UNLESS_ASKED]
        wanted = list(dict.fromkeys(["key", "teacher_id", *columns]))
        tables = []
        for s in shards if shards is not None else self.shards(teacher_id):
            if "-" not in s.stem and not self._fits(s):
                continue
            t = pq.read_table(s, schema=SCHEMA, columns=wanted)
            if teacher_id is not None:
                t = t.filter(pc.equal(t.column("teacher_id"), teacher_id))
            tables.append(t)
        if not tables:
            return SCHEMA.empty_table().select(wanted)
        table = pa.concat_tables(tables)
        if pc.count_distinct(table["key"]).as_py() == len(table):
            return table
        rows = table.select(["key"]).append_column("row", pa.array(range(len(table)), pa.int64()))
        first = rows.group_by("key", use_threads=False).aggregate([("row", "min")])["row_min"]
        return table.take(pc.take(first, pc.sort_indices(first)))  # each key's first row, in the order read
