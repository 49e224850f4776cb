"""`fcot teach` config: which questions, which teacher, how many samples."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fcot.config import Config


class EngineConfig(Config):
    kind: Literal["hf", "vllm", "openai", "recorded"] = "hf"
    model: str = "smollm2-135m"  # an alias (`fcot models`), a local folder, or a hub id / server model name
    replicas: int = Field(1, ge=1)  # engine replicas, each a Ray actor
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)  # vllm on GPUs: = tensor_parallel_size
    # samples handed to a replica at a time (default: 256 for vllm, whose continuous batching needs many
    # sequences in flight, 32 otherwise)
    samples_per_batch: int | None = Field(None, ge=1, validate_default=True)
    # hf / vllm
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    hf_batch_size: int = Field(32, ge=1)  # sequences per transformers `generate` call
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=64)
    enforce_eager: bool = True  # skip vLLM's graph capture / compilation (minutes on CPU)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_gib: float = Field(1.0, gt=0)  # vllm on CPU: KV cache per replica (GPUs use gpu_memory_utilization)
    # openai
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from a file
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    # recorded
    path: str | None = None
    format: Literal["zero_shot_cot_log", "openai_batch"] | None = None

    @field_validator("samples_per_batch")
    @classmethod
    def _default_batch(cls, v, info: ValidationInfo):
        return v if v is not None else 256 if info.data.get("kind") == "vllm" else 32

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "openai" and not self.base_url:
            raise ValueError("engine.kind openai needs engine.base_url")
        if self.kind == "recorded" and not (self.path and self.format):
            raise ValueError("engine.kind recorded needs engine.path and engine.format")
        return self


class SamplingConfig(Config):
    num_samples: int = Field(1, ge=1)  # D: greedy when 1, temperature sampling when > 1
    temperature: float = Field(0.7, gt=0)  # used when num_samples > 1
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)  # step 1 (the rationale)
    answer_max_new_tokens: int = Field(32, ge=1)  # step 2 (the answer)
    seed: int = 0
    stop: list[str] = []  # step-1 stop strings (the paper uses none)


class TeachConfig(Config):
    tasks: list[str]
    split: Literal["train", "test"] = "train"
    split_kind: str = "default"
    subset: float | None = None  # a count (>= 1) or a fraction (< 1) of the split, from its start
    data_dir: str | None = None
    output_dir: str = "runs/teacher"
    prompt: Literal["zero_shot_cot", "few_shot_cot"] = "zero_shot_cot"
    few_shot_exemplars: str | None = None  # JSON file of [question, rationale, answer] (default: the paper's)
    # completion: the paper's text prompts; chat: question in the user turn, "Let's think step by step."
    # opening the assistant turn, continued; chat_user_turn: both in the user turn (servers that cannot continue)
    prompt_style: Literal["completion", "chat", "chat_user_turn"] = "completion"
    engine: EngineConfig = EngineConfig()
    sampling: SamplingConfig = SamplingConfig()
    ray_address: str | None = None
    progress: bool = True

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _checks(self):
        if self.subset is not None and (self.subset <= 0 or (self.subset >= 1 and self.subset != int(self.subset))):
            raise ValueError("subset must be a count >= 1 or a fraction in (0, 1)")
        if self.prompt == "few_shot_cot" and self.prompt_style != "completion":
            raise ValueError("prompt few_shot_cot works with prompt_style completion")
        return self
