"""Curation on Ray Data: teacher records -> the student's fine-tuning pairs, with stats per task.

Fine-tune-CoT: keep the first D samples of each question (so one teacher run at the largest D serves a
whole D sweep), keep those whose extracted answer is correct, optionally drop identical rationales,
format them (decoder: `{q} ###` -> ` {rationale} --> {answer} END`; encoder-decoder: `{q}` ->
`{rationale} --> {answer}`) and drop pairs longer than the student's max length. Vanilla fine-tuning
pairs come from the gold answers. A dev split for model selection can be carved out of the training
questions (by question, seeded), written as dev.jsonl.

Formatting (tokenizing every rationale with the student's tokenizer) is done once per teacher shard and
kept in OUTPUT_DIR/formatted/: `fcot run` formats each shard as the teacher writes it (ShardStreamer), and
curation formats, on Ray Data, only the shards left, then selects (D, correctness, dedupe, length, dev).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fcot.config import Config
from fcot.errors import FcotError
from fcot.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from fcot.prompts import get_format


class CurateConfig(Config):
    method: Literal["fine_tune_cot", "vanilla"] = "fine_tune_cot"
    teacher_dir: str | None = None  # the teacher's output_dir (records/ inside) or a records folder
    tasks: list[str]
    split: Literal["train", "test"] = "train"
    split_kind: str = "default"
    data_dir: str | None = None
    num_samples: int | None = Field(None, ge=1)  # D: the first D samples of each question (None: all)
    teacher_temperature: float | None = None  # only records sampled at this temperature (0: greedy)
    dedupe: bool = False  # drop identical rationales of a question
    student: str  # model alias/path: its tokenizer counts lengths, its config says decoder or encoder-decoder
    max_length: int = Field(512, ge=8)
    dev_fraction: float = Field(0.0, ge=0, lt=1)  # questions held out for model selection
    seed: int = 0
    output_dir: str = "runs/curated"
    ray_address: str | None = None

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _needs_teacher(self):
        if self.method == "fine_tune_cot" and not self.teacher_dir:
            raise ValueError("method fine_tune_cot needs teacher_dir")
        return self


def _records_dir(teacher_dir: str) -> Path:
    path = Path(teacher_dir)
    if (path / "records").is_dir():
        path = path / "records"
    if not path.is_dir() or not list(path.glob("*.parquet")):
        raise FcotError(f"teacher_dir {teacher_dir}: no teacher records (*.parquet) found")
    return path


class Formatter:
    """Formats and measures pairs with the student's tokenizer (one per Ray Data actor)."""

    def __init__(self, method: str, student: str, max_length: int):
        from transformers import AutoConfig, AutoTokenizer

        from fcot.models import resolve_model

        path = resolve_model(student)
        self.encoder_decoder = bool(AutoConfig.from_pretrained(path).is_encoder_decoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.format = get_format(method)
        self.max_length = max_length

    def __call__(self, batch: dict) -> dict:
        n = len(batch["question"])
        prompts, completions, lengths = [], [], []
        for i in range(n):
            rationale = str(batch["rationale"][i]) if "rationale" in batch else ""
            prompts.append(self.format.render_prompt(str(batch["question"][i]), self.encoder_decoder))
            completions.append(self.format.render_target(str(batch["gold"][i]), rationale, self.encoder_decoder))
        p_ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
        c_ids = self.tokenizer(completions, add_special_tokens=False).input_ids
        for p, c in zip(p_ids, c_ids):  # + 1 for the EOS the trainer appends
            lengths.append(max(len(p), len(c) + 1) if self.encoder_decoder else len(p) + len(c) + 1)
        batch["prompt"], batch["completion"], batch["length"] = prompts, completions, lengths
        batch["too_long"] = [length > self.max_length for length in lengths]
        return batch


RECORD_COLUMNS = ["task", "index", "sample_index", "question", "gold", "rationale", "correct", "temperature"]
FORMATTED_COLUMNS = ["task", "index", "sample_index", "correct", "temperature", "prompt", "completion", "length",
                     "too_long"]


def formatted_dir(cfg: CurateConfig) -> Path:
    """Formatted teacher shards for one formatting (method, student, max length): a part per teacher shard."""
    key = hashlib.sha256(json.dumps([cfg.method, cfg.student, cfg.max_length]).encode()).hexdigest()[:12]
    return Path(cfg.output_dir) / "formatted" / key


def _write_part(path: Path, columns: dict) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({c: list(columns[c]) for c in FORMATTED_COLUMNS}), buf)
    atomic_write_bytes(path, buf.getvalue())


class ShardStreamer:
    """Formats each teacher shard in this process as the teacher writes it (streaming curation in `fcot run`).

    A shard it cannot format is left to the curation stage, which formats whatever is missing."""

    def __init__(self, cfg: CurateConfig):
        self.cfg, self.out, self.formatter, self.formatted, self.failed = cfg, formatted_dir(cfg), None, 0, False

    def __call__(self, shard: Path) -> None:
        if self.failed or (self.out / shard.name).exists():
            return
        try:
            import pyarrow.parquet as pq

            if self.formatter is None:
                self.formatter = Formatter(self.cfg.method, self.cfg.student, self.cfg.max_length)
            table = pq.read_table(shard, columns=RECORD_COLUMNS)
            _write_part(self.out / shard.name, self.formatter({c: table.column(c).to_pylist() for c in RECORD_COLUMNS}))
            self.formatted += 1
        except Exception as e:  # noqa: BLE001 - never stop the teacher; curation formats the shard later
            self.failed = True
            print(f"[curate] streaming stopped at {shard.name} ({e}); curation will format the rest", file=sys.stderr)


def _format_shards(cfg: CurateConfig, shards: list[Path]) -> int:
    """Format, on Ray Data, the teacher shards that have no formatted part yet; returns how many."""
    import pyarrow as pa
    import ray

    out = formatted_dir(cfg)
    missing = [s for s in shards if not (out / s.name).exists()]
    if not missing:
        return 0
    ds = ray.data.read_parquet([str(s.resolve()) for s in missing], include_paths=True)
    ds = ds.select_columns(RECORD_COLUMNS + ["path"])
    ds = ds.map_batches(Formatter, fn_constructor_kwargs={"method": cfg.method, "student": cfg.student,
                                                          "max_length": cfg.max_length},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", batch_size=256)
    tables = list(ds.select_columns(FORMATTED_COLUMNS + ["path"]).iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(tables)
    rows_of = defaultdict(list)  # shard name -> its rows, in one pass (thousands of shards in a large run)
    for i, p in enumerate(table.column("path").to_pylist()):
        rows_of[Path(p).name].append(i)
    for shard in missing:  # a part per shard, written whole: a killed curation keeps the parts it finished
        part = table.take(rows_of[shard.name])
        _write_part(out / shard.name, {c: part.column(c).to_pylist() for c in FORMATTED_COLUMNS})
    return len(missing)


def _dev_questions(questions: dict[str, list[int]], fraction: float, seed: int) -> set[tuple[str, int]]:
    dev = set()
    for task, indices in questions.items():
        indices = sorted(indices)
        random.Random(f"{seed}:{task}").shuffle(indices)
        dev.update((task, i) for i in indices[: round(len(indices) * fraction)])
    return dev


def curate(cfg: CurateConfig) -> dict:
    """Write OUTPUT_DIR/train/*.parquet (task, index, sample_index, prompt, completion), dev.jsonl, stats.json."""
    import ray

    from fcot.ray_utils import init_ray
    from fcot.tasks import load_split

    init_ray(cfg.ray_address)
    split = {t: load_split(t, cfg.split, cfg.split_kind, cfg.data_dir) for t in cfg.tasks}
    questions = {t: [s.index for s in samples] for t, samples in split.items()}
    dev = _dev_questions(questions, cfg.dev_fraction, cfg.seed)
    in_split = {(t, i) for t, idx in questions.items() for i in idx}

    formatted_now = 0
    if cfg.method == "vanilla":
        ds = ray.data.from_items([{"task": s.task, "index": s.index, "sample_index": 0, "question": s.question,
                                   "gold": s.answer, "correct": True} for samples in split.values() for s in samples])
        ds = ds.map_batches(Formatter, fn_constructor_kwargs={"method": cfg.method, "student": cfg.student,
                                                              "max_length": cfg.max_length},
                            compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", batch_size=256)
        rows = ds.take_all()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        shards = sorted(_records_dir(cfg.teacher_dir).glob("*.parquet"))
        formatted_now = _format_shards(cfg, shards)
        table = pa.concat_tables([pq.read_table(formatted_dir(cfg) / s.name) for s in shards])
        tasks, limit, temp = set(cfg.tasks), cfg.num_samples, cfg.teacher_temperature
        rows = [r for r in table.to_pylist() if r["task"] in tasks and (limit is None or r["sample_index"] < limit)
                and (temp is None or abs(r["temperature"] - temp) < 1e-4)]

    stats = {t: defaultdict(int) for t in cfg.tasks}
    kept, seen = [], set()
    for r in sorted(rows, key=lambda r: (r["task"], r["index"], r["sample_index"])):
        task, index = str(r["task"]), int(r["index"])
        if (task, index) not in in_split:
            continue  # a record of another split (e.g. a teacher run on test questions)
        st = stats[task]
        st["samples"] += 1
        if (task, index) in dev:
            st["dev_samples"] += 1
            continue
        if not r["correct"]:
            st["dropped_incorrect"] += 1
            continue
        if cfg.dedupe and (task, index, r["completion"]) in seen:
            st["dropped_duplicate"] += 1
            continue
        seen.add((task, index, r["completion"]))
        if r["too_long"]:
            st["dropped_too_long"] += 1
            continue
        st["kept"] += 1
        kept.append({"task": task, "index": index, "sample_index": int(r["sample_index"]),
                     "prompt": str(r["prompt"]), "completion": str(r["completion"]), "length": int(r["length"])})
    for task in cfg.tasks:
        train_q = [i for i in questions[task] if (task, i) not in dev]
        with_sample = {r["index"] for r in kept if r["task"] == task}
        stats[task].update(questions=len(train_q), dev_questions=len(questions[task]) - len(train_q),
                           questions_without_sample=len(set(train_q) - with_sample))
    if not kept:
        raise FcotError(f"curation kept no sample for {', '.join(cfg.tasks)} (see the stats: "
                        f"{json.dumps({t: dict(s) for t, s in stats.items()})})")

    out = Path(cfg.output_dir)
    tmp = out / ".train.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ray.data.from_items(kept).repartition(max(1, len(kept) // 5000)).write_parquet(str(tmp))
    shutil.rmtree(out / "train", ignore_errors=True)
    os.replace(tmp, out / "train")  # the curated set appears whole or not at all
    dev_rows = [s.to_dict() for samples in split.values() for s in samples if (s.task, s.index) in dev]
    atomic_write_jsonl(out / "dev.jsonl", dev_rows)
    summary = {"method": cfg.method, "num_samples": cfg.num_samples, "kept": len(kept),
               "shards_formatted_at_curation": formatted_now,
               "train_dir": str(out / "train"), "dev": str(out / "dev.jsonl"),
               "tasks": {t: dict(s) for t, s in stats.items()}}
    atomic_write_json(out / "stats.json", summary)
    return summary
