"""Evaluate a student (or any model) on a task split with greedy decoding and the paper's scoring.

Methods: `fine_tune_cot` and `vanilla` (fine-tuned students), and the baselines `zero_shot`,
`zero_shot_cot` (two steps) and `few_shot_cot`. Inference runs as Ray Data `map_batches` over an actor pool
of engine replicas (vLLM where installed and asked for, transformers otherwise). Self-consistency (k samples
at a temperature, majority vote over the extracted answers) is an option.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from fcot.config import Config
from fcot.errors import FcotError
from fcot.io import atomic_write_json, atomic_write_jsonl
from fcot.prompts import ANSWER_TRIGGER, PREDICTION_PREFIX, few_shot_cot, few_shot_excluded_indices, get_format, zero_shot_cot_step1
from fcot.scoring import score, summarize
from fcot.tasks import Sample, get_task, load_split
from fcot.teacher.engines import Request

Method = Literal["fine_tune_cot", "vanilla", "zero_shot", "zero_shot_cot", "few_shot_cot"]


class EvalConfig(Config):
    model: str
    tasks: list[str]
    method: Method = "fine_tune_cot"
    split: Literal["train", "test"] = "test"
    split_kind: str = "default"
    subset: int | None = Field(None, ge=1)  # the first N questions of the split
    data_dir: str | None = None
    output_dir: str = "runs/eval"
    engine: Literal["hf", "vllm"] = "hf"
    dtype: Literal["bfloat16", "float16", "float32"] = "float32"
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    self_consistency: int = Field(1, ge=1)  # k > 1: k samples at `temperature`, majority vote
    temperature: float = Field(0.7, gt=0)
    seed: int = 0
    ray_address: str | None = None

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, v):
        return [v] if isinstance(v, str) else v


def _requests(method: str, samples: list[dict], max_new_tokens: int, k: int, temperature: float, seed: int,
              encoder_decoder: bool) -> list[Request]:
    reqs = []
    for s in samples:
        if method in ("fine_tune_cot", "vanilla", "zero_shot"):
            fmt = get_format(method)
            prompt = fmt.render_prompt(s["question"], encoder_decoder)
            stop = (fmt.stop,) if fmt.stop and not encoder_decoder else ()
        elif method == "zero_shot_cot":
            prompt, stop = zero_shot_cot_step1(s["question"]), ()
        else:
            prompt, stop = few_shot_cot(s["task"], s["question"]), ("\nQ:",)
        for j in range(k):
            reqs.append(Request(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature if k > 1 else 0.0,
                                seed=seed * 100_003 + int(s["index"]) * 101 + j, stop=stop))
    return reqs


def predict_samples(engine, samples: list[dict], method: str, max_new_tokens: int = 256, k: int = 1,
                    temperature: float = 0.7, seed: int = 0) -> list[dict]:
    """Generate and score; one row per sample (majority vote over k completions when k > 1)."""
    encoder_decoder = bool(getattr(engine, "encoder_decoder", False))
    reqs = _requests(method, samples, max_new_tokens, k, temperature, seed, encoder_decoder)
    outs = engine.generate(reqs)
    if method == "zero_shot_cot":  # step 2: greedy answer extraction after the trigger
        outs2 = engine.generate([Request(prompt=f"{r.prompt}{o.text}\n{ANSWER_TRIGGER}", max_new_tokens=32)
                                 for r, o in zip(reqs, outs)])
    prefix = PREDICTION_PREFIX[method]
    rows = []
    for i, s in enumerate(samples):
        spec = get_task(s["task"])
        scored = []
        for j in range(k):
            o = outs[i * k + j]
            text = outs2[i * k + j].text if method == "zero_shot_cot" else o.text
            scored.append((score(spec, text, s["answer"], prefix=prefix, finish_reason=o.finish_reason), o))
        if k == 1:
            result, out = scored[0]
        else:  # self-consistency: the most common extracted answer (ties: first seen)
            votes = Counter(r.prediction for r, _ in scored if r.prediction is not None)
            winner = votes.most_common(1)[0][0] if votes else None
            result, out = next(((r, o) for r, o in scored if r.prediction == winner), scored[0])
        rows.append({"task": s["task"], "index": int(s["index"]), "answer": s["answer"], "completion": out.text,
                     **result.to_dict(), "prediction": None if result.prediction is None else str(result.prediction),
                     "votes": k})
    return rows


def evaluate_model(model, tokenizer, samples: list[Sample], format_name: str = "fine_tune_cot",
                   encoder_decoder: bool | None = None, max_new_tokens: int = 256, batch_size: int = 32) -> dict:
    """Greedy accuracy of an in-memory model on `samples` (used between epochs for model selection)."""
    from fcot.teacher.engines import HFEngine

    engine = HFEngine.from_model(model, tokenizer, batch_size=batch_size)
    was_training = model.training
    rows = predict_samples(engine, [s.to_dict() for s in samples], format_name, max_new_tokens)
    model.train(was_training)
    scores = [score(get_task(r["task"]), r["completion"], r["answer"], prefix=PREDICTION_PREFIX[format_name]) for r in rows]
    return summarize(",".join(sorted({s.task for s in samples})), scores)


class EvalWorker:
    """One inference replica in Ray Data's actor pool."""

    def __init__(self, cfg: dict):
        from transformers.utils import logging as hf_logging

        from fcot.models import resolve_model
        from fcot.teacher.engines import HFEngine, VLLMEngine

        hf_logging.disable_progress_bar()
        self.cfg = EvalConfig.model_validate(cfg)
        path = resolve_model(self.cfg.model)
        if self.cfg.engine == "vllm":
            self.engine = VLLMEngine(path, dtype=self.cfg.dtype)
        else:
            self.engine = HFEngine(path, dtype=self.cfg.dtype, batch_size=self.cfg.batch_size,
                                   num_threads=max(1, int(self.cfg.cpus_per_replica)))

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        samples = [{name: batch[name][i] for name in ("task", "index", "question", "answer")} for i in range(n)]
        c = self.cfg
        rows = predict_samples(self.engine, samples, c.method, c.max_new_tokens, c.self_consistency, c.temperature, c.seed)
        return {key: [r[key] for r in rows] for key in rows[0]}


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate on Ray; writes predictions.jsonl and metrics.json under output_dir, returns the metrics."""
    import ray

    from fcot.ray_utils import init_ray

    samples = []
    for task in cfg.tasks:
        split = load_split(task, cfg.split, cfg.split_kind, cfg.data_dir)
        if cfg.method == "few_shot_cot" and cfg.split == "train":
            excluded = set(few_shot_excluded_indices(task))
            split = [s for s in split if s.index not in excluded]
        samples.extend(split[: cfg.subset] if cfg.subset else split)
    if not samples:
        raise FcotError(f"no questions to evaluate for tasks {cfg.tasks}")
    init_ray(cfg.ray_address)
    started = time.time()
    items = [{**s.to_dict(), "choices": None} for s in samples]
    ds = ray.data.from_items(items).map_batches(
        EvalWorker, fn_constructor_kwargs={"cfg": cfg.model_dump()}, batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.replicas), num_cpus=cfg.cpus_per_replica, num_gpus=cfg.gpus_per_replica or None,
        batch_format="numpy")
    rows = sorted(ds.take_all(), key=lambda r: (r["task"], r["index"]))
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows]
    out = Path(cfg.output_dir)
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    metrics = {"model": cfg.model, "method": cfg.method, "split": cfg.split, "self_consistency": cfg.self_consistency,
               "wall_s": round(time.time() - started, 2), "tasks": {}}
    for task in cfg.tasks:
        task_rows = [r for r in rows if r["task"] == task]
        n = len(task_rows)
        metrics["tasks"][task] = {
            "n": n, "accuracy": sum(r["correct"] for r in task_rows) / n,
            "correct_format": sum(r["correct_format"] for r in task_rows) / n,
            "contains_answer": sum(r["contains_answer"] for r in task_rows) / n,
        }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
