"""Curated data -> token batches for a student.

The curated set's columns and the length rule: fcot.contracts.curated.

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

import pyarrow.parquet as pq

from fcot.errors import FcotError
from fcot.tasks import Sample, load_split

IGNORE = -100


def decoder_example(prompt_ids: list[int], completion_ids: list[int], eos: int, max_length: int):
    """(input_ids, labels): prompt + completion + EOS, loss on the completion and EOS only."""
    ids = (prompt_ids + completion_ids + [eos])[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids + [eos])[:max_length]
    return ids, labels


def seq2seq_example(prompt_ids: list[int], completion_ids: list[int], eos: int, max_length: int):
    """(encoder input_ids, labels): the prompt, and completion + EOS."""
    return prompt_ids[:max_length], (completion_ids + [eos])[:max_length]


def topk_rows(column):
    """The teacher's top-k of each curated row (its TEACHER_LOGPROBS column, Arrow): (emitted tokens, top ids
    [n, k] int32, top logprobs [n, k] float16) as numpy views of the column's buffers, no Python object per value."""

    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    tokens, top_ids, top_lps = (column.field(f) for f in ("tokens", "top_ids", "top_logprobs"))
    ids = top_ids.values.values.to_numpy(zero_copy_only=False)  # every row's positions' k ids, flat
    lps = top_lps.values.values.to_numpy(zero_copy_only=False)
    starts = top_ids.values.offsets.to_numpy()  # position p's ids: ids[starts[p]:starts[p + 1]]
    rows = top_ids.offsets.to_numpy()  # row r's positions: rows[r]:rows[r + 1]
    for r in range(len(column)):
        if not column[r].is_valid:
            yield None
            continue
        a, b = starts[rows[r]], starts[rows[r + 1]]
        k = (b - a) // max(rows[r + 1] - rows[r], 1)
        yield tokens[r].values.to_numpy(), ids[a:b].reshape(-1, k), lps[a:b].reshape(-1, k)


def teacher_targets(example: tuple[list[int], list[int]], logprobs) -> tuple:
    """(label positions, top ids [n, k], top logprobs [n, k]) of a decoder example (as truncated), from the
    teacher's (emitted tokens, top ids, top logprobs) of its rationale (`topk_rows`; None: no targets): each target
    token that is the teacher's emitted token in a common run of at least two tokens of the targets and the
    teacher's tokens (difflib's matching blocks, in order: a lone coincidence, e.g. a digit of the answer, is not a
    match)."""
    import numpy as np  # heavy: kept out of the CLI's imports

    if logprobs is None:
        return np.zeros(0, np.int32), np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float16)
    emitted, ids, lps = logprobs
    labels = example[1]
    at = [p for p, t in enumerate(labels) if t != IGNORE]
    blocks = difflib.SequenceMatcher(None, [labels[p] for p in at], [int(t) for t in emitted],
                                     autojunk=False).get_matching_blocks()
    pairs = [(at[a + j], b + j) for a, b, size in blocks if size >= 2 for j in range(size)]
    positions = np.array([p for p, _ in pairs], dtype=np.int32)
    taken = np.array([t for _, t in pairs], dtype=np.int64)
    return positions, np.asarray(ids)[taken].astype(np.int32), np.asarray(lps)[taken].astype(np.float16)


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
        the loss (a `weights` tensor aligned with the labels; left out when all are 1). `targets` (one per
        example, `teacher_targets`'s arrays): the teacher's top-k at those label positions, as `kd_at` (flat
        indices into `labels`), `kd_ids` and `kd_logprobs` (one row of k per position)."""
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
            import numpy as np  # heavy: kept out of the CLI's imports

            width, starts = out["labels"].shape[1], [0]
            for ids, _ in examples:  # where each example begins in the flattened labels
                starts.append(starts[-1] + len(ids) if self.packing else starts[-1] + width)
            k = max((t[1].shape[1] for t in targets if len(t[0])), default=1)
            held = [(e, t) for e, t in enumerate(targets) if len(t[0])]
            out["kd_at"] = torch.from_numpy(np.concatenate(
                [starts[e] + t[0].astype(np.int64) for e, t in held] or [np.zeros(0, np.int64)]))
            out["kd_ids"] = torch.from_numpy(np.concatenate(
                [t[1] for _, t in held] or [np.zeros((0, k), np.int32)]).astype(np.int64))
            out["kd_logprobs"] = torch.from_numpy(np.concatenate(
                [t[2] for _, t in held] or [np.zeros((0, k), np.float16)]).astype(np.float32))
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
