"""`fcot teach` config: which questions, which teacher, how many samples (a fixed D, or adaptive)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fcot.config import PLACEMENT, Config, PathStr, RayAddress
from fcot.engines import EngineConfig
from fcot.errors import FcotError
from fcot.resources import Demand
from fcot.tasks import DataDir, TaskNames, UserTask, data_dir, data_file, split_user_tasks
from fcot.tasks.registry import TEACHER_LOGS, teacher_log


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
