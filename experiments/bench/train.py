"""Training throughput: fcot's trainer (Ray Train + DeepSpeed) vs a bare one-process PyTorch loop, and sequence
packing vs padding, on real chain-of-thought lengths, on the CPU or a GPU.

    .venv/bin/python experiments/bench/train.py [--gpu] [--steps 20] [--batch-size 32] [--precision fp32|bf16]
                                                [--workers N] [--stage auto|0|1|2|3] [--hidden 256] [--layers 4]

Data: the 175B teacher's zero-shot-CoT rationales that reached the gold answer (the Zero-shot-CoT authors'
logs in ../shared/data/teacher_logs), in the Fine-tune-CoT format. Model: a random Llama-family decoder
with a BPE tokenizer trained on those texts (or --model). Every number is tokens/s over real tokens
(prompt + completion + EOS, padding excluded), over the same number of optimizer steps of --batch-size
examples, after --warmup steps. The bare loop is the best plain loop we could write: the data tokenized once,
plain torch AdamW, the same loss and precision, all of the machine's cores (CPU) or the GPU. fcot runs
--workers Ray Train workers (CPU: one per core, each with one thread; GPU: one per GPU).
Setups run in interleaved rounds and keep their best round (other jobs on a shared machine skew single runs).
A fifth setup trains the same student as a LoRA student (--lora-r, all linear layers, packed) beside the full
fine-tune: its tokens/s and the workers' peak memory (resident set on CPU, allocated CUDA memory on a GPU) against
fcot packed. The last line is JSON: {"ratio_vs_bare": fcot padded / bare padded, "packing_speedup": fcot packed /
fcot padded, "lora_tokens_per_s_ratio", "lora_peak_memory_ratio": LoRA / full fine-tuning, "mfu": model-FLOPs
utilisation of fcot packed (GPU only: 6 x parameters x tokens/s over the GPU's bf16 peak)}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense bf16 FLOP/s


def teacher_rows(logs: Path) -> list[dict]:
    from fcot.prompts import FORMATS
    from fcot.teacher.logs import KOJIMA_DATASETS, parse_zero_shot_cot_log

    fmt = FORMATS["fine_tune_cot"]
    rows = []
    for path in sorted(logs.glob("*_zero_shot_cot.log")):
        for r in parse_zero_shot_cot_log(path):
            if r.pred_after and r.pred_after == r.gold and r.rationale.strip():  # kept by curation: correct
                rows.append({"task": r.task, "index": r.position, "sample_index": 0,
                             "prompt": fmt.render_prompt(r.question),
                             "completion": fmt.render_target(r.gold, r.rationale)})
    if not rows:
        sys.exit(f"no teacher logs in {logs} (known: {', '.join(KOJIMA_DATASETS)})")
    return rows


def bare_loop(model_path: str, rows: list[dict], args, packing: bool, device: str) -> dict:
    """The baseline: one process, plain torch AdamW, the data tokenized once, the same loss and precision."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcot.train.data import Collator
    from fcot.train.objectives import loss_sum

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).train()
    if packing:  # the same attention over packed rows as fcot's trainer
        from fcot.train import attention

        model.set_attn_implementation(attention.NAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    collate = Collator(tokenizer, 512, encoder_decoder=False, packing=packing)
    order = random.Random(0).sample(rows, len(rows))
    examples = collate.encode([r["prompt"] for r in order], [r["completion"] for r in order])
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    tokens, started = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        chunk = [examples[i % len(examples)] for i in range(step * args.batch_size, (step + 1) * args.batch_size)]
        batch = collate.collate(chunk)
        b = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()
             if k not in ("tokens", "label_tokens")}
        with autocast:
            loss = loss_sum(model, b, False)[0] / batch["label_tokens"].to(device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            tokens += int(batch["tokens"])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2)}


def fcot_trainer(work: Path, model_path: str, args, packing: bool, name: str, lora: bool = False) -> dict:
    from fcot.config import load_config
    from fcot.train.config import TrainConfig
    from fcot.train.trainer import train

    cfg = load_config(TrainConfig, None, [
        f"data={work / 'data'}", f"model={model_path}", f"output_dir={work / name}", f"num_workers={args.workers}",
        f"cpus_per_worker={args.cpus_per_worker}", f"deepspeed.stage={args.stage}", f"batch_size={args.batch_size}",
        f"max_steps={args.warmup + args.steps}", f"packing={str(packing).lower()}", "wandb.mode=disabled", "lr=3e-4",
        f"use_gpu={str(args.gpu).lower()}", f"precision={args.precision}", "epochs=1", "keep_checkpoints=1",
        *([f"lora.r={args.lora_r}"] if lora else [])])
    s = train(cfg)
    steady = s["steady"]  # the trainer's own count after its first --warmup steps
    return {"tokens_per_s": steady["tokens_per_s"], "tokens": steady["tokens"], "seconds": steady["seconds"],
            "startup_s": s["startup_s"], "wall_s": s["wall_s"], "steps": s["steps"], "stage": s.get("zero_stage"),
            "peak_memory_mb": s.get("peak_memory_mb"), "trainable_parameters": s.get("trainable_parameters")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="train on the GPU(s) (fcot: one worker per GPU)")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before measuring")
    # 32: 16 examples per worker on 2 workers. Packing saves what padding wastes, which grows with the micro-batch:
    # at the paper's 8 (4 per worker) padding wastes a quarter of the tokens, at 32 about 40% (see bench.md).
    parser.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (the paper: 8)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 where the device computes it natively, else fp32 (fcot.hardware)")
    parser.add_argument("--lora-r", type=int, default=16, help="the LoRA setup's rank (all linear layers)")
    parser.add_argument("--workers", type=int, default=None, help="fcot's workers (default: CPUs, or GPUs)")
    parser.add_argument("--stage", default="auto", help="fcot's ZeRO stage (default auto)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each setup keeps its best")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--model", help="a local model folder instead of the random Llama")
    parser.add_argument("--logs", default=str(ROOT.parent / "shared" / "data" / "teacher_logs"))
    parser.add_argument("--work", help="keep data, model and runs here (default: a temporary folder)")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from fcot.bundled import make_tiny_model
    from fcot.ray_utils import init_ray

    cpus = os.cpu_count() or 2
    gpus = torch.cuda.device_count() if args.gpu else 0
    if args.gpu and not gpus:
        sys.exit("--gpu: no CUDA device here")
    from fcot.hardware import choose

    args.precision = choose(args.precision, "cuda" if args.gpu else "cpu", "--precision").short
    args.workers = args.workers or (gpus if args.gpu else cpus)
    args.cpus_per_worker = max(1, cpus // args.workers) if not args.gpu else max(1, cpus // max(1, gpus) - 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="fcot-bench-train-"))
    rows = teacher_rows(Path(args.logs))
    (work / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), work / "data" / "part-0.parquet")
    model_path = args.model or str(make_tiny_model(
        work / "model", "llama", vocab_texts=[r["prompt"] + r["completion"] for r in rows], vocab_size=4096,
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=max(1, args.heads // 2)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())
    tok = AutoTokenizer.from_pretrained(model_path)
    lengths = [len(tok(r["prompt"] + r["completion"]).input_ids) + 1 for r in rows]
    device = "cuda" if args.gpu else "cpu"
    where = torch.cuda.get_device_name(0) if args.gpu else f"{cpus} CPUs"
    print(f"data: {len(rows)} correct teacher rationales, {sum(lengths) / len(lengths):.0f} tokens on average "
          f"({min(lengths)}-{max(lengths)}); model: {params / 1e6:.1f}M parameters; {args.steps} steps of "
          f"{args.batch_size} examples after {args.warmup}; {args.precision}; {where}; fcot: {args.workers} "
          f"worker(s), ZeRO {args.stage}", file=sys.stderr)

    init_ray(num_cpus=cpus)
    # Rounds interleave the four setups and each keeps its best round: on a shared machine other jobs
    # come and go, and a run that shared the cores with them says little about the code.
    runs = {"bare_padded": lambda r: bare_loop(model_path, rows, args, False, device),
            "bare_packed": lambda r: bare_loop(model_path, rows, args, True, device),
            "fcot_padded": lambda r: fcot_trainer(work, model_path, args, False, f"padded-{r}"),
            "fcot_packed": lambda r: fcot_trainer(work, model_path, args, True, f"packed-{r}"),
            "fcot_lora_packed": lambda r: fcot_trainer(work, model_path, args, True, f"lora-{r}", lora=True)}
    rounds = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            load = os.getloadavg()[0]
            out = run(r) | {"loadavg_before": round(load, 2)}
            rounds[name].append(out)
            print(f"round {r} {name:<12} {out['tokens_per_s']:>9.1f} tokens/s  ({out['tokens']} tokens in "
                  f"{out['seconds']:.1f} s; load average {load:.1f})", file=sys.stderr)
    results = {name: max(outs, key=lambda o: o["tokens_per_s"]) for name, outs in rounds.items()}
    ratio = results["fcot_padded"]["tokens_per_s"] / results["bare_padded"]["tokens_per_s"]
    packing = results["fcot_packed"]["tokens_per_s"] / results["fcot_padded"]["tokens_per_s"]
    bare_packing = results["bare_packed"]["tokens_per_s"] / results["bare_padded"]["tokens_per_s"]
    full, lora = results["fcot_packed"], results["fcot_lora_packed"]
    out = {"ratio_vs_bare": round(ratio, 3), "packing_speedup": round(packing, 3),
           "bare_packing_speedup": round(bare_packing, 3),
           "lora_tokens_per_s_ratio": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
           "lora_peak_memory_ratio": round(lora["peak_memory_mb"] / full["peak_memory_mb"], 3),
           "lora_trainable_parameters": lora["trainable_parameters"]}
    if args.gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            best = max(results["fcot_packed"]["tokens_per_s"], results["fcot_padded"]["tokens_per_s"])
            out["mfu"] = round(6 * params * best / (peak * args.workers), 4)
            out["bare_mfu"] = round(6 * params * results["bare_packed"]["tokens_per_s"] / peak, 4)
    print(f"LoRA r={args.lora_r} / full fine-tuning (packed): {out['lora_tokens_per_s_ratio']:.2f}x tokens/s, "
          f"{out['lora_peak_memory_ratio']:.2f}x peak memory ({lora['peak_memory_mb']:.0f} vs "
          f"{full['peak_memory_mb']:.0f} MB per worker)", file=sys.stderr)
    print(f"fcot / bare (padded): {ratio:.2f}   packing / padding: fcot {packing:.2f}, bare {bare_packing:.2f}"
          + (f"   MFU {out['mfu']:.1%}" if "mfu" in out else ""), file=sys.stderr)
    import ray

    ray.shutdown()  # workers' buffered log lines reach stdout before this, so the JSON stays the last line
    print(json.dumps({**out, "parameters": params, "batch_size": args.batch_size, "steps": args.steps,
                      "precision": args.precision, "workers": args.workers, "device": where, "best_of": args.rounds,
                      "results": results}))


if __name__ == "__main__":
    main()
