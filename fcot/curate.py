"""Curation on Ray Data: teacher records -> the student's fine-tuning pairs, with stats per task.

Fine-tune-CoT: keep the first D samples of each question (so one teacher run at the largest D serves a
whole D sweep), keep those whose extracted answer is correct, optionally drop identical rationales,
format them (decoder: `{q} ###` -> ` {rationale} --> {answer} END`; encoder-decoder: `{q}` ->
`{rationale} --> {answer}`) and drop pairs longer than the student's max length. Vanilla fine-tuning
pairs come from the gold answers. A dev split for model selection can be carved out of the training
questions (by question, seeded), written as dev.jsonl.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fcot.config import Config
from fcot.errors import FcotError
from fcot.io import atomic_write_json, atomic_write_jsonl
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

    if cfg.method == "vanilla":
        ds = ray.data.from_items([{"task": s.task, "index": s.index, "sample_index": 0, "question": s.question,
                                   "gold": s.answer, "correct": True} for samples in split.values() for s in samples])
    else:
        ds = ray.data.read_parquet(str(_records_dir(cfg.teacher_dir)),
                                   columns=["task", "index", "sample_index", "question", "gold", "rationale", "correct",
                                            "temperature"])
        tasks, limit, temp = set(cfg.tasks), cfg.num_samples, cfg.teacher_temperature
        ds = ds.filter(lambda r: r["task"] in tasks and (limit is None or r["sample_index"] < limit)
                       and (temp is None or abs(r["temperature"] - temp) < 1e-4))
    ds = ds.map_batches(Formatter, fn_constructor_kwargs={"method": cfg.method, "student": cfg.student,
                                                          "max_length": cfg.max_length},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", batch_size=256)
    rows = ds.take_all()  # small columns per sample; the heavy text goes to parquet below

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
               "train_dir": str(out / "train"), "dev": str(out / "dev.jsonl"),
               "tasks": {t: dict(s) for t, s in stats.items()}}
    atomic_write_json(out / "stats.json", summary)
    return summary
