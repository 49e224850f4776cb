"""Curation on Ray Data: the run's teacher records -> the student's fine-tuning pairs, with stats per task.

Rule: a student is trained only on records of the run's own teacher (its teacher_id), for the run's own
questions. The questions are the teacher's (its split and subset); a dev split for model selection is carved
from them first (seeded, by question, the same for every method and data size), then `train_questions` takes
a seeded, nested subset of the rest (a smaller set is a subset of every larger one): the paper's data-size
study, with the teacher run once on the whole split. A method that learns from rationales (fcot.methods:
Fine-tune-CoT, step-by-step) keeps the first D samples of each question (or those an adaptive teacher spent),
those whose answer is correct, optionally one of identical rationales, formats each into one pair per task of
the method (Fine-tune-CoT, decoder: `{q} ###` -> ` {rationale} --> {answer} END`; encoder-decoder: `{q}` ->
`{rationale} --> {answer}`), in the student's chat template when asked, and drops a record any of whose pairs is
longer than the student's max length (fcot.train.data.pair_length). Vanilla pairs come from the gold answers of
the same questions.

Formatting (tokenizing every rationale with the student's tokenizer) is done once per teacher shard and kept in
OUTPUT_DIR/formatted/: `fcot run` formats each shard as the teacher writes it (ShardStreamer), and curation
formats, on Ray Data, only the shards left, then selects.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from fcot.config import Config, ModelRef, PathStr, RayAddress, read_yaml
from fcot.errors import FcotError
from fcot.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from fcot.methods import ChatTemplate, chat_completion, chat_prompt, get_method, method_names, uses_chat
from fcot.models import resolve_model
from fcot.progress import Progress
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.resources import Demand
from fcot.tasks import DataDir, TaskNames, UserTask, load_split, split_user_tasks
from fcot.teacher.config import TeachConfig
from fcot.teacher.pipeline import SLIM, spent
from fcot.teacher.plan import questions as teacher_questions
from fcot.teacher.plan import teacher_id
from fcot.teacher.store import RecordStore
from fcot.train.data import pair_length

DEV_MIN_QUESTIONS = 20  # dev_fraction "auto": a dev split only when the teacher has at least this many questions
ROWS_PER_FILE = 5000  # of the curated set


def auto_dev_size(n: int) -> int:
    """dev_fraction "auto": 10% of the questions, at least 10 and at most 500; none below 20 questions."""
    return 0 if n < DEV_MIN_QUESTIONS else min(500, max(10, round(0.1 * n)))


class CurateConfig(Config):
    method: str = "fine_tune_cot"  # a student method of fcot.methods
    # The teacher whose records are curated (a mapping, or the path of its YAML); its questions are the run's.
    # Vanilla fine-tuning reads no records, but takes the same questions (and dev split) when a teacher is given.
    teacher: TeachConfig | None = None
    tasks: TaskNames
    user_tasks: list[UserTask] = []
    split: Literal["train", "test"] = "train"  # without a teacher
    split_kind: str = "default"
    data_dir: DataDir = Field(None, validate_default=True)
    num_samples: int | None = Field(None, ge=1)  # D: the first D samples of each question (None: all it spent)
    train_questions: float | None = None  # a count (>= 1) or a fraction (< 1) of the training questions
    dedupe: bool = False  # drop identical rationales of a question
    student: ModelRef  # its tokenizer counts lengths, its config says decoder or encoder-decoder
    max_length: int = Field(512, ge=8)
    chat_template: ChatTemplate = False  # the student's chat template (fcot.methods.uses_chat); run: train's
    dev_fraction: float | Literal["auto"] = "auto"  # questions held out for model selection (see auto_dev_size)
    seed: int = 0
    output_dir: PathStr = "runs/curated"
    ray_address: RayAddress = None

    tasks_and_definitions = model_validator(mode="before")(split_user_tasks)

    @model_validator(mode="before")
    @classmethod
    def _teacher_file(cls, data):
        if isinstance(data, dict) and isinstance(data.get("teacher"), str):
            data = {**data, "teacher": read_yaml(data["teacher"])}
        return data

    @model_validator(mode="after")
    def _checks(self):
        method_names([self.method])
        if get_method(self.method).uses_rationales and self.teacher is None:
            raise ValueError(f"method {self.method} needs the teacher (a mapping, or the path of its config)")
        if isinstance(self.dev_fraction, float) and not 0 <= self.dev_fraction < 1:
            raise ValueError("dev_fraction must be in [0, 1) or auto")
        q = self.train_questions
        if q is not None and (q <= 0 or (q >= 1 and q != int(q))):
            raise ValueError("train_questions must be a count >= 1 or a fraction in (0, 1)")
        return self

    def demands(self, prefix: str = "") -> list[Demand]:
        return [Demand(f"{prefix}method", "curation formatter actors", 1, {"CPU": 1.0})]


class Formatter:
    """Formats and measures a method's pairs with the student's tokenizer (one per Ray Data actor): one row per
    (record, task of the method), `part` the task's position."""

    def __init__(self, method: str, student: str, max_length: int, chat_template: ChatTemplate = False):
        from transformers import AutoConfig, AutoTokenizer  # heavy: in the Ray Data actor only

        path = resolve_model(student)
        self.encoder_decoder = bool(AutoConfig.from_pretrained(path).is_encoder_decoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.chat = uses_chat(chat_template, self.tokenizer, self.encoder_decoder, "curate.chat_template")
        self.method = get_method(method)
        self.max_length = max_length
        self.usage = Usage()

    def __call__(self, batch: dict) -> dict:
        n = len(batch["question"])
        tasks, keys = self.method.tasks, self.method.weight_keys()
        rows = [(i, part) for i in range(n) for part in range(len(tasks))]
        prompts, completions = [], []
        for i, part in rows:
            rationale = str(batch["rationale"][i]) if "rationale" in batch else ""
            prompt = tasks[part].render_prompt(str(batch["question"][i]), self.encoder_decoder)
            completion = tasks[part].render_target(str(batch["gold"][i]), rationale, self.encoder_decoder)
            if self.chat:
                prompt, completion = chat_prompt(self.tokenizer, prompt), chat_completion(self.tokenizer, prompt,
                                                                                           completion)
            prompts.append(prompt)
            completions.append(completion)
        p_ids = self.tokenizer(prompts, add_special_tokens=False).input_ids
        c_ids = self.tokenizer(completions, add_special_tokens=False).input_ids
        lengths = [pair_length(len(p), len(c), self.encoder_decoder) for p, c in zip(p_ids, c_ids)]
        out = {name: [batch[name][i] for i, _ in rows] for name in batch}
        out.update(part=[part for _, part in rows], weight_key=[keys[part] or "" for _, part in rows],
                   prompt=prompts, completion=completions, length=lengths,
                   completion_length=[len(c) + 1 for c in c_ids],  # + the EOS the trainer appends
                   too_long=[length > self.max_length for length in lengths])
        out["cpu_s"] = [self.usage.take()["cpu_s"] / len(rows)] * len(rows)  # this actor's CPU time, spread out
        return out


RECORD_COLUMNS = ["key", "task", "index", "sample_index", "question", "gold", "rationale"]
FORMATTED_COLUMNS = ["key", "part", "weight_key", "prompt", "completion", "length", "completion_length", "too_long",
                     "cpu_s"]


def _formatter_kwargs(cfg: CurateConfig) -> dict:
    return {"method": cfg.method, "student": cfg.student, "max_length": cfg.max_length,
            "chat_template": cfg.chat_template}


def formatted_dir(cfg: CurateConfig) -> Path:
    """Formatted teacher shards for one formatting (method, student, max length): a part per teacher shard."""
    key = hashlib.sha256(json.dumps([3, cfg.method, cfg.student, cfg.max_length, cfg.chat_template]).encode())
    key = key.hexdigest()[:12]
    return Path(cfg.output_dir) / "formatted" / key


def records_dir(cfg: CurateConfig) -> Path:
    path = Path(cfg.teacher.output_dir) / "records"
    if not path.is_dir() or not list(path.glob("*.parquet")):
        raise FcotError(f"teacher.output_dir {cfg.teacher.output_dir}: no teacher records (records/*.parquet)")
    return path


def _write_part(path: Path, columns: dict) -> None:
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
            if self.formatter is None:
                self.formatter = Formatter(**_formatter_kwargs(self.cfg))
            table = pq.read_table(shard, columns=RECORD_COLUMNS)
            _write_part(self.out / shard.name, self.formatter({c: table.column(c).to_pylist() for c in RECORD_COLUMNS}))
            self.formatted += 1
        except Exception as e:  # noqa: BLE001 - never stop the teacher; curation formats the shard later
            self.failed = True
            print(f"[curate] streaming stopped at {shard.name} ({e}); curation will format the rest", file=sys.stderr)


def _format_shards(cfg: CurateConfig, shards: list[Path]) -> tuple[int, float]:
    """Format, on Ray Data, the teacher shards that have no formatted part yet; returns how many, and the CPU
    seconds the formatter actor spent."""
    import ray  # heavy: only when there is something to format

    out = formatted_dir(cfg)
    missing = [s for s in shards if not (out / s.name).exists()]
    if not missing:
        return 0, 0.0
    ds = ray.data.read_parquet([str(s.resolve()) for s in missing], include_paths=True)
    ds = ds.select_columns(RECORD_COLUMNS + ["path"])
    ds = ds.map_batches(Formatter, fn_constructor_kwargs=_formatter_kwargs(cfg),
                        compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", batch_size=256)
    tables, seen = [], set()
    with Progress(f"curate {cfg.method}", len(missing), "shards") as bar:  # shards reached by the formatter
        for t in ds.select_columns(FORMATTED_COLUMNS + ["path"]).iter_batches(batch_size=None, batch_format="pyarrow"):
            tables.append(t)
            new = set(t.column("path").to_pylist()) - seen
            seen |= new
            bar.update(len(new))
    table = pa.concat_tables(tables)
    rows_of = defaultdict(list)  # shard name -> its rows, in one pass (thousands of shards in a large run)
    for i, p in enumerate(table.column("path").to_pylist()):
        rows_of[Path(p).name].append(i)
    for shard in missing:  # a part per shard, written whole: a killed curation keeps the parts it finished
        part = table.take(rows_of[shard.name])
        _write_part(out / shard.name, {c: part.column(c).to_pylist() for c in FORMATTED_COLUMNS})
    return len(missing), float(sum(table.column("cpu_s").to_pylist()))


def split_questions(cfg: CurateConfig) -> tuple[list, set, set]:
    """(the questions, the dev questions, the training questions) as (task, index) sets; see the module doc."""
    if cfg.teacher is not None:
        qs = teacher_questions(cfg.teacher)
    else:
        qs = [s for t in cfg.tasks for s in load_split(t, cfg.split, cfg.split_kind, cfg.data_dir)]
    dev, train = set(), set()
    for task in cfg.tasks:
        indices = sorted(q.index for q in qs if q.task == task)
        n_dev = auto_dev_size(len(indices)) if cfg.dev_fraction == "auto" else round(len(indices) * cfg.dev_fraction)
        random.Random(f"{cfg.seed}:{task}").shuffle(indices)
        dev.update((task, i) for i in indices[:n_dev])
        pool = indices[n_dev:]
        random.Random(f"{cfg.seed}:{task}:train").shuffle(pool)  # a prefix of one order: nested subsets
        q = cfg.train_questions
        n = len(pool) if q is None else min(len(pool), int(q) if q >= 1 else max(1, math.floor(q * len(pool))))
        train.update((task, i) for i in pool[:n])
    return qs, dev, train


def curate(cfg: CurateConfig) -> dict:
    """Write OUTPUT_DIR/train/*.parquet (task, index, sample_index, prompt, completion), dev.jsonl, stats.json."""
    import ray  # heavy: Ray Data formats and writes

    init_ray(cfg.ray_address)
    cpu_started = cpu_seconds(children=False)
    qs, dev, train_q = split_questions(cfg)
    stats = {t: defaultdict(int) for t in cfg.tasks}
    formatted_now, worker_cpu = 0, 0.0
    method = get_method(cfg.method)
    if not method.uses_rationales:  # the gold answers of the same questions
        ds = ray.data.from_items([{"key": f"{s.task}/{s.index}", "task": s.task, "index": s.index, "sample_index": 0,
                                   "question": s.question, "gold": s.answer}
                                  for s in qs if (s.task, s.index) in train_q])
        ds = ds.map_batches(Formatter, fn_constructor_kwargs=_formatter_kwargs(cfg),
                            compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", batch_size=256)
        pairs = ds.take_all()
        worker_cpu = sum(float(r["cpu_s"]) for r in pairs)
        records = {r["key"]: {**r, "correct": True} for r in pairs if r["part"] == 0}
        chosen = list(records.values())
    else:
        store = RecordStore(records_dir(cfg))
        tid = teacher_id(cfg.teacher)
        shards = store.shards(tid)  # other teachers' records in the same store are not this run's to format
        formatted_now, worker_cpu = _format_shards(cfg, shards)
        records = store.read(teacher_id=tid, shards=shards, columns=SLIM).to_pylist()
        mine = [r for r in records if (r["task"], r["index"]) in train_q or (r["task"], r["index"]) in dev]
        chosen = [r for r in spent(cfg.teacher, mine) if cfg.num_samples is None or r["sample_index"] < cfg.num_samples]
        wanted = {r["key"] for r in chosen}
        pairs = [p for s in shards for p in pq.read_table(formatted_dir(cfg) / s.name).to_pylist()
                 if p["key"] in wanted]
    pairs_of = defaultdict(list)  # record key -> its pairs, one per task of the method, in task order
    for pair in sorted(pairs, key=lambda p: int(p["part"])):
        pairs_of[pair["key"]].append(pair)
    asked = method.tasks.index(method.ask) if method.ask in method.tasks else 0

    kept, seen = [], set()
    for r in sorted(chosen, key=lambda r: (r["task"], r["index"], r["sample_index"])):
        task, index = str(r["task"]), int(r["index"])
        st = stats[task]
        if (task, index) in dev:
            st["dev_samples"] += 1
            continue
        st["samples"] += 1
        if not r["correct"]:
            st["dropped_incorrect"] += 1
            continue
        text = str(r.get("rationale") or pairs_of[r["key"]][0]["completion"]).strip()
        if cfg.dedupe and (task, index, text) in seen:
            st["dropped_duplicate"] += 1
            continue
        seen.add((task, index, text))
        if any(p["too_long"] for p in pairs_of[r["key"]]):  # a record is kept whole or not at all
            st["dropped_too_long"] += 1
            continue
        st["kept"] += 1
        for p in pairs_of[r["key"]]:
            kept.append({"task": task, "index": index, "sample_index": int(r["sample_index"]), "part": int(p["part"]),
                         "weight_key": str(p["weight_key"]), "prompt": str(p["prompt"]),
                         "completion": str(p["completion"]), "length": int(p["length"]),
                         "completion_length": int(p["completion_length"])})
    for task in cfg.tasks:
        train_t = {i for t, i in train_q if t == task}
        per_question = Counter(r["index"] for r in kept if r["task"] == task and r["part"] == asked)
        lengths = sorted(r["completion_length"] for r in kept if r["task"] == task and r["part"] == asked)
        spread = Counter(per_question[i] for i in train_t)  # kept rationales -> questions (0 included)
        stats[task].update(questions=len(train_t), dev_questions=sum(t == task for t, _ in dev),
                           questions_without_sample=len(train_t - set(per_question)),
                           kept_per_question=dict(sorted(spread.items())),
                           completion_length_max=lengths[-1] if lengths else 0)
    if not kept:
        raise FcotError(f"curation kept no sample for {', '.join(cfg.tasks)} (see the stats: "
                        f"{json.dumps({t: dict(s) for t, s in stats.items()})})")

    out = Path(cfg.output_dir)
    tmp = out / ".train.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Written here, in `kept`'s order (by question, then sample): a Ray Data write would order its rows as its blocks
    # finish, which differs from run to run on a multi-node cluster, and training's seeded shuffle starts from it.
    for part, start in enumerate(range(0, len(kept), ROWS_PER_FILE)):
        pq.write_table(pa.Table.from_pylist(kept[start:start + ROWS_PER_FILE]), tmp / f"part-{part:05d}.parquet")
    shutil.rmtree(out / "train", ignore_errors=True)
    os.replace(tmp, out / "train")  # the curated set appears whole or not at all
    dev_rows = [s.to_dict() for s in qs if (s.task, s.index) in dev]
    atomic_write_jsonl(out / "dev.jsonl", dev_rows)
    summary = {"method": cfg.method, "num_samples": cfg.num_samples, "train_questions": cfg.train_questions,
               "teacher_id": teacher_id(cfg.teacher) if cfg.teacher else None,
               "kept": sum(st.get("kept", 0) for st in stats.values()), "pairs": len(kept),
               "max_length": cfg.max_length,  # training follows it (train.max_length)
               "completion_length_max": max(r["completion_length"] for r in kept if r["part"] == asked),
               "shards_formatted_at_curation": formatted_now, "train_dir": str(out / "train"),
               "cpu_s": round(worker_cpu + cpu_seconds(children=False) - cpu_started, 1),
               "dev": str(out / "dev.jsonl"), "dev_questions": len(dev),
               "tasks": {t: dict(s) for t, s in stats.items()}}
    atomic_write_json(out / "stats.json", summary)
    return summary
