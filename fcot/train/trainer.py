"""The student stage on Ray Train: data-parallel fine-tuning with DeepSpeed ZeRO, resumable per epoch.

    driver: validate data + config -> Ray Data dataset -> TorchTrainer(num_workers) -> summary.json
    worker: model + tokenizer -> deepspeed.initialize (ZeRO 0-3, a plain torch AdamW; DeepSpeed's
            cpu_adam only with offload_optimizer) -> resume from ray.train.get_checkpoint()
            -> per epoch: micro-batches from get_dataset_shard("train"), token-weighted loss, optimizer
               step every grad_accum micro-batches; dev eval on rank 0; DeepSpeed checkpoint reported
               with ray.train.report (every rank writes its shard, Ray merges them)
            -> final student: save_pretrained + tokenizer in output_dir/model (ZeRO-3 weights gathered)

A worker that dies restarts the whole group (FailureConfig) from the last epoch checkpoint; the step
counter, lr schedule and optimizer state come back with it, so the run ends after the planned steps.
(A checkpoint counts once Ray Train's controller has collected every worker's report for it: a worker lost
before that takes the run back to the previous one.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from fcot.errors import FcotError
from fcot.io import atomic_write_json
from fcot.train.config import TrainConfig
from fcot.train.data import COLUMNS, IGNORE, check_curated, load_dev_samples

STATE_FILE = "trainer_state.json"
CHECKPOINT_TAG = "deepspeed"


def plan_steps(cfg: TrainConfig, rows: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps). A partial last batch is dropped (a different one each epoch)."""
    per_epoch = rows // cfg.batch_size
    if per_epoch == 0:
        raise FcotError(f"data {cfg.data}: {rows} examples, fewer than batch_size={cfg.batch_size}")
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def deepspeed_config(cfg: TrainConfig) -> dict:
    precision = cfg.resolved_precision
    zero = {"stage": cfg.deepspeed.stage, "stage3_gather_16bit_weights_on_model_save": True}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,  # fcot logs its own metrics
        "wall_clock_breakdown": False,
    }


def _wandb_run(cfg: TrainConfig, state: dict):
    """A W&B run on rank 0 (None when disabled): offline without WANDB_API_KEY, resumed after a restart."""
    mode = cfg.wandb.mode
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    state.setdefault("wandb_id", uuid.uuid4().hex[:12])  # kept in checkpoints: a restarted group logs to the same run
    return wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, name=cfg.wandb.name, mode=mode,
                      id=state["wandb_id"], resume="allow", dir=str(Path(cfg.output_dir).resolve()),
                      config=cfg.model_dump(), settings=wandb.Settings(silent=True))


def _loss_sum(engine, batch: dict, encoder_decoder: bool):
    """Sum of token cross-entropies of a micro-batch (labels aligned with inputs, HF style)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    if encoder_decoder:
        decoder_input_ids = engine.module.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=decoder_input_ids, use_cache=False).logits
    else:
        # Packed rows carry position_ids and no attention_mask: transformers then masks attention per example.
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = engine(**inputs, use_cache=False).logits[:, :-1]
        labels = labels[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def _full_state_dict(engine, stage: int):
    """All ranks must call under ZeRO-3 (it gathers); returns the full state dict on rank 0, else None."""
    if stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # what transformers' Trainer and Accelerate use
    return None


def _evaluate(cfg: TrainConfig, engine, tokenizer, model_cls, dev_samples, encoder_decoder: bool, rank: int):
    """Dev accuracy on rank 0 (None elsewhere); under ZeRO-3 every rank helps gather the weights first."""
    import torch

    from fcot.evaluate import evaluate_model

    state_dict = _full_state_dict(engine, cfg.deepspeed.stage)
    if rank != 0:
        return None
    model = engine.module
    if state_dict is not None:  # ZeRO-3: rank 0's module holds only its partition; evaluate a full copy
        model = model_cls.from_config(engine.module.config)
        model.load_state_dict(state_dict)
        model.to(engine.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = evaluate_model(model, tokenizer, dev_samples, cfg.dev.format, encoder_decoder,
                                cfg.dev.max_new_tokens, cfg.dev.batch_size)
    model.train(was_training)
    return result


def _save_student(engine, tokenizer, out: Path, stage: int, rank: int) -> None:
    """save_pretrained + tokenizer into `out`, written beside it and renamed (a half-saved model never shows)."""
    state_dict = _full_state_dict(engine, stage)
    if rank != 0:
        return
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def train_loop(config: dict) -> None:
    """One Ray Train worker."""
    worker_started = time.time()
    cfg = TrainConfig.model_validate(config["cfg"])
    from fcot.train import ds_ops

    ds_ops.configure(cfg.use_gpu)  # before deepspeed is imported
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, get_scheduler
    from transformers.utils import logging as hf_logging

    from fcot.tasks import Sample
    from fcot.train.data import Collator

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]

    model_path = config["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder_decoder = bool(getattr(AutoConfig.from_pretrained(model_path), "is_encoder_decoder", False))
    model_cls = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    model = model_cls.from_pretrained(model_path, dtype=torch.float32)  # fp32 master weights; DeepSpeed casts for bf16
    collate = Collator(tokenizer, cfg.max_length, encoder_decoder, cfg.packing)

    if cfg.deepspeed.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's vectorized Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    else:  # a plain torch optimizer: ZeRO 0-3 shard it as well, and nothing needs compiling
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=total_steps))

    state = {"epoch": 0, "step": 0, "loss_curve": [], "epoch_loss": [], "dev": [], "tokens": 0,
             "examples": 0, "train_s": 0.0, "startup_s": None, "resumed_from_step": None, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=CHECKPOINT_TAG)  # weights, optimizer, lr scheduler
            state = json.loads((Path(d) / STATE_FILE).read_text())
        state["resumed_from_step"] = state["step"]
        state["restarts"] += 1
    run = _wandb_run(cfg, state) if rank == 0 else None
    dev_samples = [Sample(**s) for s in config["dev_samples"]] if config["dev_samples"] else None

    state["startup_s"] = round(time.time() - worker_started, 1)  # imports, model, deepspeed.initialize, resume
    shard = ray.train.get_dataset_shard("train")
    step = state["step"]
    for epoch in range(state["epoch"], cfg.epochs):
        if step >= total_steps:
            break
        engine.train()
        window, loss_sums, label_counts, epoch_steps = [], [], [], 0
        started = time.perf_counter()
        batches = shard.iter_torch_batches(batch_size=cfg.micro_batch_size, collate_fn=collate, prefetch_batches=2,
                                           local_shuffle_buffer_size=config["shuffle_buffer"],
                                           local_shuffle_seed=cfg.seed + epoch)
        for batch in batches:
            if step >= total_steps:
                break  # max_steps reached: every rank stops at the same step
            if epoch_steps == per_epoch:
                continue  # the partial last batch: read (all ranks read the same epoch) but not trained on
            window.append(batch)
            if len(window) < cfg.grad_accum:
                continue
            # Token-weighted loss over the global batch: DeepSpeed averages gradients over ranks and
            # micro-batches, so scale each micro-batch's loss sum by world * grad_accum / global label tokens.
            counts = torch.tensor([sum(int(b["label_tokens"]) for b in window), sum(int(b["tokens"]) for b in window)],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            scale = world * cfg.grad_accum / max(counts[0].item(), 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for b in window:
                b = {k: v.to(device) for k, v in b.items()}
                loss = _loss_sum(engine, b, encoder_decoder)
                engine.backward(loss * scale)
                engine.step()  # steps the optimizer and lr schedule at the accumulation boundary only
                loss_sum += loss.detach().double()
            loss_sums.append(loss_sum)  # summed over ranks once per epoch: no extra sync point per step
            label_counts.append(counts[0].item())
            window = []
            step += 1
            epoch_steps += 1
            state["tokens"] += int(counts[1].item())
            state["examples"] += cfg.batch_size
        state["train_s"] += time.perf_counter() - started
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
            result = _evaluate(cfg, engine, tokenizer, model_cls, dev_samples, encoder_decoder, rank)
            if result is not None:
                scalars = {k: v for k, v in result.items() if v is None or isinstance(v, (int, float, str, bool))}
                state["dev"].append({"epoch": epoch + 1, "step": step, **scalars})
                metrics["dev_accuracy"] = result["accuracy"]
        if last:  # the student is saved before the last report: a restart after it has nothing left to do
            model_dir = Path(cfg.output_dir).resolve() / "model"
            _save_student(engine, tokenizer, model_dir, cfg.deepspeed.stage, rank)
            metrics.update(_summary(state, total_steps, model_dir, encoder_decoder))
        if run is not None:
            run.log({f"epoch/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, save_latest=False)  # each rank writes its shards
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            # Result.metrics is the last checkpoint's metrics: the summary travels with the last one.
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
    if run is not None:
        run.finish()


def _summary(state: dict, total_steps: int, model_dir: Path, encoder_decoder: bool) -> dict:
    summary = {"steps": state["step"], "planned_steps": total_steps, "epochs": state["epoch"],
               "final_loss": state["loss_curve"][-1] if state["loss_curve"] else None,
               "loss_curve": state["loss_curve"], "epoch_loss": state["epoch_loss"],
               "tokens": state["tokens"], "train_s": round(state["train_s"], 3),
               "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
               "examples_per_s": round(state["examples"] / max(state["train_s"], 1e-9), 2),
               "startup_s": state["startup_s"], "resumed_from_step": state["resumed_from_step"],
               "restarts": state["restarts"], "model_dir": str(model_dir), "encoder_decoder": encoder_decoder,
               "dev": state["dev"]}
    if state["dev"]:
        best = max(state["dev"], key=lambda d: d["accuracy"])
        summary.update(best_dev_accuracy=best["accuracy"], best_epoch=best["epoch"])
    return summary


def train(cfg: TrainConfig) -> dict:
    """Fine-tune a student on curated data; returns the summary (also OUTPUT_DIR/summary.json).

    Re-running with the same output_dir continues that run from its last epoch checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fcot.models import resolve_model
    from fcot.ray_utils import init_ray

    rows = check_curated(cfg.data)
    per_epoch, total_steps = plan_steps(cfg, rows)
    model_path = resolve_model(cfg.model)
    dev_samples = []
    if cfg.dev is not None:
        import importlib.util

        from fcot.prompts import get_format

        if importlib.util.find_spec("fcot.evaluate") is None:
            raise FcotError("dev: per-epoch evaluation needs fcot.evaluate (not installed); remove the dev section")
        get_format(cfg.dev.format)
        dev_samples = [s.to_dict() | {"choices": s.choices} for s in load_dev_samples(cfg.dev)]

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    init_ray(cfg.ray_address)
    # Read and shuffle once (curated data comes grouped by task) before the workers take the CPUs: on a small
    # machine Ray Data would wait for a free core. Each epoch then reshuffles each worker's shard locally.
    dataset = (ray.data.read_parquet(str(Path(cfg.data).resolve())).select_columns(list(COLUMNS))
               .random_shuffle(seed=cfg.seed).materialize())
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "model_path": model_path, "steps_per_epoch": per_epoch,
                           "total_steps": total_steps, "dev_samples": dev_samples,
                           "shuffle_buffer": min(rows, 10_000)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str(out / "checkpoints"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    summary = {"output_dir": str(out), "data": cfg.data, "model": cfg.model, "rows": rows,
               "steps_per_epoch": per_epoch, **result.metrics, "wall_s": round(time.time() - started, 2),
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    atomic_write_json(out / "summary.json", summary)
    return summary
