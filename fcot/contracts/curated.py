"""The curated set: what curation writes and training reads, and the length rule both apply.

Rule: a curated set is a folder of parquet files, one row per training pair (a method with several tasks gives
several pairs per kept record), with the columns of ROW: task, index, sample_index, part (the method's task the
pair is), weight_key (the TrainConfig field holding the loss weight of the pair's task, fcot.methods; empty: 1),
prompt, completion, length and completion_length (tokens, by `pair_length`). Training needs only REQUIRED (data
curated elsewhere may have just those). A pair longer than the student's max length is dropped by curation and
truncated by training, by one rule. For a KD student the teacher's top-k travel with the pairs: the column
TEACHER_LOGPROBS holds the record's stored logprobs (fcot.contracts.records: the tokens it emitted, and its top-k
ids and float16 logprobs at each), so a training worker reads them with its own rows and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.types as pat

from fcot.contracts.records import SCHEMA as RECORDS
from fcot.errors import FcotError

ROW = pa.schema([("task", pa.string()), ("index", pa.int64()), ("sample_index", pa.int64()), ("part", pa.int64()),
                 ("weight_key", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                 ("length", pa.int64()), ("completion_length", pa.int64())])
REQUIRED = {"task": "string", "index": "integer", "sample_index": "integer", "prompt": "string",
            "completion": "string"}
TEACHER_LOGPROBS = "teacher_logprobs"  # optional column (curate.teacher_logprobs): the record's `logprobs`
WEIGHT_KEY = "weight_key"  # optional column: the TrainConfig field weighing the pair's task ("" or absent: 1)


def row_schema(teacher_logprobs: bool) -> pa.Schema:
    """A curated row's columns: ROW, and the teacher's top-k when curation carries them."""
    return ROW.append(pa.field(TEACHER_LOGPROBS, RECORDS.field("logprobs").type)) if teacher_logprobs else ROW


def pair_length(prompt_tokens: int, completion_tokens: int, encoder_decoder: bool) -> int:
    """The length rule, one for curation (too long: dropped) and training (truncated to max_length): a decoder
    reads prompt + completion + EOS; an encoder-decoder the prompt, and decodes completion + EOS."""
    if encoder_decoder:
        return max(prompt_tokens, completion_tokens + 1)
    return prompt_tokens + completion_tokens + 1


def check_curated(path: str, kd: bool = False) -> int:
    """Validate the curated parquet data at `path` (schema, not empty; with `kd` the teacher's top-k); returns its
    row count."""
    p = Path(path)
    if not p.exists():
        raise FcotError(f"data {path}: not found (expected a folder of curated parquet files)")
    try:
        ds = pads.dataset(str(p), format="parquet", exclude_invalid_files=False)
        schema = ds.schema
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise FcotError(f"data {path}: not readable as parquet ({str(e).splitlines()[0][:200]})") from None
    for name, kind in REQUIRED.items():
        if name not in schema.names:
            raise FcotError(f"data {path}: missing column {name!r} (curated data has {', '.join(REQUIRED)})")
        t = schema.field(name).type
        ok = pat.is_integer(t) if kind == "integer" else (pat.is_string(t) or pat.is_large_string(t))
        if not ok:
            raise FcotError(f"data {path}: column {name!r} should be {kind}, is {t}")
    if kd and TEACHER_LOGPROBS not in schema.names:
        raise FcotError(f"data {path}: no column {TEACHER_LOGPROBS!r}: a KD or on-policy student (train.objective "
                        "kd, on_policy) learns the teacher's logprobs carried with its rows; for kd, curate with "
                        "curate.teacher_logprobs: true (fcot run sets it); on_policy's rows are fcot.rollout's")
    rows = ds.count_rows()
    if rows == 0:
        raise FcotError(f"data {path}: no rows")
    return rows
