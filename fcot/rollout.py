"""A round of on-policy distillation's data on Ray: the student samples its own rationales, the teacher grades
every token of them.

Rule: a sample or a grade is made once. A sample's key is sha256(the round student's content hash, task, index,
sample index, seed, temperature, max_new_tokens, method); a grade's is the sample's key under the teacher's id
(a hash of its model's content, engine and dtype). The replica that makes a batch writes it as one parquet shard,
atomically, named STUDENT-HASH (samples/) or TEACHER-HASH (grades/), HASH of the keys it holds, so a killed round
resumes with what is missing only, a retried batch rewrites the same file, and a changed student or teacher
never reads another's records.

    driver: the training questions (QUESTIONS: JSONL of task, index, question, answer) x samples_per_question
      -> minus the keys in samples/ -> Ray Data: an actor pool of student replicas (the evaluation engine with the
         round's student), each sampling its batch with per-sample seeds in the student's test-time format, the
         student's own logprob of each sampled token (a forward pass of its weights), and the rationale's tokens:
         those before the answer's marker (the format's `prefix`; the marker, the answer and the stop text are
         the student's format, which the teacher does not write)
      -> minus the grades of this teacher in grades/ -> an actor pool of teacher replicas: each rationale's tokens
         graded under the teacher's zero-shot-CoT prompt (fcot.engines.Grade: the teacher's logprob of each, and
         its top-k when asked)
      -> OUTPUT_DIR/train/: the round's training rows (fcot.contracts.curated: the student's prompt, its sample as
         the completion, TEACHER_LOGPROBS: the graded tokens, at each [the sampled token, the teacher's top-k]
         with [the teacher's logprob of it, theirs]), and stats.json: samples, their accuracy, graded tokens, the
         mean per-token KL(student || teacher) on them, tokens spent.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from fcot.config import Config, PathStr, RayAddress
from fcot.contracts.curated import TEACHER_LOGPROBS, pair_length, row_schema
from fcot.contracts.teacher import sample_seed
from fcot.engines import EngineConfig, Grade, Request, start_replica
from fcot.errors import FcotError
from fcot.io import atomic_write_bytes, atomic_write_json, iter_jsonl
from fcot.methods import asked, method_names
from fcot.models import fingerprint
from fcot.progress import Progress
from fcot.prompts import zero_shot_cot_step1
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.resources import Demand
from fcot.scoring import format_prediction, score
from fcot.tasks import TaskNames, UserTask, get_task, split_user_tasks

SAMPLES = pa.schema([
    ("key", pa.string()), ("student", pa.string()), ("task", pa.string()), ("index", pa.int64()),
    ("sample_index", pa.int32()), ("seed", pa.int64()), ("question", pa.string()), ("gold", pa.string()),
    ("prompt", pa.string()), ("completion", pa.string()), ("finish_reason", pa.string()),
    ("prediction", pa.string()), ("correct", pa.bool_()), ("prompt_tokens", pa.int32()),
    ("tokens", pa.list_(pa.int32())), ("student_logprobs", pa.list_(pa.float32())),
    ("rationale_tokens", pa.int32()),  # the first this many of `tokens` are the rationale, which the teacher grades
    ("created_at", pa.float64()),
])
GRADES = pa.schema([
    ("key", pa.string()), ("teacher_id", pa.string()), ("prompt_tokens", pa.int32()),
    ("teacher_logprobs", pa.list_(pa.float32())),  # of each rationale token
    ("top_ids", pa.list_(pa.list_(pa.int32()))), ("top_logprobs", pa.list_(pa.list_(pa.float16()))),
    ("created_at", pa.float64()),
])


class RolloutConfig(Config):
    questions: PathStr  # JSONL: task, index, question[, answer] (curation's train_questions.jsonl)
    student: EngineConfig  # student.model: the round's student (hf or vllm)
    teacher: EngineConfig  # grades the student's tokens (hf or vllm); the student's tokenizer
    method: str = "fine_tune_cot"  # the student's test-time format (fcot.methods), in which it samples
    tasks: TaskNames
    user_tasks: list[UserTask] = []
    round: int = Field(1, ge=1)
    samples_per_question: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(128, ge=1)
    top_k: int = Field(0, ge=0)  # the teacher's top-k at each graded token as well (GKD's JSD learns from them)
    max_length: int = Field(512, ge=8)  # a row longer than this (prompt + sample + EOS) is dropped, as curation does
    seed: int = 0
    output_dir: PathStr = "runs/rollout"
    ray_address: RayAddress = None

    tasks_and_definitions = model_validator(mode="before")(split_user_tasks)

    @model_validator(mode="after")
    def _engines(self):
        method_names([self.method])
        for key in ("student", "teacher"):
            if getattr(self, key).kind not in ("hf", "vllm"):
                raise ValueError(f"{key}.kind {getattr(self, key).kind}: a rollout's {key} runs as Ray replicas of "
                                 "a model: hf or vllm")
        return self

    def demands(self, student: str = "student.", teacher: str = "teacher.") -> list[Demand]:
        """The two pools, one after the other (the student's replicas are gone when the teacher's start); the
        arguments are the keys' prefixes in the config that set them."""
        return [*self.student.demands(student, "student replicas sampling"),
                *self.teacher.demands(teacher, "teacher replicas grading")]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def teacher_id(engine: EngineConfig) -> str:
    """The grades' teacher: its model's content (or name), engine and dtype (a grade in bf16 is not fp32's)."""
    return _key(engine.kind, fingerprint(engine.model) or engine.model, engine.dtype)[:16]


def _write(folder: Path, owner: str, table: pa.Table) -> Path:
    """A shard, atomically, named OWNER-HASH by the hash of its keys (a retried batch rewrites the same file)."""
    digest = hashlib.sha256("\n".join(sorted(table.column("key").to_pylist())).encode()).hexdigest()[:24]
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return atomic_write_bytes(folder / f"{owner}-{digest}.parquet", buf.getvalue())


def _read(folder: Path, owner: str, schema: pa.Schema, keys: set[str]) -> pa.Table:
    """OWNER's records in `folder` whose keys are in `keys`, one row per key."""
    tables = [pq.read_table(s, schema=schema) for s in sorted(folder.glob(f"{owner}-*.parquet"))]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    seen, rows = set(), []
    for i, k in enumerate(table.column("key").to_pylist()):
        if k in keys and k not in seen:
            seen.add(k)
            rows.append(i)
    return table.take(pa.array(rows, pa.int64()))


def _rationale_tokens(tokenizer, tokens: list[int], prefix: str | None) -> int:
    """How many leading tokens of a sample are its rationale: those that end before the answer's marker (all but a
    final EOS when it has none)."""
    eos = tokenizer.eos_token_id
    n = len(tokens) - (1 if tokens and tokens[-1] == eos else 0)
    text = tokenizer.decode(tokens[:n])
    cut = text.find(prefix) if prefix else -1
    if cut < 0:
        return n
    # The longest prefix whose text ends before the marker: a bisection (a prefix's text grows with it), not a
    # decode of every prefix, which is quadratic in the sample's length.
    end = len(text[:cut].rstrip())
    return bisect.bisect_right(range(n + 1), end, key=lambda k: len(tokenizer.decode(tokens[:k]))) - 1


class StudentSampler:
    """A student replica in Ray Data's actor pool: samples its batch, writes it as one shard, returns the keys."""

    def __init__(self, cfg: dict, student: str):
        self.cfg, self.student = RolloutConfig.model_validate(cfg), student
        self.usage = Usage()
        self.engine = start_replica(self.cfg.student, self.cfg.output_dir)

    def __call__(self, batch: dict) -> dict:
        c, fmt = self.cfg, asked(self.cfg.method)
        n = len(batch["key"])
        prompts = [fmt.render_prompt(str(q)) for q in batch["question"]]
        outs = self.engine.generate([
            Request(prompt=p, max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=int(s),
                    stop=(fmt.stop,) if fmt.stop else (), logprobs=1) for p, s in zip(prompts, batch["seed"])])
        tokens = [list(o.logprobs.tokens) for o in outs]
        own = self.engine.grade([Grade(tuple(t), prompt=p) for t, p in zip(tokens, prompts)])  # the weights' own
        now, rows = time.time(), []
        for i, (o, t, g) in enumerate(zip(outs, tokens, own)):
            spec = get_task(str(batch["task"][i]))
            gold = batch["gold"][i]
            result = score(spec, o.text, None if gold is None else str(gold), prefix=fmt.prefix,
                           finish_reason=o.finish_reason)
            rows.append({"key": str(batch["key"][i]), "student": self.student, "task": str(batch["task"][i]),
                         "index": int(batch["index"][i]), "sample_index": int(batch["sample_index"][i]),
                         "seed": int(batch["seed"][i]), "question": str(batch["question"][i]),
                         "gold": None if gold is None else str(gold), "prompt": prompts[i], "completion": o.text,
                         "finish_reason": o.finish_reason, "prediction": format_prediction(result.prediction),
                         "correct": result.correct, "prompt_tokens": o.prompt_tokens, "tokens": t,
                         "student_logprobs": g.token_logprobs,
                         "rationale_tokens": _rationale_tokens(self.engine.tokenizer, t, fmt.prefix),
                         "created_at": now})
        _write(Path(c.output_dir) / "samples", self.student, pa.Table.from_pylist(rows, schema=SAMPLES))
        used = self.usage.take()
        return {"key": [r["key"] for r in rows], "_cpu_s": [used["cpu_s"] / n] * n, "_gpu_s": [used["gpu_s"] / n] * n}


class TeacherGrader:
    """A teacher replica in Ray Data's actor pool: grades its batch's rationales, writes one shard."""

    def __init__(self, cfg: dict, teacher: str):
        self.cfg, self.teacher = RolloutConfig.model_validate(cfg), teacher
        self.usage = Usage()
        self.engine = start_replica(self.cfg.teacher, self.cfg.output_dir)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        prompts = [zero_shot_cot_step1(str(q)) for q in batch["question"]]
        continuations = [tuple(int(t) for t in ts[:int(k)])
                         for ts, k in zip(batch["tokens"], batch["rationale_tokens"])]
        graded = self.engine.grade([Grade(c, prompt=p, logprobs=self.cfg.top_k)
                                    for c, p in zip(continuations, prompts)])
        now = time.time()
        rows = [{"key": str(batch["key"][i]), "teacher_id": self.teacher,
                 "prompt_tokens": len(self.engine.tokenizer(prompts[i], add_special_tokens=False).input_ids),
                 "teacher_logprobs": g.token_logprobs, "top_ids": g.top_ids if self.cfg.top_k else [],
                 "top_logprobs": g.top_logprobs if self.cfg.top_k else [], "created_at": now}
                for i, g in enumerate(graded)]
        _write(Path(self.cfg.output_dir) / "grades", self.teacher, pa.Table.from_pylist(rows, schema=GRADES))
        used = self.usage.take()
        return {"key": [r["key"] for r in rows], "_cpu_s": [used["cpu_s"] / n] * n, "_gpu_s": [used["gpu_s"] / n] * n}


def _questions(cfg: RolloutConfig) -> list[dict]:
    """The training questions (a bad line or a missing key stops here, naming the file and line)."""
    out = []
    for n, r in iter_jsonl(cfg.questions):
        missing = [k for k in ("task", "index", "question") if r.get(k) is None]
        if missing:
            raise FcotError(f"questions {cfg.questions}, line {n}: missing key {missing[0]!r}")
        out.append(r)
    if not out:
        raise FcotError(f"questions {cfg.questions}: no questions")
    return out


def _run_pool(items: list[dict], worker, kwargs: dict, engine: EngineConfig, what: str) -> tuple[float, float]:
    """Every item through an actor pool of `engine`'s replicas (Ray Data); returns the CPU and GPU seconds."""
    import ray  # heavy: only where Ray work starts

    ds = ray.data.from_items(items).map_batches(
        worker, fn_constructor_kwargs=kwargs, batch_size=engine.batch_size,
        compute=ray.data.ActorPoolStrategy(size=engine.replicas), num_cpus=engine.cpus_per_replica,
        num_gpus=engine.gpus_per_replica or None, batch_format="numpy")
    cpu_s = gpu_s = 0.0
    with Progress(what, len(items), "samples") as bar:
        for row in ds.iter_rows():
            cpu_s, gpu_s = cpu_s + float(row["_cpu_s"]), gpu_s + float(row["_gpu_s"])
            bar.update(1)
    return cpu_s, gpu_s


def rollout(cfg: RolloutConfig) -> dict:
    """Sample, grade and write the round's training rows (module doc); returns its stats (OUTPUT_DIR/stats.json)."""
    started, cpu_started = time.time(), cpu_seconds(children=False)
    out = Path(cfg.output_dir)
    student = fingerprint(cfg.student.model)
    if student is None:
        raise FcotError(f"student.model {cfg.student.model}: a round's student is a local model folder (its content "
                        "keys the round's samples)")
    init_ray(cfg.ray_address)
    # The models resolved and the dtypes chosen here: replicas run elsewhere (another directory, another node).
    sent = cfg.model_copy(update={"student": cfg.student.resolved(), "teacher": cfg.teacher.resolved()}).model_dump()
    items = []
    for q in _questions(cfg):
        for j in range(cfg.samples_per_question):
            seed = sample_seed(cfg.seed + cfg.round, q["task"], int(q["index"]), j)
            items.append({"key": _key(student, q["task"], int(q["index"]), j, seed, cfg.temperature,
                                      cfg.max_new_tokens, cfg.method),
                          "task": q["task"], "index": int(q["index"]), "sample_index": j, "seed": seed,
                          "question": q["question"], "gold": q.get("answer")})
    keys = {it["key"] for it in items}
    cpu_s = gpu_s = 0.0
    done = set(_read(out / "samples", student, SAMPLES, keys).column("key").to_pylist())
    todo = [it for it in items if it["key"] not in done]
    if todo:
        spent = _run_pool(todo, StudentSampler, {"cfg": sent, "student": student},
                          cfg.student, f"rollout {cfg.round}: student samples")
        cpu_s, gpu_s = cpu_s + spent[0], gpu_s + spent[1]
    samples = _read(out / "samples", student, SAMPLES, keys).to_pylist()
    tid = teacher_id(cfg.teacher.resolved())
    done = set(_read(out / "grades", tid, GRADES, keys).column("key").to_pylist())
    todo = [{k: r[k] for k in ("key", "question", "tokens", "rationale_tokens")}
            for r in samples if r["key"] not in done]
    if todo:
        spent = _run_pool(todo, TeacherGrader, {"cfg": sent, "teacher": tid},
                          cfg.teacher, f"rollout {cfg.round}: teacher grades")
        cpu_s, gpu_s = cpu_s + spent[0], gpu_s + spent[1]
    grades = {r["key"]: r for r in _read(out / "grades", tid, GRADES, keys).to_pylist()}
    stats = _training_rows(cfg, samples, grades, out)
    stats.update(round=cfg.round, student=student, teacher_id=tid, wall_s=round(time.time() - started, 2),
                 cpu_s=round(cpu_s + cpu_seconds(children=False) - cpu_started, 1), gpu_s=round(gpu_s, 1))
    atomic_write_json(out / "stats.json", stats)
    return stats


def _training_rows(cfg: RolloutConfig, samples: list[dict], grades: dict[str, dict], out: Path) -> dict:
    """The round's training rows (OUTPUT_DIR/train, whole or not at all) and their stats."""
    rows, kl, graded, dropped = [], 0.0, 0, 0
    for s in sorted(samples, key=lambda r: (r["task"], r["index"], r["sample_index"])):
        g = grades[s["key"]]
        k = s["rationale_tokens"]
        teacher = g["teacher_logprobs"]
        kl += sum(a - b for a, b in zip(s["student_logprobs"][:k], teacher))
        graded += k
        length = pair_length(s["prompt_tokens"], len(s["tokens"]), False)
        if length > cfg.max_length or not k:
            dropped += 1
            continue
        top_ids = [[t, *(g["top_ids"][p] if g["top_ids"] else [])] for p, t in enumerate(s["tokens"][:k])]
        top_lps = [[teacher[p], *(g["top_logprobs"][p] if g["top_logprobs"] else [])] for p in range(k)]
        rows.append({"task": s["task"], "index": s["index"], "sample_index": s["sample_index"], "part": 0,
                     "weight_key": "", "prompt": s["prompt"], "completion": s["completion"], "length": length,
                     "completion_length": len(s["tokens"]),
                     TEACHER_LOGPROBS: {"tokens": s["tokens"][:k], "top_ids": top_ids, "top_logprobs": top_lps}})
    if not rows:
        raise FcotError(f"rollout round {cfg.round}: no sample has a rationale the teacher could grade within "
                        f"max_length {cfg.max_length} ({len(samples)} samples)")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=row_schema(True)), buf)
    atomic_write_bytes(out / "train" / "part-00000.parquet", buf.getvalue())
    generated = sum(len(s["tokens"]) for s in samples)
    scored = [s["correct"] for s in samples if s["correct"] is not None]  # of questions with gold
    return {"samples": len(samples), "rows": len(rows), "dropped": dropped,
            "accuracy": sum(scored) / len(scored) if scored else None,
            "graded_tokens": graded, "kl_per_token": kl / max(graded, 1),
            "student_tokens": generated + sum(s["prompt_tokens"] for s in samples),
            "teacher_tokens": graded + sum(g["prompt_tokens"] for g in grades.values()),
            "train_dir": str(out / "train"),
            # as curation's stats.json, which training reads beside its data: the length rule, the answers' length
            "max_length": cfg.max_length, "completion_length_max": max(r["completion_length"] for r in rows)}
