"""Curated data -> token batches for a student.

Curated data contract: parquet with columns task (str), index (int), sample_index (int), prompt (str),
completion (str); one row per kept rationale.

- decoders: input = prompt + completion + EOS, labels = input with the prompt tokens set to -100 (loss on
  the completion only), truncated to max_length. Prompt and completion are tokenized apart and without
  special tokens, as fcot's engines tokenize a prompt at inference before the model continues it.
- encoder-decoders (T5): encoder input = prompt, labels = completion + EOS.

Labels are aligned with input_ids (the HF convention): the loss shifts them for decoders.
A micro-batch is either padded to its longest example, or (decoders, `packing`) its examples are packed
into as few rows of at most max_length tokens as fit, balanced, rows padded to the longest row; position_ids
restart at 0 for each example and no attention_mask is passed, so transformers builds a block-diagonal
causal mask from them (examples in a row do not attend to each other).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from fcot.errors import FcotError

COLUMNS = {"task": "string", "index": "integer", "sample_index": "integer", "prompt": "string", "completion": "string"}
IGNORE = -100


def check_curated(path: str) -> int:
    """Validate the curated parquet data at `path` (schema, not empty); returns its row count."""
    import pyarrow.dataset as pads
    import pyarrow.types as pat

    p = Path(path)
    if not p.exists():
        raise FcotError(f"data {path}: not found (expected a folder of curated parquet files)")
    try:
        ds = pads.dataset(str(p), format="parquet", exclude_invalid_files=False)
        schema = ds.schema
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise FcotError(f"data {path}: not readable as parquet ({str(e).splitlines()[0][:200]})") from None
    for name, kind in COLUMNS.items():
        if name not in schema.names:
            raise FcotError(f"data {path}: missing column {name!r} (curated data has {', '.join(COLUMNS)})")
        t = schema.field(name).type
        ok = pat.is_integer(t) if kind == "integer" else (pat.is_string(t) or pat.is_large_string(t))
        if not ok:
            raise FcotError(f"data {path}: column {name!r} should be {kind}, is {t}")
    rows = ds.count_rows()
    if rows == 0:
        raise FcotError(f"data {path}: no rows")
    return rows


def decoder_example(prompt_ids: list[int], completion_ids: list[int], eos: int, max_length: int):
    """(input_ids, labels): prompt + completion + EOS, loss on the completion and EOS only."""
    ids = (prompt_ids + completion_ids + [eos])[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids + [eos])[:max_length]
    return ids, labels


def seq2seq_example(prompt_ids: list[int], completion_ids: list[int], eos: int, max_length: int):
    """(encoder input_ids, labels): the prompt, and completion + EOS."""
    return prompt_ids[:max_length], (completion_ids + [eos])[:max_length]


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder examples padded (right) to the longest one."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _balanced_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices per row. Rows are padded to the longest one, so balance them: longest example first into the
    least-filled row (LPT), starting from the fewest rows the tokens need, one more row when one does not fit."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_rows = max(1, math.ceil(sum(lengths) / max_length))
    while True:
        rows, load = [[] for _ in range(n_rows)], [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=load.__getitem__)
            if load[r] + lengths[i] > max_length:
                break
            rows[r].append(i)
            load[r] += lengths[i]
        else:
            return [members for members in rows if members]
        n_rows += 1


def pack_batch(examples: list[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder examples packed into as few rows of <= max_length tokens as fit (see the module doc)."""
    rows = _balanced_rows([len(ids) for ids, _ in examples], max_length)
    width = max(sum(len(examples[i][0]) for i in members) for members in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    # Padding gets positions 0.. too: a segment of its own, and its labels are ignored.
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, lab = examples[i]
            input_ids[r, at:at + len(ids)] = torch.tensor(ids)
            labels[r, at:at + len(lab)] = torch.tensor(lab)
            position_ids[r, at:at + len(ids)] = torch.arange(len(ids))
            at += len(ids)
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def pad_seq2seq(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    enc = pad_batch([(ids, ids) for ids, _ in examples], pad_id)
    width = max(len(lab) for _, lab in examples)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (_, lab) in enumerate(examples):
        labels[row, :len(lab)] = torch.tensor(lab)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


class Collator(NumpyBatchCollateFn):
    """Ray Data batch (dict of numpy columns) -> model inputs, plus counts: `tokens` (real input tokens,
    padding excluded) and `label_tokens` (tokens with a loss)."""

    def __init__(self, tokenizer, max_length: int, encoder_decoder: bool, packing: bool):
        super().__init__()
        if packing and encoder_decoder:
            raise FcotError("packing: works for decoder students only; set packing=false for encoder-decoders")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.encoder_decoder = encoder_decoder
        self.packing = packing
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, prompts, completions) -> list[tuple[list[int], list[int]]]:
        # Prompt and completion apart and without special tokens: as fcot's engines tokenize a prompt.
        p_ids = self.tokenizer([str(p) for p in prompts], add_special_tokens=False)["input_ids"]
        c_ids = self.tokenizer([str(c) for c in completions], add_special_tokens=False)["input_ids"]
        example = seq2seq_example if self.encoder_decoder else decoder_example
        return [example(p, c, self.tokenizer.eos_token_id, self.max_length) for p, c in zip(p_ids, c_ids)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        examples = self.encode(batch["prompt"], batch["completion"])
        if self.encoder_decoder:
            out = pad_seq2seq(examples, self.pad_id)
            tokens = sum(len(ids) + len(lab) for ids, lab in examples)
        else:
            out = pack_batch(examples, self.max_length, self.pad_id) if self.packing else pad_batch(examples, self.pad_id)
            tokens = sum(len(ids) for ids, _ in examples)
        out["tokens"] = torch.tensor(tokens)
        out["label_tokens"] = (out["labels"] != IGNORE).sum()
        return out


def load_dev_samples(dev) -> list:
    """The dev set of a DevConfig as a list of fcot.tasks.Sample."""
    from fcot.tasks import Sample, load_split

    if dev.task is not None:
        samples = load_split(dev.task, dev.split, dev.split_kind, dev.data_dir)
    else:
        path = Path(dev.path)
        if not path.exists():
            raise FcotError(f"dev.path {path}: not found")
        if path.suffix == ".parquet" or path.is_dir():
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise FcotError(f"dev.path {path}, line {n}: invalid JSON ({e.msg})") from None
        samples = []
        for n, r in enumerate(rows):
            missing = [k for k in ("task", "index", "question", "answer") if r.get(k) is None]
            if missing:
                raise FcotError(f"dev.path {path}, record {n}: missing key {missing[0]!r}")
            choices = r.get("choices")
            samples.append(Sample(str(r["task"]), int(r["index"]), str(r["question"]), str(r["answer"]),
                                  tuple(choices) if choices else None))
    return samples[:dev.size] if dev.size else samples
