"""The teacher stage on Ray: plan samples, skip cached ones, generate the rest on a pool of engine replicas.

    plan (task, question, sample index, seed, key)  ->  drop keys already in the record store
      -> Ray Data map_batches over an actor pool of engine replicas (streaming, backpressure, and
         retries: a replica that dies is restarted and its batch runs again)
      -> each replica writes its batch as one parquet shard, atomically, before returning
      -> summary per task from the store.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import defaultdict
from pathlib import Path

from fcot.errors import FcotError
from fcot.io import atomic_write_json, read_json
from fcot.prompts import ANSWER_TRIGGER, COT_TRIGGER, FEW_SHOT_ANSWER_PREFIX, few_shot_cot, zero_shot_cot_step1
from fcot.scoring import predict, score
from fcot.tasks import get_task, load_split
from fcot.teacher.config import TeachConfig
from fcot.teacher.engines import Request
from fcot.teacher.store import RecordStore, sample_key, sample_seed


def step1_prompt(cfg: TeachConfig, task: str, question: str) -> tuple[str | None, tuple | None]:
    """(text prompt, chat messages) of step 1; exactly one is set."""
    if cfg.prompt == "few_shot_cot":
        return few_shot_cot(task, question, _exemplars(cfg.few_shot_exemplars)), None
    if cfg.prompt_style == "completion":
        return zero_shot_cot_step1(question), None
    if cfg.prompt_style == "chat":
        return None, ({"role": "user", "content": f"Q: {question.strip()}"},
                      {"role": "assistant", "content": COT_TRIGGER})
    return None, ({"role": "user", "content": zero_shot_cot_step1(question)},)


@functools.lru_cache(maxsize=8)
def _exemplars(path: str | None):
    if path is None:
        return None
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(e, list) and len(e) == 3 and all(isinstance(x, str) for x in e)
                                             for e in data):
        raise FcotError(f"{path}: expected a JSON list of [question, rationale, answer] exemplars")
    return [tuple(e) for e in data]


def step2_messages(messages: tuple, rationale: str) -> tuple:
    if messages[-1]["role"] == "assistant":  # continue the same assistant turn
        return messages[:-1] + ({"role": "assistant", "content": f"{COT_TRIGGER}{rationale}\n{ANSWER_TRIGGER}"},)
    return messages + ({"role": "assistant", "content": rationale}, {"role": "user", "content": ANSWER_TRIGGER})


def sampling_params(cfg: TeachConfig) -> dict:
    s = cfg.sampling
    greedy = s.num_samples == 1
    return {"temperature": 0.0 if greedy else s.temperature, "top_p": 1.0 if greedy else s.top_p,
            "max_new_tokens": s.max_new_tokens, "answer_max_new_tokens": s.answer_max_new_tokens,
            "stop": list(s.stop), "prompt": cfg.prompt, "prompt_style": cfg.prompt_style}


def model_name(cfg: TeachConfig) -> str:
    from fcot.models import ALIASES, resolve_model

    if cfg.engine.kind in ("hf", "vllm"):
        return cfg.engine.model if cfg.engine.model in ALIASES else resolve_model(cfg.engine.model)
    return cfg.engine.model


def questions(cfg: TeachConfig) -> list:
    out = []
    for task in cfg.tasks:
        samples = load_split(task, cfg.split, cfg.split_kind, cfg.data_dir)
        if cfg.subset is not None:
            n = int(cfg.subset) if cfg.subset >= 1 else max(1, round(cfg.subset * len(samples)))
            samples = samples[:n]
        out.extend(samples)
    return out


def plan(cfg: TeachConfig) -> list[dict]:
    """One work item per (question, sample index), with its seed and cache key."""
    model, params = model_name(cfg), sampling_params(cfg)
    items = []
    for s in questions(cfg):
        prompt, messages = step1_prompt(cfg, s.task, s.question)
        prompt_repr = prompt if prompt is not None else json.dumps(messages, ensure_ascii=False)
        for k in range(cfg.sampling.num_samples):
            seed = sample_seed(cfg.sampling.seed, s.task, s.index, k)
            items.append({"task": s.task, "index": s.index, "sample_index": k, "seed": seed,
                          "key": sample_key(model, prompt_repr, params, k, seed), "question": s.question,
                          "gold": s.answer, "prompt": prompt_repr})
    return items


def build_engine(cfg: TeachConfig):
    from fcot.models import resolve_model
    from fcot.teacher.engines import HFEngine, OpenAIEngine, VLLMEngine

    e = cfg.engine
    if e.kind == "hf":
        return HFEngine(resolve_model(e.model), dtype=e.dtype, batch_size=e.hf_batch_size,
                        num_threads=max(1, int(e.cpus_per_replica)))
    if e.kind == "vllm":
        return VLLMEngine(resolve_model(e.model), dtype=e.dtype, tensor_parallel_size=e.tensor_parallel_size,
                          max_model_len=e.max_model_len, enforce_eager=e.enforce_eager,
                          gpu_memory_utilization=e.gpu_memory_utilization, kv_cache_gib=e.kv_cache_gib,
                          cache_dir=str(Path(cfg.output_dir).resolve() / ".engine_cache"))
    if e.kind == "openai":
        return OpenAIEngine(e.model, e.base_url, api_key_env=e.api_key_env, max_concurrency=e.max_concurrency,
                            timeout_s=e.timeout_s, max_retries=e.max_retries,
                            continue_assistant=cfg.prompt_style == "chat")
    raise FcotError(f"engine {e.kind!r} does not generate")


def generate_records(cfg: TeachConfig, engine, items: list[dict]) -> list[dict]:
    """Both zero-shot-CoT steps for a batch of work items; returns finished records."""
    params = sampling_params(cfg)
    s = cfg.sampling
    step1 = []
    for it in items:
        prompt, messages = step1_prompt(cfg, it["task"], it["question"])
        step1.append(Request(prompt=prompt, messages=messages, max_new_tokens=s.max_new_tokens,
                             temperature=params["temperature"], top_p=params["top_p"], seed=int(it["seed"]),
                             stop=tuple(s.stop) or (("\nQ:",) if cfg.prompt == "few_shot_cot" else ())))
    first = engine.generate(step1)
    if cfg.prompt == "few_shot_cot":  # the answer is in the completion, after "The answer is"
        second = [None] * len(items)
    else:
        step2 = []
        for req, out in zip(step1, first):
            if req.messages is None:
                step2.append(Request(prompt=f"{req.prompt}{out.text}\n{ANSWER_TRIGGER}", max_new_tokens=s.answer_max_new_tokens))
            else:
                step2.append(Request(messages=step2_messages(req.messages, out.text), max_new_tokens=s.answer_max_new_tokens))
        second = engine.generate(step2)
    now = time.time()
    records = []
    for it, out, ans in zip(items, first, second):
        spec = get_task(it["task"])
        if ans is None:
            result = score(spec, out.text, it["gold"], prefix=FEW_SHOT_ANSWER_PREFIX)
        else:
            result = score(spec, ans.text, it["gold"], prefix=None)  # the paper: first candidate of step 2
        records.append({
            "task": it["task"], "index": int(it["index"]), "sample_index": int(it["sample_index"]), "key": it["key"],
            "question": it["question"], "gold": it["gold"], "prompt": it["prompt"], "rationale": out.text,
            "answer_text": ans.text if ans else "", "prediction": None if result.prediction is None else _fmt(result.prediction),
            "correct": result.correct, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "answer_prompt_tokens": ans.prompt_tokens if ans else 0,
            "answer_completion_tokens": ans.completion_tokens if ans else 0, "engine": cfg.engine.kind,
            "model": model_name(cfg), "prompt_style": cfg.prompt_style, "temperature": params["temperature"],
            "top_p": params["top_p"], "max_new_tokens": s.max_new_tokens, "seed": int(it["seed"]), "created_at": now,
        })
    return records


def _fmt(prediction) -> str:
    if isinstance(prediction, float):
        return str(int(prediction)) if prediction.is_integer() else repr(prediction)
    return str(prediction)


class TeacherWorker:
    """One engine replica (a Ray actor in Ray Data's pool): generates a batch, writes it as a shard."""

    def __init__(self, cfg: dict, records_dir: str):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.cfg = TeachConfig.model_validate(cfg)
        self.store = RecordStore(records_dir)
        self.engine = build_engine(self.cfg)

    def __call__(self, batch: dict) -> dict:
        keys = [str(k) for k in batch["key"]]
        n = len(keys)
        if self.store.shard_path(keys).exists():  # this batch finished before (e.g. a retried task)
            return {"key": keys, "generated": [False] * n, "tokens": [0] * n}
        items = [{name: batch[name][i] for name in batch} for i in range(n)]
        records = generate_records(self.cfg, self.engine, items)
        self.store.write(records)
        return {"key": keys, "generated": [True] * n,
                "tokens": [r["completion_tokens"] + r["answer_completion_tokens"] for r in records]}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", disable=not enabled or total == 0, dynamic_ncols=True, smoothing=0.1)


def teach(cfg: TeachConfig, on_shard=None) -> dict:
    """Run the teacher stage; returns the summary (also written to OUTPUT_DIR/summary.json).

    on_shard(path), if given, is called in this process with each shard as soon as it is written
    (`fcot run` formats it for curation while the teacher goes on)."""
    out_dir = Path(cfg.output_dir)
    store = RecordStore(out_dir / "records")
    started = time.time()
    if cfg.engine.kind == "recorded":
        from fcot.teacher.recorded import import_recorded

        items = import_recorded(cfg, store)
        generated = 0
    else:
        items = plan(cfg)
        done = store.keys()
        todo = [it for it in items if it["key"] not in done]
        generated = _run_pool(cfg, todo, store, on_shard) if todo else 0
    summary = summarize(cfg, store, items, generated, time.time() - started)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _run_pool(cfg: TeachConfig, todo: list[dict], store: RecordStore, on_shard=None) -> int:
    import ray

    from fcot.ray_utils import init_ray

    init_ray(cfg.ray_address)
    e = cfg.engine
    ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / e.samples_per_batch)))
    ds = ds.map_batches(
        TeacherWorker, fn_constructor_kwargs={"cfg": cfg.model_dump(), "records_dir": str(store.root.resolve())},
        batch_size=e.samples_per_batch, compute=ray.data.ActorPoolStrategy(size=e.replicas), num_cpus=e.cpus_per_replica,
        num_gpus=e.gpus_per_replica or None, batch_format="numpy",
    )
    generated = tokens = 0
    started = time.time()
    with _progress(len(todo), cfg.progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            generated += int(batch["generated"].sum())
            tokens += int(batch["tokens"].sum())
            bar.update(len(batch["key"]))
            bar.set_postfix(tok_s=f"{tokens / max(time.time() - started, 1e-9):.0f}")
            shard = store.shard_path([str(k) for k in batch["key"]])  # a replica's batch comes back whole
            if on_shard is not None and shard.exists():
                on_shard(shard)
    return generated


def summarize(cfg: TeachConfig, store: RecordStore, items: list[dict], generated: int, wall_s: float) -> dict:
    table = store.read({it["key"] for it in items}).to_pylist()
    by_task = defaultdict(list)
    for r in table:
        by_task[r["task"]].append(r)
    tasks = {}
    for task in cfg.tasks:
        rows = by_task.get(task, [])
        greedy = [r for r in rows if r["temperature"] == 0]
        tasks[task] = {
            "questions": len({r["index"] for r in rows}), "samples": len(rows),
            "accuracy_greedy": sum(r["correct"] for r in greedy) / len(greedy) if greedy else None,
            "accuracy_all_samples": sum(r["correct"] for r in rows) / len(rows) if rows else None,
            "questions_with_a_correct_sample": len({r["index"] for r in rows if r["correct"]}),
            "prompt_tokens": sum(r["prompt_tokens"] + r["answer_prompt_tokens"] for r in rows),
            "completion_tokens": sum(r["completion_tokens"] + r["answer_completion_tokens"] for r in rows),
        }
    return {"output_dir": str(Path(cfg.output_dir)), "records_dir": str(store.root), "planned": len(items),
            "records": len(table), "generated": generated, "wall_s": round(wall_s, 2), "tasks": tasks}
