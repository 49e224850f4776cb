"""What the teacher generates: its identity, the questions, the prompts, and one work item per sample.

Rule: a record belongs to exactly one teacher. The teacher's identity is everything that changes what it
writes — engine kind, model (name and content hash), the dtype it runs in, prompt kind and exemplars (hashed),
prompt style, sampling parameters, split — and its hash `teacher_id` is part of every sample's key and stored
with every record, so one store can hold many teachers and each run's curation reads only its own. D, the subset
and the output folder are not part of it: sample k of a question is the same record whatever D or subset asked
for it.

Adaptive sampling replays the same way everywhere: a question's samples come in rounds of `round_size`;
after each full round it stops once `min_correct` distinct correct rationales are in, or at `max_samples`.
`samples_used` applies that rule to a question's records, so curation and reports see exactly the samples the
adaptive teacher spent, whatever else the store holds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from fcot.errors import FcotError
from fcot.io import read_json
from fcot.models import ALIASES, fingerprint, tokenizer_identity
from fcot.prompts import COT_TRIGGER, few_shot_cot, zero_shot_cot_step1
from fcot.tasks import Sample, load_split
from fcot.teacher.config import AdaptiveConfig, TeachConfig

SAMPLER_VERSION = {"hf": "gumbel-hash-1"}  # a change of the hf engine's sampler makes new samples


def _file_sha256(path: str) -> str:
    """A file's content hash, read once per (size, mtime) as models.fingerprint does: the recorded importer asks
    for its teacher's identity once per record."""
    try:
        stat = Path(path).stat()
        return _sha256(path, stat.st_size, stat.st_mtime_ns)
    except OSError as e:
        raise FcotError(f"{path}: cannot read ({e.strerror})") from None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def sampling_params(cfg: TeachConfig) -> dict:
    s = cfg.sampling
    return {"temperature": 0.0 if s.greedy else s.temperature, "top_p": 1.0 if s.greedy else s.top_p,
            "max_new_tokens": s.max_new_tokens, "answer_max_new_tokens": s.answer_max_new_tokens,
            "stop": list(s.stop)}


def model_name(cfg: TeachConfig) -> str:
    """The teacher model as records name it: an alias, a folder's name, a hub id or a server's model name."""
    e = cfg.engine
    if e.kind in ("hf", "vllm") and e.model not in ALIASES and Path(e.model).is_dir():
        return Path(e.model).name
    return e.model


def teacher_identity(cfg: TeachConfig) -> dict:
    e = cfg.engine
    ident = {"engine": e.kind, "model": model_name(cfg), "prompt": cfg.prompt, "prompt_style": cfg.prompt_style,
             "sampling": sampling_params(cfg), "split": cfg.split, "split_kind": cfg.split_kind}
    if e.kind in ("hf", "vllm"):
        ident["model_sha256"] = fingerprint(e.model) or e.model
        ident["sampler"] = SAMPLER_VERSION.get(e.kind, e.kind)
        ident["dtype"] = e.precision().dtype  # bf16 and fp32 samples differ: the dtype that ran, not `auto`
    if e.kind == "openai":
        ident["base_url"] = e.base_url
    if e.kind == "recorded":
        ident["source_sha256"] = _file_sha256(e.path)
        ident["format"] = e.format
    if cfg.prompt == "few_shot_cot":
        ident["exemplars_sha256"] = _file_sha256(cfg.few_shot_exemplars) if cfg.few_shot_exemplars else "paper"
    if cfg.sampling.logprobs:  # records with them are other records; their token ids index this tokenizer
        ident["logprobs"] = cfg.sampling.logprobs
        ident["tokenizer"] = tokenizer_identity(teacher_tokenizer(cfg))
    return ident


def teacher_tokenizer(cfg: TeachConfig) -> str:
    """The teacher's tokenizer as a model reference: the served model's `engine.tokenizer`, else the model's."""
    return cfg.engine.tokenizer or cfg.engine.model


def teacher_id(cfg: TeachConfig) -> str:
    return hashlib.sha256(json.dumps(teacher_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def sample_key(tid: str, prompt: str, sample_index: int, seed: int) -> str:
    blob = json.dumps([tid, prompt, sample_index, seed], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def sample_seed(base_seed: int, task: str, index: int, sample_index: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{task}:{index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


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


def questions(cfg: TeachConfig) -> list[Sample]:
    """The questions the teacher labels: the split of each task, or its first `subset` questions."""
    out = []
    for task in cfg.tasks:
        samples = load_split(task, cfg.split, cfg.split_kind, cfg.data_dir)
        if cfg.subset is not None:
            n = int(cfg.subset) if cfg.subset >= 1 else max(1, round(cfg.subset * len(samples)))
            samples = samples[:n]
        out.extend(samples)
    return out


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


def rationale_digest(text: str) -> str:
    """A rationale's stripped text as 32 hex digits: what the adaptive rule and curation's dedupe compare."""
    return hashlib.blake2b(text.strip().encode(), digest_size=16).hexdigest()


def samples_used(records: dict[int, dict], adaptive: AdaptiveConfig | None, budget: int) -> int:
    """How many samples of one question (records by sample index) the teacher spends: its whole budget for a
    fixed D; for adaptive sampling, full rounds until min_correct distinct correct rationales are in. A round
    with a sample still missing counts whole: it is being generated."""
    if adaptive is None:
        return budget
    correct: set[str] = set()
    n = 0
    while n < adaptive.max_samples:
        end = min(n + adaptive.round_size, adaptive.max_samples)
        if any(k not in records for k in range(n, end)):
            return end
        correct.update(records[k]["rationale"].strip() for k in range(n, end) if records[k]["correct"])
        n = end
        if len(correct) >= adaptive.min_correct:
            break
    return n
