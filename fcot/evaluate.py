"""Evaluate a student (or any model) on a task split with greedy decoding and the paper's scoring.

Methods: the student methods of fcot.methods (fine-tuned students, asked their method's test-time question), and
the baselines `zero_shot`, `zero_shot_cot` (two steps) and `few_shot_cot`. Inference runs as Ray Data
`map_batches` over an actor pool of engine replicas, on the teacher's engines and `EngineConfig` (hf or vLLM;
replicas, GPUs, tensor parallel, context length). Self-consistency (k samples at a temperature, majority vote over
the extracted answers) is an option. Every accuracy comes with its 95% bootstrap interval, the split's
majority-answer and random-guess rates, and whether the model's answers collapsed to one (fcot.stats).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fcot.config import Config, PathStr, RayAddress
from fcot.engines import EngineConfig, start_replica
from fcot.errors import FcotError
from fcot.io import atomic_file, atomic_write_json, read_json
from fcot.methods import METHODS, ChatTemplate, uses_chat
from fcot.predict import AUTO_MARGIN, predict_samples
from fcot.progress import Progress
from fcot.prompts import (
    few_shot_excluded_indices,
)
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.resources import Demand
from fcot.stats import COLLAPSE_SHARE, accuracy_interval, most_frequent, random_guess
from fcot.tasks import DataDir, Sample, TaskNames, UserTask, get_task, load_split, require_gold, split_user_tasks

BASELINES = ("zero_shot", "zero_shot_cot", "few_shot_cot")  # evaluation methods of the untrained student
AUTO_BASELINE = {"zero_shot": 64, "zero_shot_cot": 256, "few_shot_cot": 256}  # without curated stats
AUTO_STUDENT = {True: 256, False: 64}  # a student method without curated stats, by whether it writes rationales
# What the driver keeps of a prediction row for task_metrics (the texts go to predictions.jsonl only).
SCORED = ("task", "index", "correct", "prediction", "k", "sample_correct", "correct_format", "contains_answer")


class EvalConfig(Config):
    engine: EngineConfig  # engine.model: the model evaluated
    tasks: TaskNames
    user_tasks: list[UserTask] = []
    method: str = "fine_tune_cot"  # a student method (fcot.methods) or a baseline (BASELINES)
    split: Literal["train", "test"] = "test"
    split_kind: str = "default"
    subset: int | None = Field(None, ge=1)  # the first N questions of the split
    data_dir: DataDir = Field(None, validate_default=True)
    output_dir: PathStr = "runs/eval"
    # "auto": the longest completion curation kept (`curated`: its stats.json) plus a margin; else a default
    max_new_tokens: int | Literal["auto"] = "auto"
    curated: PathStr | None = None
    self_consistency: int = Field(1, ge=1)  # k > 1: k samples at `temperature`, majority vote
    chat_template: ChatTemplate = False  # a student method's question in the model's chat template (run: train's)
    temperature: float = Field(0.7, gt=0)
    seed: int = 0
    ray_address: RayAddress = None

    tasks_and_definitions = model_validator(mode="before")(split_user_tasks)

    @model_validator(mode="after")
    def _generates(self):
        if self.method not in BASELINES and self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected a student method ({', '.join(METHODS)}) or a "
                             f"baseline ({', '.join(BASELINES)})")
        if self.engine.kind == "recorded":
            raise ValueError("eval.engine.kind recorded cannot generate: use hf, vllm or openai")
        return self

    def demands(self, prefix: str = "") -> list[Demand]:
        return self.engine.demands(f"{prefix}engine.", "evaluation engine replicas")

    def generation_length(self) -> int:
        if self.max_new_tokens != "auto":
            return self.max_new_tokens
        if self.curated and Path(self.curated).exists():
            return int(read_json(self.curated)["completion_length_max"]) + AUTO_MARGIN
        if self.method in METHODS:
            return AUTO_STUDENT[METHODS[self.method].uses_rationales]
        return AUTO_BASELINE[self.method]


class EvalWorker:
    """One inference replica in Ray Data's actor pool."""

    def __init__(self, cfg: dict):
        self.cfg = EvalConfig.model_validate(cfg)  # registers the config's user tasks in this worker
        self.usage = Usage()
        self.engine = start_replica(self.cfg.engine, self.cfg.output_dir)
        self.max_new_tokens = self.cfg.generation_length()
        self.chat = uses_chat(self.cfg.chat_template, getattr(self.engine, "tokenizer", None),
                              bool(getattr(self.engine, "encoder_decoder", False)), "eval.chat_template")

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        samples = [{name: batch[name][i] for name in ("task", "index", "question", "answer")} for i in range(n)]
        c = self.cfg
        rows = predict_samples(self.engine, samples, c.method, self.max_new_tokens, c.self_consistency,
                               c.temperature, c.seed, self.chat)
        used = self.usage.take()
        out = {key: [r[key] for r in rows] for key in rows[0]}
        out["_cpu_s"], out["_gpu_s"] = [used["cpu_s"] / n] * n, [used["gpu_s"] / n] * n
        return out


def task_metrics(task: str, rows: list[dict], samples: list[Sample]) -> dict:
    """Accuracy with its interval, the rates it must beat, and the student's answer spread, for one task."""
    n = len(rows)
    correct = [bool(r["correct"]) for r in rows]
    spec = get_task(task)
    top, share = most_frequent([r["prediction"] for r in rows])
    answer, majority_rate = most_frequent([s.answer for s in samples])
    # k samples per question: pass@1 is the mean over them, maj@k the vote's winner (what `accuracy` is), pass@k
    # whether any is right; with k = 1 all three are the greedy accuracy.
    per_sample = [sum(r["sample_correct"]) / len(r["sample_correct"]) for r in rows]
    any_right = [any(r["sample_correct"]) for r in rows]
    return {"n": n, "accuracy": sum(correct) / n, "accuracy_ci": accuracy_interval(correct),
            "k": rows[0]["k"], "pass@1": sum(per_sample) / n, "pass@1_ci": accuracy_interval(per_sample),
            "maj@k": sum(correct) / n, "maj@k_ci": accuracy_interval(correct),
            "pass@k": sum(any_right) / n, "pass@k_ci": accuracy_interval(any_right),
            "correct_format": sum(r["correct_format"] for r in rows) / n,
            "contains_answer": sum(r["contains_answer"] for r in rows) / n,
            "majority_answer": answer, "majority": majority_rate,
            "random": random_guess(spec.answer_type, [s.choices for s in samples]),
            "top_prediction": top, "top_prediction_share": share, "collapsed": share >= COLLAPSE_SHARE}


def questions(cfg: EvalConfig) -> list[Sample]:
    """The questions evaluated, each with its gold answer (a question without one stops here, named)."""
    samples = []
    for task in cfg.tasks:
        split = load_split(task, cfg.split, cfg.split_kind, cfg.data_dir)
        if cfg.method == "few_shot_cot" and cfg.split == "train":
            excluded = set(few_shot_excluded_indices(task))
            split = [s for s in split if s.index not in excluded]
        samples.extend(split[: cfg.subset] if cfg.subset else split)
    if not samples:
        raise FcotError(f"no questions to evaluate for tasks {cfg.tasks}")
    require_gold(samples, f"evaluation on the {cfg.split} split scores every question against its gold answer")
    return samples


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate on Ray; writes predictions.jsonl and metrics.json under output_dir, returns the metrics."""
    import ray  # heavy: only where Ray work starts

    samples = questions(cfg)
    init_ray(cfg.ray_address)
    started, cpu_started = time.time(), cpu_seconds(children=False)
    # The model resolved and the dtype chosen here: workers run elsewhere (another directory, another node).
    resolved = cfg.model_copy(update={"engine": cfg.engine.resolved()})
    precision = cfg.engine.precision()
    # In (task, index) order, which Ray Data keeps (fcot.ray_utils.init_ray): predictions.jsonl is written as rows land.
    items = sorted(({**s.to_dict(), "choices": None} for s in samples), key=lambda r: (r["task"], r["index"]))
    e = cfg.engine
    ds = ray.data.from_items(items).map_batches(
        EvalWorker, fn_constructor_kwargs={"cfg": resolved.model_dump()}, batch_size=e.batch_size,
        compute=ray.data.ActorPoolStrategy(size=e.replicas), num_cpus=e.cpus_per_replica,
        num_gpus=e.gpus_per_replica or None, batch_format="numpy")
    out = Path(cfg.output_dir)
    rows, cpu_s, gpu_s = [], 0.0, 0.0  # rows: the fields the metrics read
    with atomic_file(out / "predictions.jsonl", "w") as f, Progress(f"eval {cfg.method}", len(items),
                                                                     "questions") as bar:
        for row in ds.iter_rows():
            row = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}  # numpy: plain
            cpu_s, gpu_s = cpu_s + row.pop("_cpu_s"), gpu_s + row.pop("_gpu_s")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")  # every sample's text goes to the file only
            rows.append({k: row[k] for k in SCORED})
            bar.update(1)
    cpu_s += cpu_seconds(children=False) - cpu_started
    metrics = {"model": cfg.engine.model, "method": cfg.method, "split": cfg.split,
               "self_consistency": cfg.self_consistency, "max_new_tokens": cfg.generation_length(),
               "precision": precision.to_dict() if precision else None,
               "wall_s": round(time.time() - started, 2), "cpu_s": round(cpu_s, 1), "gpu_s": round(gpu_s, 1),
               "tasks": {}}
    for task in cfg.tasks:
        metrics["tasks"][task] = task_metrics(task, [r for r in rows if r["task"] == task],
                                              [s for s in samples if s.task == task])
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
