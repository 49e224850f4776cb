"""The student stage on Ray Train: data-parallel fine-tuning with DeepSpeed ZeRO, resumable per epoch.

    driver (train): _plan (data, config and dev set checked, steps) -> the curated set read once by Ray
            Data (sharded: cut into num_workers contiguous parts) -> _fit: TorchTrainer(num_workers) -> summary.json
    worker (train_loop), the recipe, top to bottom:
        _setup_worker   CPUs, user tasks, DeepSpeed's ops, seed; the precision, chosen by each worker on its
                        own device and agreed by the group (reported in the summary)
        _student        the model (fp32 master weights; packed attention, gradient checkpointing, LoRA/QLoRA)
        _setup_data     the curated set tokenized once, whole or (shard_data) this rank's part; a KD student's
                        teacher targets aligned from the top-k its rows carry; every rank's label counts, once
        _setup_engine   optimizer (a plain torch AdamW; DeepSpeed's cpu_adam only with offload_optimizer), lr
                        schedule, ZeRO stage (zero_stage) -> deepspeed.initialize
        _resume         ray.train.get_checkpoint(): weights, optimizer, schedule and the state (step, curves, dev)
        per epoch:
        _train_epoch    one seeded order of all examples cut into global batches, rank r training on the r-th slice
                        of each (sharded: each rank's seeded order of its part, a global batch being every rank's
                        next slice); _loss_step: grad_accum micro-batches, the objective's loss (fcot.train.
                        objectives) weighted by the global batch's label tokens (every rank knows them: no
                        collective per step)
        _dev_step       dev accuracy (fcot.predict), the best epoch's weights kept as a candidate; train.patience
        _account        CPU/GPU seconds and peak memory of every worker
        _save_student   after the last epoch: the best dev epoch (selection best_dev) or the last one,
                        save_pretrained + tokenizer in output_dir/model (ZeRO-3 weights gathered), LoRA merged
        _checkpoint     a DeepSpeed checkpoint and the state, reported with ray.train.report (the last epoch's:
                        the state alone, the student being saved)

A worker that dies restarts the whole group (FailureConfig) from the last epoch checkpoint; the step
counter, lr schedule, optimizer state and data order come back with it, so the run ends after the planned
steps. (A checkpoint counts once Ray Train's controller has collected every worker's report for it: a worker
lost before that takes the run back to the previous one.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from fcot.config import wandb_mode
from fcot.contracts.curated import REQUIRED, TEACHER_LOGPROBS, WEIGHT_KEY, check_curated
from fcot.errors import FcotError
from fcot.hardware import Precision, agree, check_gpu, use_cpus
from fcot.io import atomic_write_json, read_json
from fcot.methods import asked, uses_chat
from fcot.models import resolve_model
from fcot.predict import AUTO_MARGIN, dev_scores, dev_summary
from fcot.progress import Progress
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.stats import accuracy_interval
from fcot.tasks import Sample
from fcot.train import ds_ops
from fcot.train.config import TrainConfig
from fcot.train.data import Collator, load_dev_samples, teacher_targets, topk_rows
from fcot.train.objectives import loss_sum

STEADY_AFTER = 5  # steady-state tokens/s: counted from this optimizer step on (start-up, first kernels excluded)
STATE_FILE = "trainer_state.json"
CHECKPOINT_TAG = "deepspeed"
SELECTION_FILE = "fcot_selection.json"  # in a saved student: the epoch it is and why
SHARD_ROWS = 200_000  # shard_data auto: from this many curated rows on, each worker tokenizes only its part
DEFAULT_MAX_LENGTH = 512  # train.max_length with no curation stats to follow
# Worker-group starts that may time out (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each, Ray's default 60 s) before a
# training whose workers the cluster cannot place stops with a message; a replacement node joining meanwhile is used.
PLACEMENT_TRIES = 4


def plan_steps(cfg: TrainConfig, rows: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps). A partial last batch is dropped (a different one each epoch)."""
    per_epoch = rows // cfg.batch_size
    if per_epoch == 0:
        raise FcotError(f"data {cfg.data}: {rows} examples, fewer than batch_size={cfg.batch_size}")
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def zero_stage(cfg: TrainConfig, parameters: int, memory_bytes: float, world: int, trainable: int | None = None) -> int:
    """The ZeRO stage: as configured, or (auto) the lowest whose training state fits in half a worker's memory.
    Per parameter: fp32 weights 4 bytes (bf16 adds 2 for the cast copy); per trainable parameter (all but a LoRA
    student's frozen base): gradients 4 and Adam moments 8. ZeRO-1 shards the moments over the workers, ZeRO-2 the
    gradients too, ZeRO-3 the weights as well. ZeRO-Offload (offload_optimizer) needs stage >= 1; a QLoRA base
    (4-bit, about half a byte per parameter) cannot be partitioned, so stage <= 2 or a message naming the keys."""
    if cfg.deepspeed.stage != "auto":
        return cfg.deepspeed.stage
    t = parameters if trainable is None else trainable
    quantized = cfg.lora is not None and cfg.lora.quantize
    w = parameters * (0.5 if quantized else 4 + (2 if cfg.resolved_precision != "fp32" else 0))
    need = {0: w + 12 * t, 1: w + 4 * t + 8 * t / world, 2: w + 12 * t / world, 3: (w + 12 * t) / world}
    lowest = 1 if cfg.deepspeed.offload_optimizer else 0
    stage = next((s for s in range(lowest, 3) if need[s] < memory_bytes / 2), 3)
    if stage == 3 and quantized:
        raise FcotError(f"train.lora.quantize: the QLoRA student's training state ({need[2] / 2**30:.1f} GiB at "
                        f"ZeRO-2) does not fit in half a worker's memory ({memory_bytes / 2**30:.1f} GiB), and a "
                        "4-bit base cannot be partitioned by ZeRO-3: more workers (train.num_workers) or a smaller "
                        "train.lora.r, or set train.deepspeed.stage: 2 to try anyway")
    return stage


def _student(cfg: TrainConfig, model_path: str, device):
    """The model a worker trains, and whether it is an encoder-decoder: fp32 master weights (DeepSpeed casts for
    bf16 on GPUs; CPUs autocast), the packed attention when packing, gradient checkpointing when asked, and LoRA
    adapters (peft) over a frozen base — in 4-bit NF4 for QLoRA — when `train.lora` is set."""
    import torch  # heavy: workers only
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    encoder_decoder = bool(getattr(AutoConfig.from_pretrained(model_path), "is_encoder_decoder", False))
    model_cls = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    lora = cfg.lora
    kwargs = {"dtype": torch.float32}
    if lora is not None and lora.quantize:
        from transformers import BitsAndBytesConfig  # CUDA only (checked with the config)

        if importlib.util.find_spec("bitsandbytes") is None:
            raise FcotError("train.lora.quantize: 4-bit QLoRA needs bitsandbytes: install the `qlora` extra "
                            "(FCOT_EXTRAS=dev,vllm,qlora bash scripts/setup.sh)")

        kwargs = {"dtype": torch.bfloat16, "device_map": {"": device}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)}
    if encoder_decoder and cfg.objective.graded:
        raise FcotError(f"key 'train.objective': {cfg.objective.kind} trains decoder students (the teacher's token "
                        f"positions); {cfg.model} is an encoder-decoder")
    model = model_cls.from_pretrained(model_path, **kwargs)
    if cfg.packing:
        from fcot.train import attention  # registers the packed attention with transformers; torch-heavy

        model.set_attn_implementation(attention.NAME)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # heavy: LoRA students only

        if lora.quantize:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"))
    return model, encoder_decoder


def deepspeed_config(cfg: TrainConfig, stage: int) -> dict:
    precision = cfg.resolved_precision
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and cfg.use_gpu},  # CPUs: torch autocast instead (see train_loop)
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # fcot logs its own metrics
        "wall_clock_breakdown": False,
    }


def _wandb_run(cfg: TrainConfig, state: dict):
    """A W&B run on rank 0 (None when disabled): offline without WANDB_API_KEY, resumed after a restart."""
    mode = wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb  # heavy: rank 0 only

    state.setdefault("wandb_id", uuid.uuid4().hex[:12])  # kept in checkpoints: a restarted group logs to the same run
    return wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, name=cfg.wandb.name, mode=mode,
                      id=state["wandb_id"], resume="allow", dir=cfg.output_dir,
                      config=cfg.model_dump(), settings=wandb.Settings(silent=True))


def _full_state_dict(engine, stage: int):
    """All ranks must call under ZeRO-3 (it gathers); returns the full state dict on rank 0, else None."""
    if stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # what transformers' Trainer and Accelerate use
    return None


def _save(model, tokenizer, out: Path, state_dict=None, selection: dict | None = None) -> None:
    """save_pretrained + tokenizer into `out`, written beside it and renamed (a half-saved model never shows)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if selection is not None:
        (tmp / SELECTION_FILE).write_text(json.dumps(selection))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


@dataclasses.dataclass
class Worker:
    """What a training worker knows of itself: its config (its precision as the group decided), place in the
    group, device, and the precision's why."""

    cfg: TrainConfig
    rank: int
    world: int
    device: object
    autocast: object  # bf16 on CPU: torch autocast over fp32 master weights (DeepSpeed's bf16 is for accelerators)
    precision: Precision


@dataclasses.dataclass
class Examples:
    """A worker's training set, tokenized once: the examples (input ids, labels), each one's loss weight and, for a
    KD student, its teacher targets (label positions, top ids [n, k], top logprobs [n, k]: arrays); the label and
    real token counts of every example (sharded: a list of every rank's), so each rank knows every global batch."""

    items: list
    weights: list[float]
    targets: list
    label_tokens: object
    real_tokens: object
    sharded: bool


def _setup_worker(cfg: TrainConfig) -> Worker:
    """The worker's CPUs, user tasks, DeepSpeed's ops, quiet logs and seed, and the precision the group trains in:
    each worker chooses on its own device (the driver may see another CPU, or no GPU), the choices meet once, and
    the group agrees (fcot.hardware.agree)."""
    use_cpus(cfg.cpus_per_worker)  # torch, OpenMP and the tokenizer: the worker's reserved CPUs
    for task in cfg.user_tasks:  # the dev set may score user tasks: make them known in this worker
        task.register()
    ds_ops.configure(cfg.use_gpu)  # before deepspeed is imported
    import ray.train  # heavy: a training worker's own
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in list(logging.root.manager.loggerDict):  # Ray Train logs each report whole (curves and all) at INFO
        if "ray/train" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(cfg.seed)
    context = ray.train.get_context()
    choices = [None] * context.get_world_size()
    dist.all_gather_object(choices, cfg.precision_choice())
    precision = agree(choices)
    if cfg.use_gpu:
        check_gpu(precision.dtype, "train.precision")
    cfg = cfg.model_copy(update={"precision": precision.short})
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.resolved_precision == "bf16" and not cfg.use_gpu)
    return Worker(cfg, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(), autocast,
                  precision)


def _setup_data(collate: Collator, w: Worker, sharded: bool) -> Examples:
    """The curated set tokenized once: whole, or (sharded) this rank's part only, which no other rank reads (`train`
    splits it); each example's loss weight (its task's: the TrainConfig field the curated row names, else 1); for a
    KD student each example's teacher targets, aligned from the top-k its row carries."""
    import numpy as np  # heavy: workers only
    import ray.train
    import torch.distributed as dist

    kd, name = w.cfg.objective.graded, f"train_{w.rank}" if sharded else "train"
    items, weights, targets = [], [], []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=1024, batch_format="pyarrow"):
        encoded = collate.encode(batch.column("prompt").to_pylist(), batch.column("completion").to_pylist())
        items += encoded
        keys = batch.column(WEIGHT_KEY).to_pylist() if WEIGHT_KEY in batch.column_names else [""] * len(encoded)
        weights += [float(getattr(w.cfg, str(k))) if k else 1.0 for k in keys]
        if kd:
            targets += [teacher_targets(e, lp) for e, lp in zip(encoded, topk_rows(batch.column(TEACHER_LOGPROBS)))]
    # The tokens a loss is on: an on-policy student's, those the teacher graded (its samples' other tokens, the
    # format after the rationale, have none).
    label_tokens = np.array([len(t[0]) for t in targets] if w.cfg.objective.kind == "on_policy" else
                            [collate.label_tokens(e) for e in items], dtype=np.float64)
    real_tokens = np.array([collate.tokens(e) for e in items], dtype=np.int64)
    if sharded:  # every rank's counts, once: each rank then knows every global batch's label tokens
        counts = [None] * w.world
        dist.all_gather_object(counts, (label_tokens, real_tokens))
        label_tokens, real_tokens = [c[0] for c in counts], [c[1] for c in counts]
    return Examples(items, weights, targets, label_tokens, real_tokens, sharded)


def _setup_engine(cfg: TrainConfig, model, parameters: int, total_steps: int, w: Worker):
    """(DeepSpeed engine, ZeRO stage): the optimizer, the lr schedule and the stage that fits (zero_stage) for a
    model of `parameters`."""
    import deepspeed  # heavy: workers only
    import torch
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, but for a LoRA student
    if cfg.deepspeed.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorized Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    else:  # a plain torch optimizer: ZeRO 0-3 shard it as well, and nothing needs compiling. On CPUs its fused
        # kernel (one pass over all parameters) halves the optimizer's share of a step (bench/student.py).
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=None if cfg.use_gpu else True)
    schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    memory = torch.cuda.get_device_properties(w.device).total_memory if cfg.use_gpu else (
        psutil.virtual_memory().total / max(1, w.world))
    stage = zero_stage(cfg, parameters, memory, w.world, sum(p.numel() for p in trainable))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, stage),
        lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps))
    return engine, stage


def _resume(engine, w: Worker, data: Examples, collate: Collator) -> dict:
    """The training state: a fresh one, or the last epoch checkpoint's (weights, optimizer and lr schedule loaded
    into `engine`)."""
    import ray.train  # heavy: workers only

    state = {"epoch": 0, "step": 0, "loss_curve": [], "epoch_loss": [], "dev": [], "tokens": 0, "examples": 0,
             "train_s": 0.0, "startup_s": None, "resumed_from_step": None, "restarts": 0, "best": None,
             "cpu_s": 0.0, "gpu_s": 0.0, "steady_tokens": 0, "steady_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            if (Path(d) / CHECKPOINT_TAG).exists():  # not the last one, which is the state of a finished run alone
                engine.load_checkpoint(d, tag=CHECKPOINT_TAG)  # weights, optimizer, lr scheduler
            state = json.loads((Path(d) / STATE_FILE).read_text())
        state["resumed_from_step"] = state["step"]
        state["restarts"] += 1
    state["examples_held"] = len(data.items)  # by this worker (rank 0's is reported)
    state["precision"] = w.precision.to_dict()  # as the workers decided it (a resumed group decides again)
    state["objective"] = w.cfg.objective.kind
    if data.targets:  # of this worker's label tokens, those with the teacher's distribution (rank 0's is reported)
        state["kd_tokens"] = {"with_teacher": sum(len(t[0]) for t in data.targets),
                              "labels": int(sum(collate.label_tokens(e) for e in data.items)),
                              "bytes_held": int(sum(a.nbytes for t in data.targets for a in t))}
    return state


def _global_batches(data: Examples, cfg: TrainConfig, epoch: int, per_epoch: int, w: Worker):
    """(step in the epoch, this rank's example indices, the global batch's label tokens and real tokens) for each
    step of the epoch: one seeded order of all examples cut into global batches, rank r taking the r-th slice of
    each; sharded, each rank's seeded order of its part, a global batch being every rank's next slice."""
    import numpy as np  # heavy: workers only

    span = cfg.micro_batch_size * cfg.grad_accum
    if data.sharded:  # each rank's order of its part, the same on every rank
        orders = [np.random.default_rng([cfg.seed, epoch, r]).permutation(len(part))
                  for r, part in enumerate(data.label_tokens)]
    else:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data.items))  # the same on every rank
    for s in range(per_epoch):
        if data.sharded:  # the global batch: every rank's next slice of its own order
            slices = [o[s * span:(s + 1) * span] for o in orders]
            labels = float(sum(data.label_tokens[r][x].sum() for r, x in enumerate(slices)))
            tokens = int(sum(data.real_tokens[r][x].sum() for r, x in enumerate(slices)))
            yield s, slices[w.rank], labels, tokens
        else:
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            labels, tokens = float(data.label_tokens[batch].sum()), int(data.real_tokens[batch].sum())
            yield s, batch[w.rank * span:(w.rank + 1) * span], labels, tokens


def _loss_step(engine, collate: Collator, data: Examples, mine, global_labels: float, w: Worker):
    """One optimizer step over this rank's share of a global batch, in grad_accum micro-batches; returns the summed
    (loss, label tokens) of this rank's micro-batches. Token-weighted over the global batch: DeepSpeed averages
    gradients over ranks and micro-batches, so each micro-batch's loss sum is scaled by world x grad_accum /
    the global batch's label tokens."""
    import torch  # heavy: workers only

    cfg, mb = w.cfg, w.cfg.micro_batch_size
    scale = w.world * cfg.grad_accum / max(global_labels, 1.0)
    total = torch.zeros(2, dtype=torch.float64, device=w.device)
    for a in range(cfg.grad_accum):
        part = mine[a * mb:(a + 1) * mb]
        b = collate.collate([data.items[i] for i in part], [data.weights[i] for i in part],
                            [data.targets[i] for i in part] if data.targets else None)
        b = {k: v.to(w.device, non_blocking=True) if hasattr(v, "to") else v for k, v in b.items()
             if k not in ("tokens", "label_tokens")}
        with w.autocast:
            loss, count = loss_sum(engine, b, collate.encoder_decoder, cfg.objective)
        engine.backward(loss * scale)
        engine.step()  # steps the optimizer and lr schedule at the accumulation boundary only
        total += torch.stack([loss.detach().double(), count.double()])
    return total


def _train_epoch(engine, collate: Collator, data: Examples, state: dict, epoch: int, plan: tuple[int, int],
                 w: Worker, progress: Progress) -> list[float]:
    """The epoch's steps from where the state stands; returns each step's loss per label token (every rank's)."""
    import torch  # heavy: workers only
    import torch.distributed as dist

    per_epoch, total_steps = plan
    engine.train()
    sums, started = [], time.perf_counter()
    steady_from, steady_tokens = started, state["tokens"]
    progress_from = (time.perf_counter(), state["tokens"])
    for s, mine, global_labels, global_tokens in _global_batches(data, w.cfg, epoch, per_epoch, w):
        if s < state["step"] - epoch * per_epoch:
            continue  # done before the checkpoint this run resumed from
        if state["step"] >= total_steps:
            break
        sums.append(_loss_step(engine, collate, data, mine, global_labels, w))  # summed over ranks at the end
        state["step"] += 1
        state["tokens"] += global_tokens  # the global batch's real tokens
        state["examples"] += w.cfg.batch_size
        tokens_per_s = (state["tokens"] - progress_from[1]) / max(time.perf_counter() - progress_from[0], 1e-9)
        progress.update(1, epoch=epoch + 1, tokens_per_s=f"{tokens_per_s:.0f}")
        if state["step"] == STEADY_AFTER:  # one sync, here only: the steady-state clock starts
            if w.cfg.use_gpu:
                torch.cuda.synchronize()
            steady_from, steady_tokens = time.perf_counter(), state["tokens"]
    if w.cfg.use_gpu:
        torch.cuda.synchronize()
    state["train_s"] += time.perf_counter() - started
    if state["step"] > STEADY_AFTER:
        state["steady_s"] += time.perf_counter() - steady_from
        state["steady_tokens"] += state["tokens"] - steady_tokens
    if not sums:
        return []
    totals = torch.stack(sums)
    dist.all_reduce(totals)  # no extra sync point per step: once per epoch
    return [loss / max(n, 1.0) for loss, n in totals.tolist()]


def _dev_step(engine, tokenizer, samples: list, epoch: int, step: int, state: dict, dev: dict, w: Worker) -> bool:
    """Dev accuracy after an epoch (every rank gets the same result, so they decide and save together); the best
    epoch's weights kept as a candidate (the best and the one before it); returns whether patience ran out."""
    cfg = w.cfg
    result = _dev_accuracy(engine, tokenizer, samples, cfg, dev["max_new_tokens"], dev["chat"], w.autocast,
                           dev["stage"] == 3)
    scalars = {k: v for k, v in result.items() if v is None or isinstance(v, (int, float, str, bool))}
    state["dev"].append({"epoch": epoch + 1, "step": step, **scalars, "outcomes": result["outcomes"]})
    if state["best"] is None or result["accuracy"] > state["best"]["accuracy"]:  # ties: the earlier epoch
        state["best"] = {"epoch": epoch + 1, "accuracy": result["accuracy"]}
        if cfg.selects:
            gathered = _full_state_dict(engine, dev["stage"])  # every rank helps under ZeRO-3
            if w.rank == 0:
                selection = {"epoch": epoch + 1, "dev_accuracy": result["accuracy"], "selection": cfg.selection}
                candidates = Path(cfg.output_dir) / "candidates"
                _save(engine.module, tokenizer, candidates / f"epoch_{epoch + 1:03d}", gathered, selection)
                for old in sorted(candidates.glob("epoch_*"))[:-2]:  # keep the best and the one before it
                    shutil.rmtree(old, ignore_errors=True)
    since_best = sum(d["epoch"] > state["best"]["epoch"] for d in state["dev"])
    return bool(cfg.patience and since_best >= cfg.patience)


def _account(state: dict, usage: Usage, w: Worker) -> None:
    """Every worker's CPU and GPU time this epoch, summed, and the largest worker's peak memory (in the state, and
    so in the checkpoint)."""
    import torch  # heavy: workers only
    import torch.distributed as dist

    used = usage.take()
    spent = torch.tensor([used["cpu_s"], used["gpu_s"]], dtype=torch.float64, device=w.device)
    dist.all_reduce(spent)
    state["cpu_s"] += spent[0].item()
    state["gpu_s"] += spent[1].item()
    peak = torch.tensor([_peak_memory_mb(w.cfg.use_gpu)], dtype=torch.float64, device=w.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    state["peak_memory_mb"] = max(state.get("peak_memory_mb", 0.0), round(peak.item(), 1))


def _save_student(engine, tokenizer, state: dict, epoch: int, stage: int, model_path: str, w: Worker) -> Path:
    """The student in output_dir/model: the best dev epoch's candidate (selection best_dev) or these weights
    (ZeRO-3: gathered by every rank); a LoRA student's merged copy beside, when asked."""
    cfg, model_dir = w.cfg, Path(w.cfg.output_dir) / "model"
    if cfg.selects:
        _select(model_dir, Path(cfg.output_dir) / "candidates", state["best"]["epoch"], w.rank)
        state["selected_epoch"] = state["best"]["epoch"]
    else:
        gathered = _full_state_dict(engine, stage)
        if w.rank == 0:
            _save(engine.module, tokenizer, model_dir, gathered, {"epoch": epoch + 1, "selection": "last"})
        state["selected_epoch"] = epoch + 1
    if cfg.lora is not None and cfg.lora.merge and w.rank == 0:
        _merge(model_dir, model_path)
    return model_dir


def _checkpoint(engine, state: dict, metrics: dict, epoch: int, rank: int, last: bool) -> None:
    """The epoch's DeepSpeed checkpoint (each rank writes its shards) and the state, reported to Ray Train. The
    last one is the state alone: the student is saved by then, and a restart after it has nothing left to resume
    (weights and optimizer would be ~15 bytes a parameter on disk, written for nothing and kept after the run)."""
    import ray.train  # heavy: workers only

    with tempfile.TemporaryDirectory() as tmp:
        if not last:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, save_latest=False)
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        # Result.metrics is the last checkpoint's metrics: the summary travels with the last one.
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 or not last else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:03d}")


def train_loop(config: dict) -> None:
    """One Ray Train worker: the recipe, top to bottom (module doc)."""
    worker_started, usage = time.time(), Usage()
    cfg = TrainConfig.model_validate(config["cfg"])
    w = _setup_worker(cfg)
    cfg = w.cfg  # with the precision the group decided
    from transformers import AutoTokenizer  # heavy: workers only

    model_path = config["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model, encoder_decoder = _student(cfg, model_path, w.device)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    collate = Collator(tokenizer, cfg.max_length, encoder_decoder, cfg.packing)
    data = _setup_data(collate, w, config["sharded"])
    plan = (config["steps_per_epoch"], config["total_steps"])
    engine, stage = _setup_engine(cfg, model, parameters, plan[1], w)
    state = _resume(engine, w, data, collate)
    run = _wandb_run(cfg, state) if w.rank == 0 else None
    samples = [Sample(**s) for s in config["dev_samples"]]
    dev = {"max_new_tokens": config["dev_max_new_tokens"], "stage": stage,
           "chat": uses_chat(cfg.chat_template, tokenizer, encoder_decoder)}  # how the dev questions are asked
    state["startup_s"] = round(time.time() - worker_started, 1)  # imports, data, model, deepspeed, resume
    # Rank 0's progress, on its stdout: Ray forwards it to the driver's terminal and to the job's logs. The process's
    # own stdout: with W&B wrapping sys.stdout, Ray Train's print patch sends a line to both it and its logger (twice).
    progress = Progress("train", plan[1], "steps", enabled=w.rank == 0, stream=sys.__stdout__, done=state["step"])
    for epoch in range(state["epoch"], cfg.epochs):
        if state["step"] >= plan[1] or state.get("stopped_early"):
            break
        losses = _train_epoch(engine, collate, data, state, epoch, plan, w, progress)
        step = state["step"]
        for i, loss in enumerate(losses if run is not None else []):
            run.log({"train/loss": loss, "train/epoch": epoch}, step=step - len(losses) + i + 1)
        state["epoch"] = epoch + 1
        state["loss_curve"] += [round(x, 5) for x in losses]
        state["epoch_loss"].append(round(sum(losses) / max(len(losses), 1), 5))
        metrics = {"epoch": epoch + 1, "step": step, "loss": state["epoch_loss"][-1], "lr": engine.get_lr()[0],
                   "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1)}
        last = epoch + 1 == cfg.epochs or step >= plan[1]
        if samples and ((epoch + 1) % cfg.dev.every == 0 or last):
            if _dev_step(engine, tokenizer, samples, epoch, step, state, dev, w) and not last:
                state["stopped_early"], last = epoch + 1, True
        if state["dev"]:
            metrics["dev_accuracy"] = state["dev"][-1]["accuracy"]
        _account(state, usage, w)
        if last:  # the student is saved before the last report: a restart after it has nothing left to do
            model_dir = _save_student(engine, tokenizer, state, epoch, stage, model_path, w)
            metrics.update(_summary(state, plan[1], model_dir, encoder_decoder, parameters),
                           trainable_parameters=trainable, zero_stage=stage)
        if run is not None:
            run.log({f"epoch/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        _checkpoint(engine, state, metrics, epoch, w.rank, last)
        if last:
            break
    progress.close()
    if run is not None:
        run.finish()


def _dev_accuracy(engine, tokenizer, samples, cfg: TrainConfig, max_new_tokens: int, chat: bool, autocast,
                  zero3: bool) -> dict:
    """Dev accuracy with every rank answering an equal share of the questions (the last one repeated to even them
    out), so no rank waits in a collective while another generates; under ZeRO-3 all ranks generate together
    (`synced_gpus`) from their partitions, and no full copy of the weights is built. The ranks' scores are
    gathered in the samples' order; every rank returns the same summary."""
    import ray.train  # heavy: workers only
    import torch
    import torch.distributed as dist

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    share = -(-len(samples) // world)
    mine = [samples[min(i, len(samples) - 1)] for i in range(rank * share, (rank + 1) * share)]
    model = engine.module
    trained_with = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # generation pads: the padding mask needs plain SDPA
    with torch.no_grad(), autocast:  # the precision the student trains (and is tested) in
        scores = dev_scores(model, tokenizer, mine, cfg.dev.format, max_new_tokens, cfg.dev.batch_size, chat,
                            synced_gpus=zero3)
    model.set_attn_implementation(trained_with)
    engine.train()
    parts = [None] * world
    dist.all_gather_object(parts, scores)
    return dev_summary(samples, [x for part in parts for x in part][:len(samples)])


def _peak_memory_mb(gpu: bool) -> float:
    """This worker's peak memory: CUDA memory allocated on a GPU, else the process's peak resident set."""
    if gpu:
        import torch  # heavy: workers only

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _merge(model_dir: Path, base: str) -> None:
    """A LoRA student's merged copy (model/merged): its base, unquantized, with the adapter folded in."""
    import torch  # heavy: rank 0, once
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    merged = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), str(model_dir))
    _save(merged.merge_and_unload(), AutoTokenizer.from_pretrained(model_dir), model_dir / "merged")


def _select(model_dir: Path, candidates: Path, epoch: int, rank: int) -> None:
    """Make the best dev epoch's candidate the student (rank 0), and drop the other candidates."""
    if rank != 0:
        return
    chosen = candidates / f"epoch_{epoch:03d}"
    if chosen.is_dir():
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(chosen, model_dir)
    elif not (model_dir / SELECTION_FILE).exists() or read_json(model_dir / SELECTION_FILE)["epoch"] != epoch:
        raise FcotError(f"{chosen}: the selected epoch's weights are missing; rerun training from scratch")
    shutil.rmtree(candidates, ignore_errors=True)


def _summary(state: dict, total_steps: int, model_dir: Path, encoder_decoder: bool, parameters: int) -> dict:
    summary = {"steps": state["step"], "planned_steps": total_steps, "epochs": state["epoch"],
               "final_loss": state["loss_curve"][-1] if state["loss_curve"] else None,
               "loss_curve": state["loss_curve"], "epoch_loss": state["epoch_loss"],
               "tokens": state["tokens"], "train_s": round(state["train_s"], 3),
               "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
               "examples_per_s": round(state["examples"] / max(state["train_s"], 1e-9), 2),
               "startup_s": state["startup_s"], "resumed_from_step": state["resumed_from_step"],
               "restarts": state["restarts"], "model_dir": str(model_dir), "encoder_decoder": encoder_decoder,
               "parameters": parameters, "dev": state["dev"], "selected_epoch": state["selected_epoch"],
               "stopped_early": state.get("stopped_early"),
               "steady": {"tokens": state["steady_tokens"], "seconds": round(state["steady_s"], 3),
                          "tokens_per_s": round(state["steady_tokens"] / max(state["steady_s"], 1e-9), 1)},
               "cpu_s": round(state["cpu_s"], 1), "gpu_s": round(state["gpu_s"], 1),
               "peak_memory_mb": state.get("peak_memory_mb"), "examples_per_worker": state["examples_held"],
               "objective": state.get("objective"), "kd_tokens": state.get("kd_tokens"),
               "precision": state.get("precision")}
    if state["best"] is not None:
        summary.update(best_dev_accuracy=state["best"]["accuracy"], best_epoch=state["best"]["epoch"])
        selected = next((d for d in state["dev"] if d["epoch"] == state["selected_epoch"]), None)
        summary["selected_dev_accuracy"] = selected["accuracy"] if selected else None
        summary["selected_dev_accuracy_ci"] = accuracy_interval(selected["outcomes"]) if selected else None
    return summary


def _curation_stats(data: str) -> dict:
    """The stats.json curation wrote beside the data ({} for data curated elsewhere)."""
    stats = Path(data).parent / "stats.json"
    return read_json(stats) if stats.exists() else {}


def max_length(cfg: TrainConfig, stats: dict) -> int:
    """train.max_length: the curation's unless set; set and different, an error."""
    curated = stats.get("max_length")
    if cfg.max_length is not None and curated is not None and cfg.max_length != curated:
        raise FcotError(f"train.max_length ({cfg.max_length}) differs from curate.max_length ({curated}) of "
                        f"{cfg.data}: curation kept pairs by its own limit; leave train.max_length unset to follow it")
    return cfg.max_length or curated or DEFAULT_MAX_LENGTH


def _longest_completion(data: str, stats: dict) -> int:
    """The longest completion the student is asked for at test time: curation's stats (the method's asked task),
    else the longest curated completion."""
    import pyarrow.dataset as pads  # only the driver, once

    if stats.get("completion_length_max"):
        return int(stats["completion_length_max"])
    ds = pads.dataset(data, format="parquet")
    if "completion_length" in ds.schema.names:
        return int(max(ds.to_table(columns=["completion_length"]).column("completion_length").to_pylist()))
    return 128 - AUTO_MARGIN


def _plan(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """The driver's decisions before any Ray work, each checked against the data: the curated rows, whether each
    worker holds only its part, the max length (curation's), the steps (the precision is the workers'), the
    model's local path, the dev questions and how long their answers may be. Returns the config as the workers get
    it, and the workers' other arguments."""
    kd = cfg.objective.graded
    rows = check_curated(cfg.data, kd)
    # A KD row's top-k are ~100x its text: sharded from the first row, so a worker holds only its part's.
    auto = rows >= SHARD_ROWS or kd
    sharded = cfg.num_workers > 1 and (cfg.shard_data is True or (cfg.shard_data == "auto" and auto))
    stats = _curation_stats(cfg.data)
    cfg = cfg.model_copy(update={"max_length": max_length(cfg, stats)})
    per_epoch, total_steps = plan_steps(cfg, rows)
    dev_samples = []
    if cfg.dev is not None:
        asked(cfg.dev.format)  # a method or a prompt format: named wrong, the error names it now
        dev_samples = [s.to_dict() | {"choices": s.choices} for s in load_dev_samples(cfg.dev)]
    if not dev_samples:  # no dev set (or an empty one): nothing to select on, the last epoch is the student
        cfg = cfg.model_copy(update={"dev": None})
    dev_tokens = cfg.dev.max_new_tokens if cfg.dev and cfg.dev.max_new_tokens != "auto" else (
        _longest_completion(cfg.data, stats) + AUTO_MARGIN)
    return cfg, {"model_path": resolve_model(cfg.model), "steps_per_epoch": per_epoch, "total_steps": total_steps,
                 "dev_samples": dev_samples, "dev_max_new_tokens": dev_tokens, "sharded": sharded, "rows": rows}


def _tune_callbacks(cfg: TrainConfig) -> list:
    """In a Tune trial: each epoch's metrics go to Tune, where schedulers act on them."""
    if not cfg.report_to_tune:
        return []
    from ray.tune.integration.ray_train import TuneReportCallback  # heavy: in a Tune trial only

    class ScalarTuneReport(TuneReportCallback):
        # Tune's loggers take scalars; the last epoch's summary also holds lists (dev outcomes, loss curve),
        # which TensorBoard refuses with a screenful of warning per trial. The stage result keeps them.
        def after_report(self, run_context, metrics, checkpoint):
            scalars = [{k: v for k, v in m.items() if v is None or isinstance(v, (bool, int, float, str))}
                       for m in metrics]
            super().after_report(run_context, scalars, checkpoint)

    return [ScalarTuneReport()]


def _fit(cfg: TrainConfig, loop_config: dict, datasets: dict):
    """Ray Train's TorchTrainer over `train_loop`, fitted: its result, or a message naming the key when the cluster
    cannot place the workers."""
    from ray.train import CheckpointConfig, ControllerError, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer  # heavy: where Ray work starts

    # heavy, as ray above: the failure and the wait of a worker group the cluster cannot place (Ray Train's own)
    from ray.train.v2._internal.constants import DEFAULT_WORKER_GROUP_START_TIMEOUT_S as GROUP_START_S
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR as GROUP_START_S_VAR
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    # Ray Train starts a preemption watcher actor with every worker group (read from the driver's environment),
    # for code that checkpoints on a node's drain notice. This trainer does not: a lost node restarts the group from
    # the last epoch checkpoint. Off unless the user turns it on (the actor costs ~3 s per training on 2 cores).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str(Path(cfg.output_dir) / "checkpoints"),
                             callbacks=_tune_callbacks(cfg),
                             # A worker group that cannot be placed (a node lost, none added) is a controller
                             # failure, which Ray Train retries forever by default: a bounded number of tries.
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=PLACEMENT_TRIES - 1),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # a worker reads "train" whole, or its own part
    )
    try:
        return trainer.fit()
    except ControllerError as e:
        if not isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        gpus = " and a GPU" if cfg.use_gpu else ""
        wait = os.environ.get(GROUP_START_S_VAR) or f"{GROUP_START_S:g}"
        raise FcotError(
            f"train.num_workers: the cluster could not place {cfg.num_workers} training workers "
            f"(train.cpus_per_worker={cfg.cpus_per_worker}{gpus} each) in {PLACEMENT_TRIES} tries of "
            f"{wait} s, as after a node lost and none to "
            "take its place; finished epochs are kept: the same command resumes from the last checkpoint once the "
            "cluster has room (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S waits longer for an autoscaler)") from None


def train(cfg: TrainConfig) -> dict:
    """Fine-tune a student on curated data; returns the summary (also OUTPUT_DIR/summary.json).

    Re-running with the same output_dir continues that run from its last epoch checkpoint.
    """
    import ray  # heavy: only where Ray work starts

    cfg, plan = _plan(cfg)
    rows, sharded = plan.pop("rows"), plan["sharded"]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.time(), cpu_seconds(children=False)
    init_ray(cfg.ray_address)
    # Read once, here, before the workers take the CPUs: on a small machine Ray Data's read tasks would wait for a
    # free core behind them. The workers then only take the blocks from the object store.
    dataset = ray.data.read_parquet(cfg.data)
    columns = [*REQUIRED, WEIGHT_KEY, *[TEACHER_LOGPROBS] * cfg.objective.graded]
    dataset = dataset.select_columns([c for c in columns if c in dataset.columns()]).materialize()
    if sharded:  # rank r's part: the r-th of num_workers contiguous ranges, the same at every (re)start of the group
        n, world = dataset.count(), cfg.num_workers
        parts = dataset.split_at_indices([n * r // world for r in range(1, world)])
        datasets = {f"train_{r}": part for r, part in enumerate(parts)}
    else:
        datasets = {"train": dataset}
    result = _fit(cfg, {"cfg": cfg.model_dump(), **plan}, datasets)
    summary = {"output_dir": str(out), "data": cfg.data, "model": cfg.model, "rows": rows, "sharded_data": sharded,
               "steps_per_epoch": plan["steps_per_epoch"], **result.metrics,
               "wall_s": round(time.time() - started, 2),
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    summary["cpu_s"] = round(summary.get("cpu_s", 0.0) + cpu_seconds(children=False) - cpu_started, 1)
    atomic_write_json(out / "summary.json", summary)
    return summary
