"""The student stage on Ray Train: data-parallel fine-tuning with DeepSpeed ZeRO, resumable per epoch.

    driver: validate data + config -> Ray Data dataset -> TorchTrainer(num_workers) -> summary.json
    worker: the curated set read and tokenized once: whole, or (shard_data, a large set) only this rank's rows
            r, r + world, ..., every rank's label token counts gathered once -> model -> deepspeed.initialize
            (ZeRO 0-3, a plain torch AdamW; DeepSpeed's cpu_adam only with offload_optimizer) -> resume from
            ray.train.get_checkpoint()
            -> per epoch: one seeded order of all examples cut into global batches, rank r training on the r-th
               slice of each (sharded: each rank's seeded order of its part, a global batch being every rank's
               next slice), in grad_accum micro-batches, with the loss weighted by the global batch's label tokens
               (every rank knows them: no collective per step)
            -> after each epoch: dev accuracy on rank 0 (sent to every rank, and to Tune in a sweep); the best
               epoch's weights kept as a candidate; a DeepSpeed checkpoint reported with ray.train.report;
               with train.patience, the last epoch once that many dev evaluations have not beaten the best
            -> the student: the best dev epoch (selection best_dev) or the last one, save_pretrained + tokenizer
               in output_dir/model (ZeRO-3 weights gathered)

A worker that dies restarts the whole group (FailureConfig) from the last epoch checkpoint; the step
counter, lr schedule, optimizer state and data order come back with it, so the run ends after the planned
steps. (A checkpoint counts once Ray Train's controller has collected every worker's report for it: a worker
lost before that takes the run back to the previous one.)
"""

from __future__ import annotations

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
from fcot.errors import FcotError
from fcot.evaluate import AUTO_MARGIN, dev_scores, dev_summary
from fcot.hardware import use_cpus
from fcot.io import atomic_write_json, read_json
from fcot.methods import asked, uses_chat
from fcot.models import resolve_model
from fcot.progress import Progress
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.stats import accuracy_interval
from fcot.tasks import Sample
from fcot.teacher.store import RecordStore
from fcot.train import ds_ops
from fcot.train.config import TrainConfig
from fcot.train.data import COLUMNS, IGNORE, WEIGHT_KEY, Collator, check_curated, load_dev_samples, teacher_targets

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


def _loss_sum(engine, batch: dict, encoder_decoder: bool, objective=None):
    """Sum of token cross-entropies of a micro-batch (labels aligned with inputs, HF style); with a kd `objective`
    (and the batch's teacher targets) (1 - alpha) x that + alpha x T^2 x the sum of KL(teacher || student)."""
    import torch.nn.functional as F  # heavy: workers only

    labels = batch["labels"]
    if encoder_decoder:
        decoder_input_ids = engine.module.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=decoder_input_ids, use_cache=False).logits
    else:
        # A packed row carries position_ids and where each example starts, for fcot.train.attention.
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q",
                                        "max_length_q") if k in batch}
        # Logits only where some row's next token is a target: the vocabulary head and the loss skip the prompt.
        width = labels.shape[1]
        labels = labels[:, 1:]
        keep = (labels != IGNORE).any(0).nonzero().squeeze(1)
        logits = engine(**inputs, use_cache=False, logits_to_keep=keep).logits
        labels = labels[:, keep]
    # cross_entropy is log_softmax then nll_loss: done apart, KD at T = 1 reads the same log-softmax.
    logprobs = F.log_softmax(logits.float(), -1).flatten(0, 1)
    if "weights" not in batch:
        ce = F.nll_loss(logprobs, labels.flatten(), ignore_index=IGNORE, reduction="sum")
    else:  # a method with several tasks (fcot.methods): each token's loss times its task's weight
        weights = batch["weights"] if encoder_decoder else batch["weights"][:, 1:][:, keep]
        ce = (F.nll_loss(logprobs, labels.flatten(), ignore_index=IGNORE, reduction="none") * weights.flatten()).sum()
    if objective is None or objective.kind != "kd" or not len(batch.get("kd_at", ())):
        return ce if objective is None or objective.kind != "kd" else (1 - objective.alpha) * ce
    # The label at (row, p) is predicted by the logits at p - 1, which sit in `keep`'s column of p - 1.
    column = keep.new_full((width - 1,), -1)
    column[keep] = keep.new_tensor(range(len(keep)))
    at = batch["kd_at"] // width * len(keep) + column[batch["kd_at"] % width - 1]  # a row of `logprobs`
    ids, t = batch["kd_ids"], objective.temperature
    if t == 1:  # k values per position, read in place: no copy of whole-vocabulary rows
        kd = kl_sum(logprobs[at.unsqueeze(1), ids], batch["kd_logprobs"], t)
    else:
        kd = kd_sum(logits.flatten(0, 1)[at], ids, batch["kd_logprobs"], t)
    return (1 - objective.alpha) * ce + objective.alpha * kd


def kd_sum(student_logits, top_ids, top_logprobs, temperature: float):
    """KD's term from the student's logits at the target positions (one row per position): see kl_sum."""
    import torch  # heavy: workers only

    student = torch.log_softmax(student_logits.float() / temperature, -1).gather(-1, top_ids)
    return kl_sum(student, top_logprobs, temperature)


def kl_sum(student, top_logprobs, temperature: float):
    """T^2 x the sum over positions of KL(p || q): p the teacher's top-k renormalized at temperature T (softmax of
    its logprobs / T over the k), q the student's softmax over its whole vocabulary at T, `student` its log q at
    the k ids."""
    import torch  # heavy: workers only

    teacher = torch.log_softmax(top_logprobs.float() / temperature, -1)
    return temperature ** 2 * (teacher.exp() * (teacher - student)).sum()


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


def _read_examples(collate: Collator, cfg: TrainConfig, rank: int, world: int) -> tuple[list, list[float], list]:
    """The curated set tokenized once: whole, or with `world` > 1 only rows rank, rank + world, ... (the rows
    arrive in the curated order on every rank); each example's loss weight (its task's: the TrainConfig field
    the curated row names, else 1); and for a KD student each example's teacher targets (else an empty list)."""
    import ray.train  # heavy: workers only

    teacher = _teacher_logprobs(cfg) if cfg.objective.kind == "kd" else None
    examples, weights, targets, seen = [], [], [], 0
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=4096, batch_format="numpy"):
        n = len(batch["prompt"])
        mine = slice((rank - seen) % world, n, world)  # global row seen + j is this rank's when it is rank mod world
        seen += n
        prompts, completions = batch["prompt"][mine], batch["completion"][mine]
        encoded = collate.encode(prompts, completions)
        examples += encoded
        keys = batch[WEIGHT_KEY][mine] if WEIGHT_KEY in batch else [""] * len(prompts)
        weights += [float(getattr(cfg, str(k))) if k else 1.0 for k in keys]
        if teacher is not None:
            rows = zip(batch["task"][mine], batch["index"][mine], batch["sample_index"][mine])
            targets += [teacher_targets(e, teacher[(str(t), int(i), int(k))]) for e, (t, i, k) in zip(encoded, rows)]
    return examples, weights, targets


def _teacher_logprobs(cfg: TrainConfig) -> dict:
    """The KD teacher's logprobs of its records, by (task, index, sample index)."""
    table = RecordStore(cfg.objective.records).read(cfg.objective.teacher_id,
                                                     columns=["task", "index", "sample_index", "logprobs"])
    out = {(r["task"], r["index"], r["sample_index"]): r["logprobs"] for r in table.to_pylist()}
    if not out or any(v is None for v in out.values()):
        raise FcotError(f"train.objective kd: the records of teacher {cfg.objective.teacher_id} in "
                        f"{cfg.objective.records} carry no logprobs (teacher.sampling.logprobs)")
    return out


def train_loop(config: dict) -> None:
    """One Ray Train worker."""
    worker_started = time.time()
    usage = Usage()
    cfg = TrainConfig.model_validate(config["cfg"])
    use_cpus(cfg.cpus_per_worker)  # torch, OpenMP and the tokenizer: the worker's reserved CPUs
    for task in cfg.user_tasks:  # the dev set may score user tasks: make them known in this worker
        task.register()
    ds_ops.configure(cfg.use_gpu)  # before deepspeed is imported
    # heavy imports: a training worker's own
    import deepspeed
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from transformers import AutoTokenizer, get_scheduler
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in list(logging.root.manager.loggerDict):  # Ray Train logs each report whole (curves and all) at INFO
        if "ray/train" in name or name.startswith("ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(cfg.seed)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]

    model_path = config["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model, encoder_decoder = _student(cfg, model_path, device)
    if encoder_decoder and cfg.objective.kind == "kd":
        raise FcotError("key 'train.objective': kd trains decoder students (the teacher's token positions); "
                        f"{cfg.model} is an encoder-decoder")
    parameters = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, but for a LoRA student
    collate = Collator(tokenizer, cfg.max_length, encoder_decoder, cfg.packing)
    chat = uses_chat(cfg.chat_template, tokenizer, encoder_decoder)  # how the dev questions are asked
    sharded = config["sharded"]
    examples, weights, targets = _read_examples(collate, cfg, rank, world if sharded else 1)
    label_tokens = np.array([collate.label_tokens(e) for e in examples], dtype=np.float64)
    real_tokens = np.array([collate.tokens(e) for e in examples], dtype=np.int64)
    if sharded:  # every rank's counts, once: each rank then knows every global batch's label tokens
        counts = [None] * world
        dist.all_gather_object(counts, (label_tokens, real_tokens))
        label_tokens, real_tokens = [c[0] for c in counts], [c[1] for c in counts]

    if cfg.deepspeed.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorized Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    else:  # a plain torch optimizer: ZeRO 0-3 shard it as well, and nothing needs compiling. On CPUs its fused
        # kernel (one pass over all parameters) halves the optimizer's share of a step (bench/student.py).
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=None if cfg.use_gpu else True)
    schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    memory = torch.cuda.get_device_properties(device).total_memory if cfg.use_gpu else (
        psutil.virtual_memory().total / max(1, world))
    stage = zero_stage(cfg, parameters, memory, world, sum(p.numel() for p in trainable))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, stage),
        lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps))
    # bf16 on CPU: autocast over fp32 master weights (DeepSpeed's bf16 mode is for accelerators).
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.resolved_precision == "bf16" and not cfg.use_gpu)

    state = {"epoch": 0, "step": 0, "loss_curve": [], "epoch_loss": [], "dev": [], "tokens": 0, "examples": 0,
             "train_s": 0.0, "startup_s": None, "resumed_from_step": None, "restarts": 0, "best": None,
             "cpu_s": 0.0, "gpu_s": 0.0, "steady_tokens": 0, "steady_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=CHECKPOINT_TAG)  # weights, optimizer, lr scheduler
            state = json.loads((Path(d) / STATE_FILE).read_text())
        state["resumed_from_step"] = state["step"]
        state["restarts"] += 1
    state["examples_held"] = len(examples)  # by this worker (rank 0's is reported)
    state["objective"] = cfg.objective.kind
    if targets:  # of this worker's label tokens, those with the teacher's distribution (rank 0's is reported)
        state["kd_tokens"] = {"with_teacher": sum(map(len, targets)), "labels": int(sum(
            collate.label_tokens(e) for e in examples))}
    run = _wandb_run(cfg, state) if rank == 0 else None
    dev_samples = [Sample(**s) for s in config["dev_samples"]] if config["dev_samples"] else None
    out = Path(cfg.output_dir)
    candidates = out / "candidates"

    state["startup_s"] = round(time.time() - worker_started, 1)  # imports, data, model, deepspeed, resume
    step = state["step"]
    mb, accum = cfg.micro_batch_size, cfg.grad_accum
    # Rank 0's progress, on its stdout: Ray forwards it to the driver's terminal and to the job's logs. The process's
    # own stdout: with W&B wrapping sys.stdout, Ray Train's print patch sends a line to both it and its logger (twice).
    progress = Progress("train", total_steps, "steps", enabled=rank == 0, stream=sys.__stdout__, done=step)
    progress_from = (time.perf_counter(), state["tokens"])
    for epoch in range(state["epoch"], cfg.epochs):
        if step >= total_steps or state.get("stopped_early"):
            break
        engine.train()
        loss_sums, label_counts = [], []
        started = steady_from = time.perf_counter()
        steady_tokens = state["tokens"]
        if sharded:  # each rank's order of its part, the same on every rank
            orders = [np.random.default_rng([cfg.seed, epoch, r]).permutation(len(part))
                      for r, part in enumerate(label_tokens)]
        else:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))  # the same on every rank
        for s in range(step - epoch * per_epoch, per_epoch):
            if step >= total_steps:
                break
            if sharded:  # the global batch: every rank's next slice of its own order
                slices = [o[s * mb * accum:(s + 1) * mb * accum] for o in orders]
                global_labels = float(sum(label_tokens[r][x].sum() for r, x in enumerate(slices)))
                global_tokens = int(sum(real_tokens[r][x].sum() for r, x in enumerate(slices)))
                mine = slices[rank]
            else:
                batch_idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                global_labels, global_tokens = float(label_tokens[batch_idx].sum()), int(real_tokens[batch_idx].sum())
                mine = batch_idx[rank * mb * accum:(rank + 1) * mb * accum]
            # Token-weighted loss over the global batch: DeepSpeed averages gradients over ranks and
            # micro-batches, so scale each micro-batch's loss sum by world * grad_accum / global label tokens.
            scale = world * accum / max(global_labels, 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for a in range(accum):
                part = mine[a * mb:(a + 1) * mb]
                b = collate.collate([examples[i] for i in part], [weights[i] for i in part],
                                    [targets[i] for i in part] if targets else None)
                b = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in b.items()
                     if k not in ("tokens", "label_tokens")}
                with autocast:
                    loss = _loss_sum(engine, b, encoder_decoder, cfg.objective)
                engine.backward(loss * scale)
                engine.step()  # steps the optimizer and lr schedule at the accumulation boundary only
                loss_sum += loss.detach().double()
            loss_sums.append(loss_sum)  # summed over ranks once per epoch: no extra sync point per step
            label_counts.append(global_labels)
            step += 1
            state["tokens"] += global_tokens  # the global batch's real tokens
            state["examples"] += cfg.batch_size
            tokens_per_s = (state["tokens"] - progress_from[1]) / max(time.perf_counter() - progress_from[0], 1e-9)
            progress.update(1, epoch=epoch + 1, tokens_per_s=f"{tokens_per_s:.0f}")
            if step == STEADY_AFTER:  # one sync, here only: the steady-state clock starts
                if cfg.use_gpu:
                    torch.cuda.synchronize()
                steady_from, steady_tokens = time.perf_counter(), state["tokens"]
        if cfg.use_gpu:
            torch.cuda.synchronize()
        state["train_s"] += time.perf_counter() - started
        if step > STEADY_AFTER:
            state["steady_s"] += time.perf_counter() - steady_from
            state["steady_tokens"] += state["tokens"] - steady_tokens
        if loss_sums:
            totals = torch.stack(loss_sums)
            dist.all_reduce(totals)
            epoch_losses = [t / max(n, 1.0) for t, n in zip(totals.tolist(), label_counts)]
        else:
            epoch_losses = []
        if run is not None:
            for i, loss in enumerate(epoch_losses):
                run.log({"train/loss": loss, "train/epoch": epoch}, step=step - len(epoch_losses) + i + 1)
        state["step"], state["epoch"] = step, epoch + 1
        state["loss_curve"] += [round(x, 5) for x in epoch_losses]
        state["epoch_loss"].append(round(sum(epoch_losses) / max(len(epoch_losses), 1), 5))
        metrics = {"epoch": epoch + 1, "step": step, "loss": state["epoch_loss"][-1], "lr": engine.get_lr()[0],
                   "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1)}

        last = epoch + 1 == cfg.epochs or step >= total_steps
        if dev_samples and ((epoch + 1) % cfg.dev.every == 0 or last):
            result = _dev_accuracy(engine, tokenizer, dev_samples, cfg, config["dev_max_new_tokens"], chat, autocast,
                                   stage == 3)  # the same result on every rank: they decide (and save) together
            scalars = {k: v for k, v in result.items() if v is None or isinstance(v, (int, float, str, bool))}
            state["dev"].append({"epoch": epoch + 1, "step": step, **scalars, "outcomes": result["outcomes"]})
            if state["best"] is None or result["accuracy"] > state["best"]["accuracy"]:  # ties: the earlier epoch
                state["best"] = {"epoch": epoch + 1, "accuracy": result["accuracy"]}
                if cfg.selects:
                    gathered = _full_state_dict(engine, stage)  # every rank helps under ZeRO-3
                    if rank == 0:
                        selection = {"epoch": epoch + 1, "dev_accuracy": result["accuracy"], "selection": cfg.selection}
                        _save(engine.module, tokenizer, candidates / f"epoch_{epoch + 1:03d}", gathered, selection)
                        for old in sorted(candidates.glob("epoch_*"))[:-2]:  # keep the best and the one before it
                            shutil.rmtree(old, ignore_errors=True)
            since_best = sum(d["epoch"] > state["best"]["epoch"] for d in state["dev"])
            if cfg.patience and since_best >= cfg.patience and not last:
                state["stopped_early"] = epoch + 1
                last = True
        if state["dev"]:
            metrics["dev_accuracy"] = state["dev"][-1]["accuracy"]
        used = usage.take()  # every worker's CPU and GPU time this epoch, summed (kept in the checkpoint)
        spent = torch.tensor([used["cpu_s"], used["gpu_s"]], dtype=torch.float64, device=device)
        dist.all_reduce(spent)
        state["cpu_s"] += spent[0].item()
        state["gpu_s"] += spent[1].item()
        peak = torch.tensor([_peak_memory_mb(cfg.use_gpu)], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the largest worker's
        state["peak_memory_mb"] = max(state.get("peak_memory_mb", 0.0), round(peak.item(), 1))
        if last:  # the student is saved before the last report: a restart after it has nothing left to do
            model_dir = out / "model"
            if cfg.selects:
                _select(model_dir, candidates, state["best"]["epoch"], rank)
                state["selected_epoch"] = state["best"]["epoch"]
            else:
                gathered = _full_state_dict(engine, stage)
                if rank == 0:
                    _save(engine.module, tokenizer, model_dir, gathered,
                          {"epoch": epoch + 1, "selection": "last"})
                state["selected_epoch"] = epoch + 1
            if cfg.lora is not None and cfg.lora.merge and rank == 0:
                _merge(model_dir, model_path)
            metrics.update(_summary(state, total_steps, model_dir, encoder_decoder, parameters))
            metrics["trainable_parameters"] = sum(p.numel() for p in trainable)
            metrics["zero_stage"] = stage
        if run is not None:
            run.log({f"epoch/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, save_latest=False)  # each rank writes its shards
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            # Result.metrics is the last checkpoint's metrics: the summary travels with the last one.
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
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
               "objective": state.get("objective"), "kd_tokens": state.get("kd_tokens")}
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


def train(cfg: TrainConfig) -> dict:
    """Fine-tune a student on curated data; returns the summary (also OUTPUT_DIR/summary.json).

    Re-running with the same output_dir continues that run from its last epoch checkpoint.
    """
    import ray  # heavy: only where Ray work starts
    from ray.train import CheckpointConfig, ControllerError, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # heavy, as ray above: the failure and the wait of a worker group the cluster cannot place (Ray Train's own)
    from ray.train.v2._internal.constants import DEFAULT_WORKER_GROUP_START_TIMEOUT_S as GROUP_START_S
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR as GROUP_START_S_VAR
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    rows = check_curated(cfg.data)
    o = cfg.objective
    if o.kind == "kd" and not (o.records and o.teacher_id):
        raise FcotError("key 'train.objective': kd needs objective.records (the teacher's records/ folder) and "
                        "objective.teacher_id (fcot run sets both)")
    if o.kind == "kd":  # absolute: the workers run in other directories
        cfg = cfg.model_copy(update={"objective": o.model_copy(update={"records": str(Path(o.records).resolve())})})
    sharded = cfg.num_workers > 1 and (cfg.shard_data is True or (cfg.shard_data == "auto" and rows >= SHARD_ROWS))
    stats = _curation_stats(cfg.data)
    cfg = cfg.model_copy(update={"max_length": max_length(cfg, stats)})
    per_epoch, total_steps = plan_steps(cfg, rows)
    precision = cfg.precision_choice()  # chosen here, for the device the workers use; they get it as configured
    cfg = cfg.model_copy(update={"precision": precision.short})
    model_path = resolve_model(cfg.model)
    dev_samples = []
    if cfg.dev is not None:
        asked(cfg.dev.format)  # a method or a prompt format: named wrong, the error names it now
        dev_samples = [s.to_dict() | {"choices": s.choices} for s in load_dev_samples(cfg.dev)]
    if not dev_samples:  # no dev set (or an empty one): nothing to select on, the last epoch is the student
        cfg = cfg.model_copy(update={"dev": None})
    dev_tokens = cfg.dev.max_new_tokens if cfg.dev and cfg.dev.max_new_tokens != "auto" else (
        _longest_completion(cfg.data, stats) + AUTO_MARGIN)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.time(), cpu_seconds(children=False)
    init_ray(cfg.ray_address)
    # Read once, here, before the workers take the CPUs: on a small machine Ray Data's read tasks would wait for a
    # free core behind them. The workers then only take the blocks from the object store.
    dataset = ray.data.read_parquet(cfg.data)
    dataset = dataset.select_columns([c for c in [*COLUMNS, WEIGHT_KEY] if c in dataset.columns()]).materialize()
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    callbacks = []
    if cfg.report_to_tune:  # in a Tune trial: each epoch's metrics go to Tune, where schedulers act on them
        from ray.tune.integration.ray_train import TuneReportCallback  # heavy: in a Tune trial only

        class ScalarTuneReport(TuneReportCallback):
            # Tune's loggers take scalars; the last epoch's summary also holds lists (dev outcomes, loss curve),
            # which TensorBoard refuses with a screenful of warning per trial. The stage result keeps them.
            def after_report(self, run_context, metrics, checkpoint):
                scalars = [{k: v for k, v in m.items() if v is None or isinstance(v, (bool, int, float, str))}
                           for m in metrics]
                super().after_report(run_context, scalars, checkpoint)

        callbacks.append(ScalarTuneReport())
    # Ray Train starts a preemption watcher actor with every worker group (read from the driver's environment),
    # for code that checkpoints on a node's drain notice. This trainer does not: a lost node restarts the group from
    # the last epoch checkpoint. Off unless the user turns it on (the actor costs ~3 s per training on 2 cores).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "model_path": model_path, "steps_per_epoch": per_epoch,
                           "total_steps": total_steps, "dev_samples": dev_samples, "dev_max_new_tokens": dev_tokens,
                           "sharded": sharded},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str(out / "checkpoints"), callbacks=callbacks,
                             # A worker group that cannot be placed (a node lost, none added) is a controller
                             # failure, which Ray Train retries forever by default: a bounded number of tries.
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=PLACEMENT_TRIES - 1),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads the rows in order; keeps its own
    )
    try:
        result = trainer.fit()
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
    summary = {"output_dir": str(out), "data": cfg.data, "model": cfg.model, "rows": rows, "sharded_data": sharded,
               "precision": precision.to_dict(),
               "steps_per_epoch": per_epoch, **result.metrics, "wall_s": round(time.time() - started, 2),
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    summary["cpu_s"] = round(summary.get("cpu_s", 0.0) + cpu_seconds(children=False) - cpu_started, 1)
    atomic_write_json(out / "summary.json", summary)
    return summary
