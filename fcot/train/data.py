"""Curated data -> token batches for a student.

Curated data contract: parquet with columns task (str), index (int), sample_index (int), prompt (str),
completion (str), and optionally weight_key (str: the TrainConfig field holding the loss weight of the pair's
task, fcot.methods; empty: 1); one row per training pair (a method with several tasks gives several pairs per
kept record).

- decoders: input = prompt + completion + EOS, labels = input with the prompt tokens set to -100 (loss on
  the completion only), truncated to max_length. Prompt and completion are tokenized apart and without
  special tokens, as fcot's engines tokenize a prompt at inference before the model continues it.
- encoder-decoders (T5): encoder input = prompt, labels = completion + EOS.

Labels are aligned with input_ids (the HF convention): the loss shifts them for decoders.

A KD student (train.objective kd) also gets the teacher's top-k at the completion tokens that are the teacher's
own rationale tokens (`teacher_targets`: the same tokenizer, so the rationale re-tokenized is, token for token,
what the teacher emitted, but where BPE merges differ at its edges; those tokens get cross-entropy only).
A micro-batch is either padded to its longest example, or (decoders, `packing`) its examples are packed
back to back into one row without padding: position_ids restart at 0 for each example, and `cu_seq_lens_q`
tells fcot.train.attention where each starts, so examples do not attend to each other and attention costs what
each example's own length costs.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pyarrow.types as pat

from fcot.errors import FcotError
from fcot.tasks import Sample, load_split

COLUMNS = {"task": "string", "index": "integer", "sample_index": "integer", "prompt": "string",
           "completion": "string"}
WEIGHT_KEY = "weight_key"  # optional column: the TrainConfig field weighing the pair's task ("" or absent: 1)
IGNORE = -100


def check_curated(path: str) -> int:
    """Validate the curated parquet data at `path` (schema, not empty); returns its row count."""

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


def pair_length(prompt_tokens: int, completion_tokens: int, encoder_decoder: bool) -> int:
    """The length rule, one for curation (too long: dropped) and training (truncated to max_length): a decoder
    reads prompt + completion + EOS; an encoder-decoder the prompt, and decodes completion + EOS."""
    if encoder_decoder:
        return max(prompt_tokens, completion_tokens + 1)
    return prompt_tokens + completion_tokens + 1


def decoder_example(prompt_ids: list[int], completion_ids: list[int], eos: int, max_length: int):
    """(input_ids, labels): prompt + completion + EOS, loss on the completion and EOS only."""
    ids = (prompt_ids + completion_ids + [eos])[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids + [eos])[:max_length]
    return ids, labels


def seq2seq_example(prompt_ids: list[int], completion_ids: list[int], eos: int, max_length: int):
    """(encoder input_ids, labels): the prompt, and completion + EOS."""
    return prompt_ids[:max_length], (completion_ids + [eos])[:max_length]


def teacher_targets(example: tuple[list[int], list[int]], logprobs: dict) -> list:
    """[(label position, top ids, top logprobs)] of a decoder example (as truncated): each target token that is
    the teacher's emitted token in a common run of at least two tokens of the targets and the teacher's tokens
    (difflib's matching blocks, in order: a lone coincidence, e.g. a digit of the answer, is not a match)."""
    labels = example[1]
    at = [p for p, t in enumerate(labels) if t != IGNORE]
    blocks = difflib.SequenceMatcher(None, [labels[p] for p in at], logprobs["tokens"],
                                     autojunk=False).get_matching_blocks()
    return [(at[a + j], logprobs["top_ids"][b + j], logprobs["top_logprobs"][b + j])
            for a, b, size in blocks if size >= 2 for j in range(size)]


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Decoder examples padded (right) to the longest one."""
    import torch  # heavy: kept out of the CLI's imports

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_batch(examples: list[tuple[list[int], list[int]]]) -> dict:
    """Decoder examples back to back in one row, no padding: position_ids restart at 0 for each example and
    `cu_seq_lens_q` marks where each starts, for fcot.train.attention (each example attends to itself only)."""
    import torch  # heavy: kept out of the CLI's imports

    ids = [t for e, _ in examples for t in e]
    labels = [t for _, lab in examples for t in lab]
    lengths = [len(e) for e, _ in examples]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
            "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32), "max_length_q": max(lengths)}


def pad_seq2seq(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    import torch  # heavy: kept out of the CLI's imports

    enc = pad_batch([(ids, ids) for ids, _ in examples], pad_id)
    width = max(len(lab) for _, lab in examples)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (_, lab) in enumerate(examples):
        labels[row, :len(lab)] = torch.tensor(lab)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


class Collator:
    """Prompts and completions -> model inputs. `encode` tokenizes once (the trainer encodes its whole data set
    before the first step); `collate` pads or packs encoded examples and adds the counts `tokens` (real input
    tokens, padding excluded) and `label_tokens` (tokens with a loss)."""

    def __init__(self, tokenizer, max_length: int, encoder_decoder: bool, packing: bool):
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

    def tokens(self, example: tuple[list[int], list[int]]) -> int:
        ids, labels = example
        return len(ids) + len(labels) if self.encoder_decoder else len(ids)

    @staticmethod
    def label_tokens(example: tuple[list[int], list[int]]) -> int:
        return sum(1 for t in example[1] if t != IGNORE)

    def collate(self, examples: list[tuple[list[int], list[int]]], weights=None, targets=None) -> dict:
        """`weights` (one per example, a method's task weights): each example's label tokens weigh that much in
        the loss (a `weights` tensor aligned with the labels; left out when all are 1). `targets` (one list per
        example, `teacher_targets`): the teacher's top-k at those label positions, as `kd_at` (flat indices into
        `labels`), `kd_ids` and `kd_logprobs` (one row of k per position)."""
        import torch  # heavy: kept out of the CLI's imports

        if self.encoder_decoder:
            out = pad_seq2seq(examples, self.pad_id)
        elif self.packing:
            out = pack_batch(examples)
        else:
            out = pad_batch(examples, self.pad_id)
        out["tokens"] = torch.tensor(sum(self.tokens(e) for e in examples))
        out["label_tokens"] = (out["labels"] != IGNORE).sum()
        if weights is not None and any(w != 1.0 for w in weights):
            if self.packing:
                per_token = [w for (_, lab), w in zip(examples, weights) for _ in lab]
                out["weights"] = torch.tensor([per_token], dtype=torch.float32)
            else:
                out["weights"] = torch.tensor(weights, dtype=torch.float32)[:, None].expand_as(out["labels"])
        if targets is not None:
            width, starts = out["labels"].shape[1], [0]
            for ids, _ in examples:  # where each example begins in the flattened labels
                starts.append(starts[-1] + len(ids) if self.packing else starts[-1] + width)
            at = [starts[e] + pos for e, rows in enumerate(targets) for pos, _, _ in rows]
            k = max((len(ids) for rows in targets for _, ids, _ in rows), default=1)
            out["kd_at"] = torch.tensor(at, dtype=torch.long)
            out["kd_ids"] = torch.tensor([ids for rows in targets for _, ids, _ in rows], dtype=torch.long).view(-1, k)
            out["kd_logprobs"] = torch.tensor([lp for rows in targets for _, _, lp in rows],
                                              dtype=torch.float32).view(-1, k)
        return out

    def __call__(self, batch: dict) -> dict:
        """A batch of columns (`prompt`, `completion`) -> model inputs."""
        return self.collate(self.encode(batch["prompt"], batch["completion"]))


def load_dev_samples(dev) -> list:
    """The dev set of a DevConfig as a list of fcot.tasks.Sample."""
    if dev.task is not None:
        samples = load_split(dev.task, dev.split, dev.split_kind, dev.data_dir)
    else:
        path = Path(dev.path)
        if not path.exists():
            raise FcotError(f"dev.path {path}: not found")
        if path.suffix == ".parquet" or path.is_dir():
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
