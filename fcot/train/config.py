"""`fcot train` config: which curated data, which student, and how to fine-tune it on Ray Train."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fcot.config import PLACEMENT, Config, ModelRef, PathStr, RayAddress, WandbMode
from fcot.hardware import Precision, choose
from fcot.methods import ChatTemplate
from fcot.resources import Demand
from fcot.tasks import DataDir, UserTask


class DeepSpeedConfig(Config):
    # ZeRO stage: 0 plain data parallel, 1 optimizer, 2 +gradients, 3 +weights; auto: the lowest stage whose
    # per-worker training state (weights, gradients, Adam moments) fits in half of a worker's memory
    stage: int | Literal["auto"] = "auto"

    @field_validator("stage")
    @classmethod
    def _stage(cls, v):
        if v != "auto" and not 0 <= v <= 3:
            raise ValueError("stage must be 0, 1, 2, 3 or auto")
        return v
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on CPU (uses DeepSpeed's cpu_adam)


class LoraConfig(Config):
    """A LoRA student (peft): adapters of rank r on `target_modules`, the base weights frozen. The saved student is
    the adapter and its base's folder (adapter_config.json); `merge` also saves the merged weights (model/merged)."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # peft's name for every linear layer but the head
    merge: bool = False
    quantize: Literal["4bit"] | None = None  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only)


class ObjectiveConfig(Config):
    """What the student learns. sft: cross-entropy on the completion's tokens. kd: also the teacher's distribution
    over the rationale's tokens, its top-k logprobs stored with the records (teacher.sampling.logprobs): loss =
    (1 - alpha) x cross-entropy + alpha x temperature^2 x KL(teacher's renormalized top-k || student), per label
    token (fcot.train.objectives); with `tail`, the teacher's mass outside its top k counts as one more outcome.
    A decoder student whose tokenizer is the teacher's; curation carries the teacher's top-k with each curated row.
    on_policy: the student's own samples, each token graded by the teacher (fcot.rollout writes the rows): the
    per-token reverse KL to the teacher at the graded tokens, or GKD's generalized JSD over the teacher's top-k
    (`divergence: jsd`, `beta`), token-weighted over the graded tokens; `fcot run` trains it as the on_policy method."""

    kind: Literal["sft", "kd", "on_policy"] = "sft"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    tail: bool = False  # measured: no better held-out KL than without (experiments/results/bench.md)
    divergence: Literal["reverse_kl", "jsd"] = "reverse_kl"  # on_policy
    beta: float = Field(0.5, ge=0, le=1)  # on_policy jsd: 0 is KL(teacher || student), 1 KL(student || teacher)

    @property
    def graded(self) -> bool:
        """The rows carry the teacher's logprobs (TEACHER_LOGPROBS), read with them: kd and on_policy."""
        return self.kind in ("kd", "on_policy")


class WandbConfig(Config):
    project: str = "fcot"
    # auto: online with WANDB_API_KEY set, else offline (sync later with `wandb sync`)
    mode: WandbMode = "auto"
    group: str | None = None
    name: str | None = None


class DevConfig(Config):
    """Dev set evaluated by rank 0 after each epoch (model selection); needs fcot.evaluate."""

    path: PathStr | None = None  # JSONL or parquet with task, index, question, answer[, choices]
    task: str | None = None  # or a task's split, loaded with fcot.tasks.load_split
    split: Literal["train", "test"] = "test"
    split_kind: str = "default"
    data_dir: DataDir = Field(None, validate_default=True)  # task data (default: $FCOT_DATA_DIR)
    size: int | None = Field(None, ge=1)  # the first N samples only
    format: str = "fine_tune_cot"  # the student's method (fcot.methods: its test-time question), or a prompt format
    # "auto": the longest completion in the training data plus a margin (a student's answer must fit)
    max_new_tokens: int | Literal["auto"] = "auto"
    batch_size: int = Field(64, ge=1)  # questions per generate call on rank 0
    every: int = Field(1, ge=1)  # evaluate every N epochs (and after the last)

    @model_validator(mode="after")
    def _source(self):
        if (self.path is None) == (self.task is None):
            raise ValueError("dev needs exactly one of dev.path or dev.task")
        return self


class TrainConfig(Config):
    data: PathStr  # folder (or file) of curated parquet: task, index, sample_index, prompt, completion
    model: ModelRef = "smollm2-135m"  # an alias (`fcot models`), a local folder, or a hub id
    output_dir: PathStr = "runs/student"
    epochs: int = Field(20, ge=1)  # the paper's default
    max_steps: int | None = Field(None, ge=1)  # stop early after this many optimizer steps (tests, smoke runs)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)  # global: examples per optimizer step, over all workers
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step on each worker
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # of all optimizer steps
    max_grad_norm: float = Field(1.0, ge=0)  # 0: no clipping
    # tokens per example (fcot.train.data.pair_length); None: the curation's max_length (its stats.json), else 512.
    # Set and different from the curation's: an error naming both keys (a shorter limit would cut the answers off).
    max_length: int | None = Field(None, ge=8)
    rationale_weight: float = Field(1.0, ge=0)  # step_by_step: loss = label loss + rationale_weight x rationale loss
    objective: ObjectiveConfig = ObjectiveConfig()
    # The student prompted through its chat template (the question as the user turn, the completion as the assistant
    # turn, the loss on the assistant's tokens); auto: when its tokenizer has one. Off unless asked, so the paper's
    # plain `{q} ###` format stays the default. `fcot run` gives it to curation and evaluation too.
    chat_template: ChatTemplate = False
    lora: LoraConfig | None = None  # a LoRA (or QLoRA) student instead of a full fine-tune
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% more time
    packing: bool = False  # decoders: pack each micro-batch's examples into rows of <= max_length tokens
    # Each worker reads and tokenizes only its part of the curated set (the rank-th of num_workers ranges); auto:
    # from SHARD_ROWS rows on, and always for a KD student. Else every worker holds the whole set (faster for small
    # sets). Either way the loss is the exact token-weighted mean over each global batch; the two modes draw
    # different batches.
    shard_data: bool | Literal["auto"] = "auto"
    num_workers: int = Field(1, ge=1)  # Ray Train workers (data-parallel ranks)
    cpus_per_worker: Annotated[int, PLACEMENT] = Field(1, ge=1)  # also each worker's torch threads
    use_gpu: bool = False  # one GPU per worker
    # auto: bf16 where the device computes it natively, else fp16 on GPUs and fp32 on CPUs (fcot.hardware)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    seed: int = 0
    # restarts of the worker group from the last checkpoint (-1: forever)
    max_failures: Annotated[int, PLACEMENT] = Field(2, ge=-1)
    # epoch checkpoints kept in output_dir/checkpoints (the last epoch's is the state alone: the student is saved)
    keep_checkpoints: Annotated[int, PLACEMENT] = Field(1, ge=1)
    wandb: Annotated[WandbConfig, PLACEMENT] = WandbConfig()
    dev: DevConfig | None = None
    # best_dev: the epoch with the best dev accuracy is the student (needs dev); last: the last epoch
    selection: Literal["best_dev", "last"] = "best_dev"
    # Early stopping: stop once this many dev evaluations in a row have not beaten the best one (None: every epoch).
    # The lr schedule still spans train.epochs; the student is the best dev epoch (or the last, selection: last).
    patience: int | None = Field(None, ge=1)
    user_tasks: list[UserTask] = []  # definitions of user tasks the dev set scores (registered in the workers)
    # inside a Tune trial: report each epoch's metrics to Tune (ASHA and other schedulers)
    report_to_tune: Annotated[bool, PLACEMENT] = False
    ray_address: RayAddress = None

    @model_validator(mode="after")
    def _checks(self):
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by num_workers x grad_accum "
                             f"({self.num_workers} x {self.grad_accum})")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu (CPUs train in fp32 or bf16)")
        if self.lora is not None and self.lora.quantize and not self.use_gpu:
            raise ValueError("lora.quantize: 4-bit QLoRA needs CUDA GPUs (bitsandbytes): set use_gpu: true, or drop "
                             "lora.quantize for a LoRA student on this machine")
        if self.deepspeed.offload_optimizer and self.deepspeed.stage == 0:
            raise ValueError("deepspeed.offload_optimizer: ZeRO-Offload needs ZeRO stage 1, 2 or 3, and "
                             "deepspeed.stage is 0: set deepspeed.stage to 1, 2, 3 or auto")
        if self.lora is not None and self.lora.quantize and self.deepspeed.stage == 3:
            raise ValueError("lora.quantize: a 4-bit QLoRA base cannot be partitioned by ZeRO-3 (deepspeed.stage: 3): "
                             "set deepspeed.stage to 0, 1, 2 or auto (the base is frozen: stages 1-2 shard the "
                             "adapters' optimizer state)")
        return self

    def demands(self, prefix: str = "") -> list[Demand]:
        unit = {"CPU": float(self.cpus_per_worker), "GPU": 1.0 if self.use_gpu else 0.0}
        keys = {"CPU": f"{prefix}cpus_per_worker", "GPU": f"{prefix}use_gpu"}
        return [Demand(f"{prefix}num_workers", "training workers", self.num_workers, unit, keys)]

    @property
    def selects(self) -> bool:
        """The student is the best dev epoch (else the last)."""
        return self.selection == "best_dev" and self.dev is not None

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward/backward on one worker."""
        return self.batch_size // (self.num_workers * self.grad_accum)

    def precision_choice(self) -> Precision:
        return choose(self.precision, "cuda" if self.use_gpu else "cpu", "train.precision")

    @property
    def resolved_precision(self) -> str:
        """bf16, fp16 or fp32: as the driver chose it (`train` sends it to the workers as configured)."""
        return self.precision if self.precision != "auto" else self.precision_choice().short
