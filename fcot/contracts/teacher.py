"""The teacher's contract: what `fcot teach` is asked (its config), who the teacher is, which questions it owes, and
each sample's key and seed. The teacher stage writes by it; curation, evaluation and run read by it.

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
from typing import Annotated, Literal

from pydantic import Field, model_validator

from fcot.config import PLACEMENT, Config, PathStr, RayAddress
from fcot.engines import EngineConfig
from fcot.errors import FcotError
from fcot.models import ALIASES, fingerprint, tokenizer_identity
from fcot.resources import Demand
from fcot.tasks import DataDir, Sample, TaskNames, UserTask, data_dir, data_file, load_split, split_user_tasks
from fcot.tasks.registry import TEACHER_LOGS, teacher_log

SAMPLER_VERSION = {"hf": "gumbel-hash-1"}  # a change of the hf engine's sampler makes new samples


class AdaptiveConfig(Config):
    """Sample each question in rounds of `round_size` until it has `min_correct` correct rationales (distinct
    texts) or `max_samples` samples; a question's next round starts once its current round has landed."""

    min_correct: int = Field(ge=1)
    max_samples: int = Field(ge=1)
    round_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _sizes(self):
        if self.round_size > self.max_samples:
            raise ValueError(f"round_size ({self.round_size}) > max_samples ({self.max_samples})")
        return self


class SamplingConfig(Config):
    num_samples: int = Field(1, ge=1)  # D: greedy when 1, temperature sampling when > 1
    temperature: float = Field(0.7, gt=0)  # used when num_samples > 1 or adaptive
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)  # step 1 (the rationale)
    answer_max_new_tokens: int = Field(32, ge=1)  # step 2 (the answer)
    seed: int = 0
    stop: list[str] = []  # step-1 stop strings (the paper uses none)
    # k: each rationale token's top-k token ids and logprobs, stored with the record (for KD students; 0: none)
    logprobs: int = Field(0, ge=0, le=20)
    adaptive: AdaptiveConfig | None = None  # instead of a fixed D (num_samples then stays 1)

    @model_validator(mode="after")
    def _one_budget(self):
        if self.adaptive is not None and self.num_samples != 1:
            raise ValueError("set either sampling.num_samples (a fixed D) or sampling.adaptive.max_samples, not both")
        return self

    @property
    def greedy(self) -> bool:
        return self.num_samples == 1 and self.adaptive is None

    @property
    def budget(self) -> int:
        """The most samples any question gets."""
        return self.adaptive.max_samples if self.adaptive else self.num_samples


class TeachConfig(Config):
    tasks: TaskNames
    user_tasks: list[UserTask] = []  # definitions of the user tasks in `tasks` (fcot.tasks.custom)
    split: Literal["train", "test"] = "train"
    split_kind: str = "default"
    subset: float | None = None  # a count (>= 1) or a fraction (< 1) of the split, from its start
    data_dir: DataDir = Field(None, validate_default=True)
    output_dir: PathStr = "runs/teacher"
    prompt: Literal["zero_shot_cot", "few_shot_cot"] = "zero_shot_cot"
    few_shot_exemplars: PathStr | None = None  # JSON file of [question, rationale, answer] (default: the paper's)
    # completion: the paper's text prompts; chat: question in the user turn, "Let's think step by step."
    # opening the assistant turn, continued; chat_user_turn: both in the user turn (servers that cannot continue)
    prompt_style: Literal["completion", "chat", "chat_user_turn"] = "completion"
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig()
    ray_address: RayAddress = None
    progress: Annotated[bool, PLACEMENT] = True

    tasks_and_definitions = model_validator(mode="before")(split_user_tasks)

    @model_validator(mode="before")
    @classmethod
    def _recorded_log(cls, data):
        """`engine: {kind: recorded, log: TASK}`: the task's recorded 175B log in the data dir."""
        engine = data.get("engine") if isinstance(data, dict) else None
        if isinstance(engine, dict) and engine.get("log") and not engine.get("path"):
            if engine["log"] not in TEACHER_LOGS:
                raise FcotError(f"key 'engine.log': no recorded log for {engine['log']!r}; "
                                f"known: {', '.join(TEACHER_LOGS)}")
            root = data_dir(data.get("data_dir"))
            path = data_file(root, teacher_log(engine["log"]))
            if not path.exists():
                raise FcotError(f"key 'engine.log': {path}: file not found; run `fcot data download --task "
                                f"{engine['log']}` or set FCOT_DATA_DIR to a data dir that has it")
            recorded = {"format": "zero_shot_cot_log", "model": "text-davinci-002", **engine, "path": str(path)}
            data = {**data, "engine": recorded}
        return data

    @model_validator(mode="after")
    def _checks(self):
        if self.subset is not None and (self.subset <= 0 or (self.subset >= 1 and self.subset != int(self.subset))):
            raise ValueError("subset must be a count >= 1 or a fraction in (0, 1)")
        if self.prompt == "few_shot_cot" and self.prompt_style != "completion":
            raise ValueError("prompt few_shot_cot works with prompt_style completion")
        if self.sampling.logprobs and self.engine.kind == "recorded":
            raise FcotError("key 'teacher.sampling.logprobs': a recorded teacher's outputs carry no logprobs; "
                            "set it to 0, or generate with an hf, vllm or openai engine")
        if self.sampling.logprobs and self.engine.kind == "openai" and not self.engine.tokenizer:
            raise FcotError("key 'teacher.engine.tokenizer': logprobs from a served model are token ids of its "
                            "tokenizer; name it (an alias or a local folder), so students can be checked against it")
        return self

    def demands(self, prefix: str = "") -> list[Demand]:
        return self.engine.demands(f"{prefix}engine.", "teacher engine replicas")


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
