"""What the teacher generates: the prompts, and one work item per sample.

Rule: the teacher's identity, the questions it owes, and each sample's key and seed are fcot.contracts.teacher's
(curation and evaluation read the same); here they become one work item per (question, sample index).
"""

from __future__ import annotations

import functools
import json

from fcot.contracts.teacher import TeachConfig, questions, sample_key, sample_seed, teacher_id
from fcot.errors import FcotError
from fcot.io import read_json
from fcot.prompts import COT_TRIGGER, few_shot_cot, zero_shot_cot_step1
from fcot.tasks import Sample


def step1_prompt(cfg: TeachConfig, task: str, question: str) -> tuple[str | None, tuple | None]:
    """(text prompt, chat messages) of step 1; exactly one is set."""
    if cfg.prompt == "few_shot_cot":
        return few_shot_cot(task, question, exemplars(cfg.few_shot_exemplars)), None
    if cfg.prompt_style == "completion":
        return zero_shot_cot_step1(question), None
    if cfg.prompt_style == "chat":
        return None, ({"role": "user", "content": f"Q: {question.strip()}"},
                      {"role": "assistant", "content": COT_TRIGGER})
    return None, ({"role": "user", "content": zero_shot_cot_step1(question)},)


@functools.lru_cache(maxsize=8)
def exemplars(path: str | None):
    if path is None:
        return None
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(e, list) and len(e) == 3 and all(isinstance(x, str) for x in e)
                                             for e in data):
        raise FcotError(f"{path}: expected a JSON list of [question, rationale, answer] exemplars")
    return tuple(tuple(e) for e in data)


def item(cfg: TeachConfig, tid: str, s: Sample, k: int, prompt_repr: str) -> dict:
    """The work item of sample k of question s."""
    seed = sample_seed(cfg.sampling.seed, s.task, s.index, k)
    return {"task": s.task, "index": s.index, "sample_index": k, "seed": seed,
            "key": sample_key(tid, prompt_repr, k, seed), "question": s.question, "gold": s.answer,
            "prompt": prompt_repr}


def prompt_repr(cfg: TeachConfig, s: Sample) -> str:
    prompt, messages = step1_prompt(cfg, s.task, s.question)
    return prompt if prompt is not None else json.dumps(messages, ensure_ascii=False)


def plan(cfg: TeachConfig, tid: str | None = None) -> list[dict]:
    """One work item per (question, sample index < the teacher's budget)."""
    tid = tid or teacher_id(cfg)
    n = cfg.sampling.budget
    return [item(cfg, tid, s, k, p) for s in questions(cfg) for p in [prompt_repr(cfg, s)] for k in range(n)]


