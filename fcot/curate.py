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
longer than the student's max length (fcot.contracts.curated.pair_length). Vanilla pairs come from the gold answers of
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
        shards left, in Ray Data tasks that write the parts themselves)
    -> read_parquet(the parts of this teacher's shards) -> sort(task, index) -> map_batches(select_block), a
        block at a time: a question's samples meet in one block, the rules above apply to the block's columns,
        and it emits its kept pairs and one row of counts by task
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from fcot.config import Config, ModelRef, PathStr, RayAddress, read_yaml
from fcot.contracts.curated import ROW, TEACHER_LOGPROBS, pair_length, row_schema
from fcot.contracts.records import RecordStore
from fcot.contracts.teacher import TeachConfig, rationale_digest, samples_used, teacher_id
from fcot.contracts.teacher import questions as teacher_questions
from fcot.errors import FcotError
from fcot.io import atomic_file, atomic_write_json, atomic_write_jsonl
from fcot.methods import ChatTemplate, chat_completion, chat_prompt, get_method, method_names, uses_chat
from fcot.models import resolve_model
from fcot.progress import Progress
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.resources import Demand
from fcot.stats import wilson
from fcot.tasks import DataDir, TaskNames, UserTask, load_split, require_gold, split_user_tasks

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
    # The teacher's stored top-k (teacher.sampling.logprobs) carried with each pair, for KD students; run: kd's
    teacher_logprobs: bool = False
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
        if self.teacher_logprobs and not (get_method(self.method).uses_rationales and self.teacher.sampling.logprobs):
            raise FcotError(f"key 'curate.teacher_logprobs': method {self.method} with a teacher that stores its top-k "
                            "logprobs (teacher.sampling.logprobs) carries them; this one has none to carry")
        if self.min_votes > 1 and self.label != "majority":
            raise ValueError("min_votes applies to label majority")
        if isinstance(self.dev_fraction, float) and not 0 <= self.dev_fraction < 1:
            raise ValueError("dev_fraction must be in [0, 1) or auto")
        q = self.train_questions
        if q is not None and (q <= 0 or (q >= 1 and q != int(q))):
            raise ValueError("train_questions must be a count >= 1 or a fraction in (0, 1)")
        return self

    def demands(self, prefix: str = "") -> list[Demand]:
        return [Demand(f"{prefix}method", "curation formatter tasks", 1, {"CPU": 1.0})]


class Formatter:
    """Formats and measures a method's pairs with the student's tokenizer (one per Ray worker process: `formatter`):
    one row per (record, task of the method), `part` the task's position. Each row also carries what selection compares
    without the text: hashes of the record's stripped rationale (adaptive rounds count distinct ones) and of the
    text dedupe compares (the rationale, else the first pair's completion)."""

    def __init__(self, method: str, student: str, max_length: int, chat_template: ChatTemplate = False):
        from transformers import AutoConfig, AutoTokenizer  # heavy: in the Ray Data task only

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
        prompt_length = dict(zip(unique, self.token_counts(unique)))
        c_lengths = self.token_counts(completions)
        lengths = [pair_length(prompt_length[p], c, self.encoder_decoder) for p, c in zip(prompts, c_lengths)]
        first = {i: completions[j] for j, (i, part) in enumerate(rows) if part == 0}
        rationale_hash = [rationale_digest(r) for r in rationales]
        text_hash = [rationale_digest(r or first[i]) for i, r in enumerate(rationales)]
        out = {name: [batch[name][i] for i, _ in rows] for name in batch}
        out.update(part=[part for _, part in rows], weight_key=[keys[part] or "" for _, part in rows],
                   prompt=prompts, completion=completions, length=lengths,
                   completion_length=[c + 1 for c in c_lengths],  # + the EOS the trainer appends
                   too_long=[length > self.max_length for length in lengths],
                   rationale_hash=[rationale_hash[i] for i, _ in rows], text_hash=[text_hash[i] for i, _ in rows],
                   no_rationale=[blank[i] for i, _ in rows])
        out["cpu_s"] = [self.usage.take()["cpu_s"] / len(rows)] * len(rows)  # this batch's CPU time, spread out
        return out

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's length in tokens, without special tokens."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]


RECORD_COLUMNS = ["key", "teacher_id", "task", "index", "sample_index", "correct", "prediction", "question", "gold",
                  "rationale"]
FORMATTED_COLUMNS = ["key", "teacher_id", "task", "index", "sample_index", "correct", "prediction", "rationale_hash",
                     "text_hash", "part", "weight_key", "prompt", "completion", "length", "completion_length",
                     "too_long", "no_rationale"]
SELECTED_COLUMNS = ROW.names + ["correct", "prediction", "too_long", "no_rationale"]  # select_block's input


def _formatter_kwargs(cfg: CurateConfig) -> dict:
    return {"method": cfg.method, "student": cfg.student, "max_length": cfg.max_length,
            "chat_template": cfg.chat_template}


def formatted_dir(cfg: CurateConfig) -> Path:
    """Formatted teacher shards for one formatting (method, student, max length, top-k carried or not): a part per
    teacher shard."""
    what = [6, cfg.method, cfg.student, cfg.max_length, cfg.chat_template, *["logprobs"] * cfg.teacher_logprobs]
    key = hashlib.sha256(json.dumps(what).encode())
    key = key.hexdigest()[:12]
    return Path(cfg.output_dir) / "formatted" / key


def records_dir(cfg: CurateConfig) -> Path:
    path = Path(cfg.teacher.output_dir) / "records"
    if not path.is_dir() or not list(path.glob("*.parquet")):
        raise FcotError(f"teacher.output_dir {cfg.teacher.output_dir}: no teacher records (records/*.parquet)")
    return path


def format_shard(formatter: Formatter, shard: Path, out: Path, teacher_logprobs: bool = False) -> float:
    """Format one teacher shard into its part, OUT/SHARD_NAME (written whole); returns the formatter's CPU-s. With
    `teacher_logprobs`, each pair carries its record's stored top-k (as Arrow, never as Python objects)."""
    table = pq.read_table(shard, columns=RECORD_COLUMNS + ["logprobs"] * teacher_logprobs)
    columns = formatter({c: table.column(c).to_pylist() for c in RECORD_COLUMNS})
    part = pa.table({c: columns[c] for c in FORMATTED_COLUMNS})
    if teacher_logprobs:  # the formatter's rows: each record's pairs, one per task of the method, in order
        rows = np.repeat(np.arange(table.num_rows), len(formatter.method.tasks))
        part = part.append_column(TEACHER_LOGPROBS, table.column("logprobs").take(rows))
    with atomic_file(out / shard.name) as f:
        pq.write_table(part, f)
    return float(sum(columns["cpu_s"]))


_FORMATTERS: dict[str, Formatter] = {}


def formatter(**formatter_kwargs) -> Formatter:
    """This process's Formatter for one formatting. A Ray worker runs many tasks: the next batch, shard, method or
    curation of the same job finds the tokenizer loaded (transformers' import alone takes ~5 s of a core)."""
    key = json.dumps(formatter_kwargs, sort_keys=True)
    if key in _FORMATTERS:
        _FORMATTERS[key].usage.take()  # count from here, not the other tasks this worker ran since its last batch
    else:
        _FORMATTERS[key] = Formatter(**formatter_kwargs)  # the import and load count, in its first batch
    return _FORMATTERS[key]


def format_batch(batch: dict, **formatter_kwargs) -> dict:
    """A Ray Data task: a batch of records (vanilla's gold answers) formatted."""
    return formatter(**formatter_kwargs)(batch)


def format_shards(batch: dict, out: str, teacher_logprobs: bool, **formatter_kwargs) -> dict:
    """A Ray Data task: whole teacher shards formatted, each into its part: no formatted row reaches the driver,
    and a killed curation keeps the parts it finished."""
    f = formatter(**formatter_kwargs)
    return {"shard": batch["shard"],
            "cpu_s": [format_shard(f, Path(s), Path(out), teacher_logprobs) for s in batch["shard"]]}


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
            format_shard(self.formatter, shard, self.out, self.cfg.teacher_logprobs)
            self.formatted += 1
        except Exception as e:  # noqa: BLE001 - never stop the teacher; curation formats the shard later
            self.failed = True
            print(f"[curate] streaming stopped at {shard.name} ({e}); curation will format the rest", file=sys.stderr)


def _format_shards(cfg: CurateConfig, shards: list[Path]) -> tuple[int, float]:
    """Format, on Ray Data, the teacher shards that have no formatted part yet; returns how many, and the CPU
    seconds the formatter tasks spent."""
    import ray  # heavy: only when there is something to format

    out = formatted_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    missing = [s for s in shards if not (out / s.name).exists()]
    if not missing:
        return 0, 0.0
    tasks = max(1, min(len(missing), int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items([{"shard": str(s.resolve())} for s in missing])
    kwargs = {"out": str(out.resolve()), "teacher_logprobs": cfg.teacher_logprobs, **_formatter_kwargs(cfg)}
    ds = ds.map_batches(format_shards, fn_kwargs=kwargs, concurrency=tasks, batch_size=1, num_cpus=1)
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


def select_block(block: pa.Table, *, dev: frozenset, train: frozenset, adaptive, budget: int | None,
                 num_samples: int | None, dedupe: bool, asked: int, label: str = "gold", min_votes: int = 1,
                 keep_all: bool = False) -> pa.Table:
    """A block of whole questions' formatted rows (the sort puts each question's rows in one block) -> the pairs
    curation keeps, in (task, index, sample, part) order, and one row of counts by task (the `counts` column,
    JSON; null on pairs). See the module doc for the rules; they are applied to whole columns (numpy), per record
    (the first row of a sample) and per question (a run of records), in the order of the module doc."""
    started = time.process_time()
    if block.num_rows == 0:
        return _pairs(block, np.zeros(0, bool))
    keys = ["task", "index", "sample_index", "part"]
    order = pc.sort_indices(block, [(k, "ascending") for k in keys]).to_numpy()
    tasks, task_code = _codes(block["task"])
    t, idx, sample, part = (a[order] for a in (task_code, *(block[k].to_numpy() for k in keys[1:])))
    new = [np.r_[True, a[1:] != a[:-1]] for a in (t, idx, sample, part)]
    new_q = new[0] | new[1]
    new_rec = new_q | new[2]
    unique = new_rec | new[3]  # a record stored twice (shards of an older fcot) counts once
    block, t, idx, sample, new_q, new_rec = (a.take(order[unique]) if isinstance(a, pa.Table) else a[unique]
                                             for a in (block, t, idx, sample, new_q, new_rec))
    q_of_row, rec_of_row = np.cumsum(new_q) - 1, np.cumsum(new_rec) - 1
    rec_start = np.flatnonzero(new_rec)
    rec_q, rec_sample = q_of_row[rec_start], sample[rec_start]
    q_start = np.flatnonzero(new_q)
    q_key = list(zip((tasks[i] for i in t[q_start]), idx[q_start].tolist()))
    in_dev, in_train = (np.array([k in s for k in q_key], bool) for s in (dev, train))
    n_q = len(q_start)

    def per_record(name):
        return block[name].take(pa.array(rec_start))

    correct = per_record("correct").cast(pa.bool_())  # null where the question has no gold
    _, pred_code = _codes(per_record("prediction"))
    has_pred, correct_true = pred_code >= 0, correct.fill_null(False).to_numpy()
    too_long = np.logical_or.reduceat(block["too_long"].to_numpy(), rec_start)
    blank = per_record("no_rationale").to_numpy()
    spent = _spent(rec_q, rec_sample, n_q, correct_true, per_record if adaptive else None, adaptive, budget)
    chosen = (rec_sample < spent) & (True if num_samples is None else rec_sample < num_samples)
    dev_samples = chosen & in_dev[rec_q]
    chosen &= in_train[rec_q] & ~in_dev[rec_q]
    counts = {"samples": chosen, "dev_samples": dev_samples}
    agrees, rest, q_counts = correct_true, chosen, {}
    if label == "majority":
        labeled, agrees, q_counts = _majority(rec_q, n_q, chosen, pred_code, correct, min_votes)
        counts["dropped_unlabeled"] = chosen & ~labeled
        rest = chosen & labeled
    counts["dropped_no_rationale"] = rest & blank
    rest = rest & ~blank
    miss = rest & ~agrees & ~(keep_all & has_pred)
    counts["dropped_no_answer" if keep_all else "dropped_incorrect"] = miss
    rest &= ~miss
    if dedupe:  # a question's first record of each text, of those that reached here
        _, text_code = _codes(per_record("text_hash"))
        reached = np.flatnonzero(rest)
        _, first = np.unique(rec_q[reached] * (text_code.max() + 1) + text_code[reached], return_index=True)
        counts["dropped_duplicate"] = rest.copy()
        counts["dropped_duplicate"][reached[first]] = False
        rest &= ~counts["dropped_duplicate"]
    counts["dropped_too_long"] = rest & too_long  # a record is kept whole or not at all
    kept = rest & ~too_long
    counts.update(kept=kept, kept_off_label=kept & ~agrees)  # filter all: a sample that reached another answer
    kept_rows = kept[rec_of_row]
    asked_lengths = np.where(kept_rows & (block["part"].to_numpy() == asked), block["completion_length"].to_numpy(), 0)
    kept_per_q = np.bincount(rec_q, weights=kept, minlength=n_q).astype(int)
    by_task = {}
    for code, task in enumerate(tasks):
        q_mask, rec_mask = t[q_start] == code, t[rec_start] == code
        if (q_mask & (in_dev | in_train)).any():
            by_task[task] = _task_counts(counts, rec_mask, q_counts, q_mask, kept_per_q[q_mask & in_train & ~in_dev],
                                         asked_lengths[t == code])
    cpu = time.process_time() - started
    if "cpu_s" in block.column_names:  # the formatter's, when it ran in this pipeline (vanilla)
        cpu += pc.sum(block["cpu_s"]).as_py() or 0.0
    return _pairs(block, kept_rows, {"tasks": by_task, "cpu_s": cpu})


def _spent(rec_q: np.ndarray, rec_sample: np.ndarray, n_q: int, correct: np.ndarray, per_record, adaptive,
           budget: int | None):
    """Per record, how many samples its question's teacher spent: vanilla's one record, a fixed D's budget, or the
    adaptive teacher's rule replayed on the question's records (`per_record`: a column at each record)."""
    if budget is None:
        return np.bincount(rec_q, minlength=n_q)[rec_q]  # vanilla: the question's one record
    if adaptive is None:
        return budget
    rationale, bounds = per_record("rationale_hash").to_pylist(), np.searchsorted(rec_q, np.arange(n_q + 1))
    spent = np.zeros(len(rec_q), np.int64)
    for a, b in zip(bounds[:-1], bounds[1:]):
        records = {int(rec_sample[r]): {"rationale": rationale[r], "correct": correct[r]} for r in range(a, b)}
        spent[a:b] = samples_used(records, adaptive, budget)
    return spent


def _task_counts(counts: dict, rec_mask: np.ndarray, q_counts: dict, q_mask: np.ndarray, kept_per_q: np.ndarray,
                 asked_lengths: np.ndarray) -> dict:
    """One task's part of a block's counts: the rules' record counts, the questions' label counts, how many records
    each training question kept, and the longest completion of the asked task kept."""
    c = {k: int(v[rec_mask].sum()) for k, v in counts.items()}
    c.update({k: int((v & q_mask).sum()) for k, v in q_counts.items()})
    spread = Counter(kept_per_q.tolist())
    return {"counts": {k: v for k, v in c.items() if v}, "kept_per_question": {str(k): v for k, v in spread.items()},
            "completion_length_max": int(asked_lengths.max(initial=0))}


def _majority(rec_q: np.ndarray, n_q: int, chosen: np.ndarray, pred_code: np.ndarray, correct: pa.ChunkedArray,
              min_votes: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Label majority over a block's records (`rec_q` their questions, in sample order): a question's label is the
    answer most of its chosen samples reach (a tie: the one reached first), given when at least min_votes do.
    Returns per record whether its question is labeled and whether it reaches the label, and per question the
    counts of label_stats (labeled; its label has a gold answer to compare; it equals gold)."""
    voter = np.flatnonzero(chosen & (pred_code >= 0))
    _, first, votes = np.unique(rec_q[voter] * (pred_code.max() + 1) + pred_code[voter], return_index=True,
                                return_counts=True)
    first = voter[first]  # the first record of each (question, answer)
    top = np.lexsort((first, -votes, rec_q[first]))  # by question; the most votes, then the one reached first
    top = top[np.r_[True, np.diff(rec_q[first[top]]) != 0]]
    label_rec = np.full(n_q, -1)  # per question, the first record that reaches its label
    label_rec[rec_q[first[top]]] = np.where(votes[top] >= min_votes, first[top], -1)
    labeled_q = label_rec >= 0
    gold = correct.take(pa.array(label_rec[labeled_q]))  # null where the question has no gold
    with_gold, equal = np.zeros(n_q, bool), np.zeros(n_q, bool)
    with_gold[labeled_q], equal[labeled_q] = gold.is_valid().to_numpy(), gold.fill_null(False).to_numpy()
    labeled = labeled_q[rec_q]
    agrees = labeled & (pred_code >= 0) & (pred_code == pred_code[label_rec[rec_q]])
    return labeled, agrees, {"labeled_questions": labeled_q, "labeled_with_gold": with_gold,
                             "label_equals_gold": equal}


def _codes(column: pa.ChunkedArray) -> tuple[list, np.ndarray]:
    """A column's distinct values and each row's code into them (-1 for null)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    return encoded.dictionary.to_pylist(), encoded.indices.fill_null(-1).to_numpy()


def _pairs(block: pa.Table, keep: np.ndarray, counts: dict | None = None) -> pa.Table:
    schema = row_schema(TEACHER_LOGPROBS in block.column_names)
    pairs = block.filter(pa.array(keep, pa.bool_())).select(schema.names).cast(schema)
    pairs = pairs.append_column("counts", pa.nulls(len(pairs), pa.string()))
    if counts is None:
        return pairs
    row = pa.table({**{c: pa.nulls(1, schema.field(c).type) for c in schema.names}, "counts": [json.dumps(counts)]})
    return pa.concat_tables([pairs, row])


def label_stats(task_stats: dict, min_votes: int) -> dict:
    """Majority labels of one task's training questions: how many got one, and how often it equals gold."""
    labeled, with_gold, equal = (task_stats.pop(k, 0) for k in ("labeled_questions", "labeled_with_gold",
                                                               "label_equals_gold"))
    rate = equal / with_gold if with_gold else None
    return {"min_votes": min_votes, "questions": task_stats["questions"], "labeled": labeled,
            "labeled_with_gold": with_gold, "label_equals_gold": equal, "label_equals_gold_rate": rate,
            "label_equals_gold_ci": list(wilson(rate, with_gold)) if with_gold else None}


def _input(cfg: CurateConfig, train_q: set, qs: list, select: dict):
    """What selection reads, on Ray Data: the gold answers of the training questions formatted (vanilla), or the
    formatted parts of this teacher's shards (those not formatted yet, formatted first). Returns (the dataset,
    shards formatted now, the formatter tasks' CPU seconds); `select` gains the teacher's sampling rules."""
    import ray  # heavy: Ray Data formats, selects and writes
    from ray.data.expressions import col

    if not get_method(cfg.method).uses_rationales:  # the gold answers of the same questions
        ds = ray.data.from_items([{"key": f"{s.task}/{s.index}", "task": s.task, "index": s.index, "sample_index": 0,
                                   "correct": True, "prediction": s.answer, "question": s.question, "gold": s.answer}
                                  for s in qs if (s.task, s.index) in train_q])
        ds = ds.map_batches(format_batch, fn_kwargs=_formatter_kwargs(cfg), num_cpus=1, batch_format="numpy",
                            batch_size=256)
        return ds, 0, 0.0
    tid = teacher_id(cfg.teacher)
    shards = RecordStore(records_dir(cfg)).shards(tid)  # other teachers' records are not this run's to format
    formatted_now, worker_cpu = _format_shards(cfg, shards)
    parts = [(formatted_dir(cfg) / s.name).resolve() for s in shards]
    # Read as one block per part (Ray Data's default here), the thousands of parts of 1M records cost the sort
    # behind groupby 1 GB of the driver's memory and 1.8x the time (scale.py); a block per PART_BYTES of parts.
    blocks = max(2 * int(ray.cluster_resources().get("CPU", 1)),
                 math.ceil(sum(p.stat().st_size for p in parts) / PART_BYTES))
    # Only what selection reads goes through the sort: the hashes when a rule compares them, never the key.
    columns = ["teacher_id", *SELECTED_COLUMNS, *["rationale_hash"] * bool(cfg.teacher.sampling.adaptive),
               *["text_hash"] * cfg.dedupe, *[TEACHER_LOGPROBS] * cfg.teacher_logprobs]
    ds = ray.data.read_parquet([str(p) for p in parts], columns=columns, override_num_blocks=blocks)
    ds = ds.filter(expr=col("teacher_id") == tid).drop_columns(["teacher_id"])  # an older shard: many teachers
    select.update(adaptive=cfg.teacher.sampling.adaptive, budget=cfg.teacher.sampling.budget,
                  num_samples=cfg.num_samples)
    return ds, formatted_now, worker_cpu


def _task_stats(cfg: CurateConfig, selected, train_q: set, dev: set) -> tuple[dict, dict, float]:
    """The blocks' counts summed by task (stats.json's `tasks`), the longest asked completion kept per task, and the
    selection's CPU seconds."""
    from ray.data.expressions import col  # heavy: with Ray Data

    stats = {t: Counter() for t in cfg.tasks}
    spread = {t: Counter() for t in cfg.tasks}  # kept records -> train questions
    longest, cpu = {t: 0 for t in cfg.tasks}, 0.0
    counts = selected.filter(expr=col("counts").is_not_null()).select_columns(["counts"])
    for batch in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in map(json.loads, batch.column("counts").to_pylist()):
            for task, got in row["tasks"].items():
                stats[task].update(got["counts"])
                spread[task].update({int(k): n for k, n in got["kept_per_question"].items()})
                longest[task] = max(longest[task], got["completion_length_max"])
            cpu += row["cpu_s"]
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
    return stats, longest, cpu


def curate(cfg: CurateConfig) -> dict:
    """Write OUTPUT_DIR/train/*.parquet (task, index, sample_index, prompt, completion), dev.jsonl,
    train_questions.jsonl, stats.json."""
    from ray.data.expressions import col  # heavy: Ray Data selects and writes

    init_ray(cfg.ray_address)
    cpu_started = cpu_seconds(children=False)
    qs, dev, train_q = split_questions(cfg)
    method = get_method(cfg.method)
    check_labels(cfg, qs, train_q)
    select = {"dev": frozenset(dev), "train": frozenset(train_q), "adaptive": None, "budget": None,
              "num_samples": None, "dedupe": cfg.dedupe, "label": cfg.label, "min_votes": cfg.min_votes,
              "keep_all": cfg.filter == "all",
              "asked": method.tasks.index(method.ask) if method.ask in method.tasks else 0}
    ds, formatted_now, worker_cpu = _input(cfg, train_q, qs, select)
    # A question's samples meet in one block: the sort partitions by range of (task, index), and emits its blocks
    # in that order, so the curated set comes out sorted by question, then sample, then part. A whole block per
    # call (batch_size None), as Ray Data's own map_groups does, with the rules applied to its columns at once.
    selected = ds.sort(["task", "index"]).map_batches(select_block, fn_kwargs=select, batch_size=None,
                                                      batch_format="pyarrow").materialize()
    stats, longest, selection_cpu = _task_stats(cfg, selected, train_q, dev)
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
    # Every training question, kept or not: what an on-policy student samples on (fcot.rollout).
    atomic_write_jsonl(out / "train_questions.jsonl", [s.to_dict() for s in qs if (s.task, s.index) in train_q])
    summary = {"method": cfg.method, "num_samples": cfg.num_samples, "train_questions": cfg.train_questions,
               "teacher_id": teacher_id(cfg.teacher) if cfg.teacher else None,
               "kept": kept, "pairs": n_pairs,
               "max_length": cfg.max_length,  # training follows it (train.max_length)
               "completion_length_max": max(longest.values()),
               "shards_formatted_at_curation": formatted_now, "train_dir": str(out / "train"),
               "cpu_s": round(worker_cpu + selection_cpu + cpu_seconds(children=False) - cpu_started, 1),
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
