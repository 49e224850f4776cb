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

Labels (`label`, `filter`): "correct" means the sample's extracted answer equals the question's label, the gold
answer, or with `label: majority` the most frequent answer among the question's (first D) samples, given when at
least `min_votes` samples reach it (self-consistency; a question without gold is labeled so, one short of votes is
dropped). `filter: all` keeps the samples that reach another answer too. A pair ends with the gold answer where
the sample reached it, else with the sample's own answer: a kept rationale and its answer always agree. Dev
questions (scored by gold) are carved from the questions that have gold.

The flow, on Ray Data; the driver holds the questions and the counts, never a record or a pair:

    teacher shards -> formatted parts (OUTPUT_DIR/formatted/: one per shard, tokenized once with the student's
        tokenizer; `fcot run` formats each shard as the teacher writes it (ShardStreamer), curation formats the
        shards left, in Ray Data actors that write the parts themselves)
    -> read_parquet(the parts of this teacher's shards) -> groupby(task, index).map_groups(select_question):
        a question's samples meet, the rules above apply, and it emits its kept pairs and one row of counts
    -> the kept pairs written by Ray Data as OUTPUT_DIR/train/part-*.parquet, in (task, index, sample, part)
       order; the counts summed in the driver into stats.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from fcot.config import Config, ModelRef, PathStr, RayAddress, read_yaml
from fcot.errors import FcotError
from fcot.io import atomic_file, atomic_write_json, atomic_write_jsonl
from fcot.methods import ChatTemplate, chat_completion, chat_prompt, get_method, method_names, uses_chat
from fcot.models import resolve_model
from fcot.progress import Progress
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.resources import Demand
from fcot.stats import wilson
from fcot.tasks import DataDir, TaskNames, UserTask, load_split, require_gold, split_user_tasks
from fcot.teacher.config import TeachConfig
from fcot.teacher.plan import questions as teacher_questions
from fcot.teacher.plan import rationale_digest, samples_used, teacher_id
from fcot.teacher.store import RecordStore
from fcot.train.data import pair_length

DEV_MIN_QUESTIONS = 20  # dev_fraction "auto": a dev split only when the teacher has at least this many questions
ROWS_PER_FILE = 5000  # of the curated set
PART_BYTES = 8 << 20  # of formatted parts (parquet on disk) per block that curation's selection reads


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
    label: Literal["gold", "majority"] = "gold"  # what a sample's answer must equal (see the module doc)
    min_votes: int = Field(1, ge=1)  # label majority: the fewest samples that must reach the majority answer
    filter: Literal["correct", "all"] = "correct"  # all: keep the samples that miss the label too
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
        if self.label == "majority" and not get_method(self.method).uses_rationales:
            raise ValueError(f"label majority: method {self.method} learns from gold answers, not teacher samples; "
                             f"curate it with label gold")
        if self.min_votes > 1 and self.label != "majority":
            raise ValueError("min_votes applies to label majority")
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
    (record, task of the method), `part` the task's position. Each row also carries what selection compares
    without the text: hashes of the record's stripped rationale (adaptive rounds count distinct ones) and of the
    text dedupe compares (the rationale, else the first pair's completion)."""

    def __init__(self, method: str, student: str, max_length: int, chat_template: ChatTemplate = False):
        from transformers import AutoConfig, AutoTokenizer  # heavy: in the Ray Data actor only

        path = resolve_model(student)
        self.encoder_decoder = bool(AutoConfig.from_pretrained(path).is_encoder_decoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.chat = uses_chat(chat_template, self.tokenizer, self.encoder_decoder, "curate.chat_template")
        self.method = get_method(method)
        self.max_length = max_length
        self.usage = Usage(children=False)  # taken once per batch: a tokenizer starts no process

    def __call__(self, batch: dict) -> dict:
        n = len(batch["question"])
        tasks, keys = self.method.tasks, self.method.weight_keys()
        rows = [(i, part) for i in range(n) for part in range(len(tasks))]
        rationales = [str(r) for r in batch["rationale"]] if "rationale" in batch else [""] * n
        # A teacher that said nothing before its answer gives a rationale method nothing to learn: no pair, dropped.
        blank = [self.method.uses_rationales and not r.strip() for r in rationales]
        prompts, completions = [], []
        # The answer a pair ends with: gold where the sample reached it, else the sample's own (module doc).
        answers = [str(batch["gold"][i] if batch["correct"][i] else batch["prediction"][i] or "") for i in range(n)]
        for i, part in rows:
            prompt = tasks[part].render_prompt(str(batch["question"][i]), self.encoder_decoder)
            completion = "" if blank[i] else tasks[part].render_target(answers[i], rationales[i], self.encoder_decoder)
            if self.chat:
                prompt, completion = chat_prompt(self.tokenizer, prompt), chat_completion(self.tokenizer, prompt,
                                                                                           completion)
            prompts.append(prompt)
            completions.append(completion)
        # Lengths only; a question's D samples share their prompts, each tokenized once.
        unique = list(dict.fromkeys(prompts))
        prompt_length = dict(zip(unique, map(len, self.tokenizer(unique, add_special_tokens=False).input_ids)))
        c_ids = self.tokenizer(completions, add_special_tokens=False).input_ids
        lengths = [pair_length(prompt_length[p], len(c), self.encoder_decoder) for p, c in zip(prompts, c_ids)]
        first = {i: completions[j] for j, (i, part) in enumerate(rows) if part == 0}
        rationale_hash = [rationale_digest(r) for r in rationales]
        text_hash = [rationale_digest(r or first[i]) for i, r in enumerate(rationales)]
        out = {name: [batch[name][i] for i, _ in rows] for name in batch}
        out.update(part=[part for _, part in rows], weight_key=[keys[part] or "" for _, part in rows],
                   prompt=prompts, completion=completions, length=lengths,
                   completion_length=[len(c) + 1 for c in c_ids],  # + the EOS the trainer appends
                   too_long=[length > self.max_length for length in lengths],
                   rationale_hash=[rationale_hash[i] for i, _ in rows], text_hash=[text_hash[i] for i, _ in rows],
                   no_rationale=[blank[i] for i, _ in rows])
        out["cpu_s"] = [self.usage.take()["cpu_s"] / len(rows)] * len(rows)  # this actor's CPU time, spread out
        return out


RECORD_COLUMNS = ["key", "teacher_id", "task", "index", "sample_index", "correct", "prediction", "question", "gold",
                  "rationale"]
FORMATTED_COLUMNS = ["key", "teacher_id", "task", "index", "sample_index", "correct", "prediction", "rationale_hash",
                     "text_hash", "part", "weight_key", "prompt", "completion", "length", "completion_length",
                     "too_long", "no_rationale"]
PAIRS = pa.schema([("task", pa.string()), ("index", pa.int64()), ("sample_index", pa.int64()), ("part", pa.int64()),
                   ("weight_key", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                   ("length", pa.int64()), ("completion_length", pa.int64())])  # a curated row (fcot.train.data)


def _formatter_kwargs(cfg: CurateConfig) -> dict:
    return {"method": cfg.method, "student": cfg.student, "max_length": cfg.max_length,
            "chat_template": cfg.chat_template}


def formatted_dir(cfg: CurateConfig) -> Path:
    """Formatted teacher shards for one formatting (method, student, max length): a part per teacher shard."""
    key = hashlib.sha256(json.dumps([6, cfg.method, cfg.student, cfg.max_length, cfg.chat_template]).encode())
    key = key.hexdigest()[:12]
    return Path(cfg.output_dir) / "formatted" / key


def records_dir(cfg: CurateConfig) -> Path:
    path = Path(cfg.teacher.output_dir) / "records"
    if not path.is_dir() or not list(path.glob("*.parquet")):
        raise FcotError(f"teacher.output_dir {cfg.teacher.output_dir}: no teacher records (records/*.parquet)")
    return path


def format_shard(formatter: Formatter, shard: Path, out: Path) -> float:
    """Format one teacher shard into its part, OUT/SHARD_NAME (written whole); returns the formatter's CPU-s."""
    table = pq.read_table(shard, columns=RECORD_COLUMNS)
    columns = formatter({c: table.column(c).to_pylist() for c in RECORD_COLUMNS})
    with atomic_file(out / shard.name) as f:
        pq.write_table(pa.table({c: columns[c] for c in FORMATTED_COLUMNS}), f)
    return float(sum(columns["cpu_s"]))


class ShardFormatter:
    """A Ray Data actor that formats whole teacher shards, each into its part: no formatted row reaches the
    driver, and a killed curation keeps the parts it finished."""

    def __init__(self, out: str, **formatter_kwargs):
        self.out, self.formatter = Path(out), Formatter(**formatter_kwargs)

    def __call__(self, batch: dict) -> dict:
        return {"shard": batch["shard"],
                "cpu_s": [format_shard(self.formatter, Path(s), self.out) for s in batch["shard"]]}


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
            format_shard(self.formatter, shard, self.out)
            self.formatted += 1
        except Exception as e:  # noqa: BLE001 - never stop the teacher; curation formats the shard later
            self.failed = True
            print(f"[curate] streaming stopped at {shard.name} ({e}); curation will format the rest", file=sys.stderr)


def _format_shards(cfg: CurateConfig, shards: list[Path]) -> tuple[int, float]:
    """Format, on Ray Data, the teacher shards that have no formatted part yet; returns how many, and the CPU
    seconds the formatter actors spent."""
    import ray  # heavy: only when there is something to format

    out = formatted_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    missing = [s for s in shards if not (out / s.name).exists()]
    if not missing:
        return 0, 0.0
    actors = max(1, min(len(missing), int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items([{"shard": str(s.resolve())} for s in missing])
    ds = ds.map_batches(ShardFormatter, fn_constructor_kwargs={"out": str(out.resolve()), **_formatter_kwargs(cfg)},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), batch_size=1, num_cpus=1)
    cpu = 0.0
    with Progress(f"curate {cfg.method}", len(missing), "shards") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            cpu += float(batch["cpu_s"].sum())
            bar.update(len(batch["shard"]))
    return len(missing), cpu


def split_questions(cfg: CurateConfig) -> tuple[list, set, set]:
    """(the questions, the dev questions, the training questions) as (task, index) sets; see the module doc."""
    if cfg.teacher is not None:
        qs = teacher_questions(cfg.teacher)
    else:
        qs = [s for t in cfg.tasks for s in load_split(t, cfg.split, cfg.split_kind, cfg.data_dir)]
    dev, train = set(), set()
    for task in cfg.tasks:
        indices = sorted(q.index for q in qs if q.task == task and q.answer is not None)  # dev is scored by gold
        n_dev = auto_dev_size(len(indices)) if cfg.dev_fraction == "auto" else round(len(indices) * cfg.dev_fraction)
        random.Random(f"{cfg.seed}:{task}").shuffle(indices)
        dev.update((task, i) for i in indices[:n_dev])
        pool = indices[n_dev:] + sorted(q.index for q in qs if q.task == task and q.answer is None)
        random.Random(f"{cfg.seed}:{task}:train").shuffle(pool)  # a prefix of one order: nested subsets
        q = cfg.train_questions
        n = len(pool) if q is None else min(len(pool), int(q) if q >= 1 else max(1, math.floor(q * len(pool))))
        train.update((task, i) for i in pool[:n])
    return qs, dev, train


def check_labels(cfg: CurateConfig, qs: list, train: set) -> None:
    """With label gold, or for a method that learns from gold answers only (vanilla), every training question
    needs its gold answer (stops naming the first without)."""
    rationales = get_method(cfg.method).uses_rationales
    if rationales and cfg.label == "majority":  # fcot run gives every method the run's label: vanilla needs gold
        return
    why = (f"method {cfg.method} learns from each training question's gold answer" if not rationales else
           f"method {cfg.method} with curate.label gold learns from each training question's gold answer "
           f"(curate.label majority labels a question by the teacher's votes)")
    require_gold([s for s in qs if (s.task, s.index) in train], why)


def select_question(group: pa.Table, *, dev: frozenset, train: frozenset, adaptive, budget: int | None,
                    num_samples: int | None, dedupe: bool, asked: int, label: str = "gold", min_votes: int = 1,
                    keep_all: bool = False) -> pa.Table:
    """One question's formatted pairs (a Ray Data group) -> the pairs curation keeps, in (sample, part) order,
    and one row of counts (the `counts` column, JSON; null on pairs). See the module doc for the rules."""
    started = time.process_time()
    task, index = group["task"][0].as_py(), int(group["index"][0].as_py())
    if (task, index) not in dev and (task, index) not in train:
        return _question_rows(group, [], None)
    cols = group.select(["sample_index", "part", "correct", "prediction", "rationale_hash", "text_hash",
                         "too_long", "no_rationale"]).to_pydict()
    records: dict[int, dict] = {}  # sample index -> its fields and its rows by part
    for i, (sample, part) in enumerate(zip(cols["sample_index"], cols["part"])):
        r = records.setdefault(sample, {"correct": cols["correct"][i], "prediction": cols["prediction"][i],
                                        "rationale": cols["rationale_hash"][i], "text": cols["text_hash"][i],
                                        "too_long": False, "blank": cols["no_rationale"][i], "rows": {}})
        if part not in r["rows"]:  # a record stored twice (shards of an older fcot) counts once
            r["rows"][part] = i
            r["too_long"] |= cols["too_long"][i]
    spent = len(records) if budget is None else samples_used(records, adaptive, budget)  # the teacher's rule
    chosen = [k for k in sorted(records) if k < spent and (num_samples is None or k < num_samples)]
    lengths = group["completion_length"].to_pylist()
    counts: Counter = Counter()
    keep, seen, longest = [], set(), 0  # longest: of the kept records' asked pairs
    if (task, index) in dev:
        counts["dev_samples"] = len(chosen)
        chosen = []
    majority = None
    if label == "majority" and chosen:
        votes = Counter(records[k]["prediction"] for k in chosen if records[k]["prediction"] is not None)
        top, n_votes = votes.most_common(1)[0] if votes else (None, 0)  # a tie: the answer reached first
        majority = top if n_votes >= min_votes else None
        if majority is not None:
            counts["labeled_questions"] = 1
            gold_equal = next(records[k]["correct"] for k in chosen if records[k]["prediction"] == majority)
            if gold_equal is not None:  # the question has gold
                counts["labeled_with_gold"], counts["label_equals_gold"] = 1, int(gold_equal)
    for k in chosen:
        r = records[k]
        counts["samples"] += 1
        if label == "majority" and majority is None:
            counts["dropped_unlabeled"] += 1  # fewer than min_votes samples agree
            continue
        if r["blank"]:
            counts["dropped_no_rationale"] += 1
            continue
        agrees = r["correct"] if label == "gold" else r["prediction"] == majority
        if not agrees and not (keep_all and r["prediction"] is not None):
            counts["dropped_no_answer" if keep_all else "dropped_incorrect"] += 1
            continue
        if dedupe and r["text"] in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(r["text"])
        if r["too_long"]:  # a record is kept whole or not at all
            counts["dropped_too_long"] += 1
            continue
        counts["kept"] += 1
        if not agrees:
            counts["kept_off_label"] += 1  # filter all: a sample that reached another answer, with its own
        keep += [r["rows"][p] for p in sorted(r["rows"])]
        longest = max(longest, lengths[r["rows"][asked]])
    cpu = time.process_time() - started
    if "cpu_s" in group.column_names:  # the formatter's, when it ran in this pipeline (vanilla)
        cpu += pc.sum(group["cpu_s"]).as_py() or 0.0
    return _question_rows(group, keep, {"task": task, "train": (task, index) in train, "counts": dict(counts),
                                        "completion_length_max": longest, "cpu_s": cpu})


def label_stats(task_stats: dict, min_votes: int) -> dict:
    """Majority labels of one task's training questions: how many got one, and how often it equals gold."""
    labeled, with_gold, equal = (task_stats.pop(k, 0) for k in ("labeled_questions", "labeled_with_gold",
                                                               "label_equals_gold"))
    rate = equal / with_gold if with_gold else None
    return {"min_votes": min_votes, "questions": task_stats["questions"], "labeled": labeled,
            "labeled_with_gold": with_gold, "label_equals_gold": equal, "label_equals_gold_rate": rate,
            "label_equals_gold_ci": list(wilson(rate, with_gold)) if with_gold else None}


def _question_rows(group: pa.Table, keep: list[int], counts: dict | None) -> pa.Table:
    pairs = group.take(pa.array(keep, pa.int64())).select(PAIRS.names).cast(PAIRS)
    pairs = pairs.append_column("counts", pa.nulls(len(keep), pa.string()))
    if counts is None:
        return pairs
    row = pa.table({**{c: pa.nulls(1, PAIRS.field(c).type) for c in PAIRS.names}, "counts": [json.dumps(counts)]})
    return pa.concat_tables([pairs, row])


def curate(cfg: CurateConfig) -> dict:
    """Write OUTPUT_DIR/train/*.parquet (task, index, sample_index, prompt, completion), dev.jsonl, stats.json."""
    import ray  # heavy: Ray Data formats, selects and writes
    from ray.data.expressions import col

    init_ray(cfg.ray_address)
    cpu_started = cpu_seconds(children=False)
    qs, dev, train_q = split_questions(cfg)
    formatted_now, worker_cpu = 0, 0.0
    method = get_method(cfg.method)
    check_labels(cfg, qs, train_q)
    select = {"dev": frozenset(dev), "train": frozenset(train_q), "adaptive": None, "budget": None,
              "num_samples": None, "dedupe": cfg.dedupe, "label": cfg.label, "min_votes": cfg.min_votes,
              "keep_all": cfg.filter == "all",
              "asked": method.tasks.index(method.ask) if method.ask in method.tasks else 0}
    if not method.uses_rationales:  # the gold answers of the same questions
        ds = ray.data.from_items([{"key": f"{s.task}/{s.index}", "task": s.task, "index": s.index, "sample_index": 0,
                                   "correct": True, "prediction": s.answer, "question": s.question, "gold": s.answer}
                                  for s in qs if (s.task, s.index) in train_q])
        ds = ds.map_batches(Formatter, fn_constructor_kwargs=_formatter_kwargs(cfg),
                            compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy", batch_size=256)
    else:
        tid = teacher_id(cfg.teacher)
        shards = RecordStore(records_dir(cfg)).shards(tid)  # other teachers' records are not this run's to format
        formatted_now, worker_cpu = _format_shards(cfg, shards)
        parts = [(formatted_dir(cfg) / s.name).resolve() for s in shards]
        # Read as one block per part (Ray Data's default here), the thousands of parts of 1M records cost the sort
        # behind groupby 1 GB of the driver's memory and 1.8x the time (scale.py); a block per PART_BYTES of parts.
        blocks = max(2 * int(ray.cluster_resources().get("CPU", 1)),
                     math.ceil(sum(p.stat().st_size for p in parts) / PART_BYTES))
        ds = ray.data.read_parquet([str(p) for p in parts], override_num_blocks=blocks)
        ds = ds.filter(expr=col("teacher_id") == tid)  # a shard of an older fcot may hold several teachers
        select.update(adaptive=cfg.teacher.sampling.adaptive, budget=cfg.teacher.sampling.budget,
                      num_samples=cfg.num_samples)
    # A question's samples meet in one group; the sort-based shuffle (fcot.ray_utils.init_ray) emits the groups in
    # (task, index) order, so the curated set comes out sorted by question, then sample, then part.
    selected = ds.groupby(["task", "index"]).map_groups(select_question, fn_kwargs=select,
                                                        batch_format="pyarrow").materialize()
    stats = {t: Counter() for t in cfg.tasks}
    spread = {t: Counter() for t in cfg.tasks}  # kept records -> train questions
    longest = {t: 0 for t in cfg.tasks}
    counts = selected.filter(expr=col("counts").is_not_null()).select_columns(["counts"])
    for batch in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in map(json.loads, batch.column("counts").to_pylist()):
            stats[row["task"]].update(row["counts"])
            spread[row["task"]][row["counts"].get("kept", 0)] += row["train"]
            longest[row["task"]] = max(longest[row["task"]], row["completion_length_max"])
            worker_cpu += row["cpu_s"]
    for task in cfg.tasks:
        n_train = sum(t == task for t, _ in train_q)
        spread[task][0] += n_train - sum(spread[task].values())  # questions with no record at all
        stats[task] = {k: v for k, v in stats[task].items() if v}
        stats[task].update(questions=n_train, dev_questions=sum(t == task for t, _ in dev),
                           questions_without_sample=spread[task][0],
                           kept_per_question={k: v for k, v in sorted(spread[task].items()) if v},
                           completion_length_max=longest[task])
        if cfg.label == "majority":
            stats[task]["labels"] = label_stats(stats[task], cfg.min_votes)
    kept = sum(st.get("kept", 0) for st in stats.values())
    if not kept:
        raise FcotError(f"curation kept no sample for {', '.join(cfg.tasks)} (see the stats: {json.dumps(stats)})")

    out = Path(cfg.output_dir)
    tmp = out / ".train.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pairs = selected.filter(expr=col("counts").is_null()).drop_columns(["counts"])
    pairs.write_parquet(str(tmp.resolve()), min_rows_per_file=ROWS_PER_FILE)
    n_pairs = _name_in_order(tmp)
    shutil.rmtree(out / "train", ignore_errors=True)
    os.replace(tmp, out / "train")  # the curated set appears whole or not at all
    dev_rows = [s.to_dict() for s in qs if (s.task, s.index) in dev]
    atomic_write_jsonl(out / "dev.jsonl", dev_rows)
    summary = {"method": cfg.method, "num_samples": cfg.num_samples, "train_questions": cfg.train_questions,
               "teacher_id": teacher_id(cfg.teacher) if cfg.teacher else None,
               "kept": kept, "pairs": n_pairs,
               "max_length": cfg.max_length,  # training follows it (train.max_length)
               "completion_length_max": max(longest.values()),
               "shards_formatted_at_curation": formatted_now, "train_dir": str(out / "train"),
               "cpu_s": round(worker_cpu + cpu_seconds(children=False) - cpu_started, 1),
               "dev": str(out / "dev.jsonl"), "dev_questions": len(dev),
               "tasks": stats}
    atomic_write_json(out / "stats.json", summary)
    return summary


def _name_in_order(folder: Path) -> int:
    """Name Ray Data's files part-00000... in the order of their first rows (each file holds a range of questions,
    in order: a sort's partitions), so the curated set reads in one order, which training's seeded shuffle starts
    from; returns the row count."""
    first, rows = {}, 0
    for f in folder.glob("*.parquet"):
        meta = pq.ParquetFile(f)
        if meta.metadata.num_rows == 0:
            f.unlink()
            continue
        rows += meta.metadata.num_rows
        head = meta.read_row_group(0, columns=["task", "index", "sample_index", "part"]).slice(0, 1).to_pylist()[0]
        first[f] = tuple(head.values())
    for n, f in enumerate(sorted(first, key=first.get)):
        f.rename(folder / f"part-{n:05d}.parquet")
    return rows
