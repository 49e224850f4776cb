"""Where a pretrained student's epoch goes on this machine, and what each setting buys: SmolLM2-135M-Instruct (or
--model) fine-tuned on the 175B teacher's rationales of one task, in one process with all of the machine's cores.

    .venv/bin/python experiments/bench/student.py [--task coin_flip] [--method fine_tune_cot|vanilla] [--steps 8]
                                                  [--batch-size 8] [--rounds 2]

Setups, each the one before it plus one change:
  fp32_padded           fp32, padded micro-batches, logits at every position (how the MultiArith run trained)
  fp32_packed           + packed rows (fcot.train.attention)
  bf16_packed           + bf16 autocast (skipped where the CPU has no native bf16: there it runs ~77x slower)
  bf16_packed_targets   + logits only at target positions (what fcot's trainer does since logits_to_keep)
  bf16_packed_targets_fused  + torch's fused AdamW (one kernel over all parameters, not a loop per tensor)
  lora_packed_targets   the same as a LoRA student (r 16, all linear layers)
Every setup trains the same batches (the same seeded order) for --steps optimizer steps after 2 warm-up steps; the
rounds interleave the setups and each keeps its best round (other jobs skew a single run). Per setup: tokens/s
over real tokens (prompt + completion + EOS) and the share of a step in forward, backward and optimizer.
The last line is JSON: {"tokens_per_s": {...}, "speedup_vs_first": {...}, "split": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOGS = {"coin_flip": "coin_flip", "last_letter_concatenation": "last_letters",
        "date_understanding": "date_understanding", "multiarith": "multiarith"}
SETUPS = ["fp32_padded", "fp32_packed", "bf16_packed", "bf16_packed_targets", "bf16_packed_targets_fused",
          "lora_packed_targets"]


def rows(task: str, logs: Path, method: str) -> list[tuple[str, str]]:
    """The task's rationales that reached the gold answer, as (prompt, completion) in the method's format (vanilla:
    the same questions with their answers only)."""
    from fcot.prompts import FORMATS
    from fcot.teacher.logs import parse_zero_shot_cot_log

    fmt = FORMATS[method]
    path = logs / f"{LOGS[task]}_zero_shot_cot.log"
    if not path.exists():
        sys.exit(f"{path}: no such teacher log (--logs)")
    return [(fmt.render_prompt(r.question), fmt.render_target(r.gold, r.rationale))
            for r in parse_zero_shot_cot_log(path) if r.pred_after and r.pred_after == r.gold and r.rationale.strip()]


def loss_sum(model, batch: dict, targets_only: bool):
    """Summed cross-entropy over the target tokens: logits at every position, or only where a target follows."""
    import torch.nn.functional as F

    from fcot.train.objectives import loss_sum

    if targets_only:
        return loss_sum(model, batch, False)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "max_length_q")
              if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def measure(setup: str, model_path: str, data: list[tuple[str, str]], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcot.train.data import Collator

    torch.manual_seed(0)
    packing = "packed" in setup
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    if packing:
        from fcot.train import attention

        model.set_attn_implementation(attention.NAME)
    if setup.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=setup.endswith("fused") or None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    collate = Collator(tokenizer, 512, encoder_decoder=False, packing=packing)
    order = random.Random(0).sample(data, len(data))
    examples = collate.encode([p for p, _ in order], [c for _, c in order])
    bf16 = setup.startswith("bf16") or (setup.startswith("lora") and args.bf16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    tokens = 0
    for step in range(2 + args.steps):
        chunk = [examples[i % len(examples)] for i in range(step * args.batch_size, (step + 1) * args.batch_size)]
        batch = collate.collate(chunk)
        inputs = {k: v for k, v in batch.items() if k not in ("tokens", "label_tokens")}
        t0 = time.perf_counter()
        with autocast:
            loss = loss_sum(model, inputs, "targets" in setup) / batch["label_tokens"]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= 2:
            tokens += int(batch["tokens"])
            for k, s in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
                spent[k] += s
    seconds = sum(spent.values())
    return {"tokens_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2),
            "split": {k: round(v / seconds, 3) for k, v in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="coin_flip", choices=sorted(LOGS))
    parser.add_argument("--method", default="fine_tune_cot", choices=["fine_tune_cot", "vanilla"])
    parser.add_argument("--model", default=None, help="a local model folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per setup and round")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (the paper: 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--logs", default=str(ROOT.parent / "shared" / "data" / "teacher_logs"))
    args = parser.parse_args()

    import torch

    from fcot.hardware import cpu_bf16
    from fcot.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    args.bf16 = cpu_bf16()
    setups = [s for s in SETUPS if args.bf16 or not s.startswith("bf16")]
    model_path = args.model or resolve_model("smollm2-135m")
    data = rows(args.task, Path(args.logs), args.method)
    print(f"{args.task}, {args.method}: {len(data)} examples; {model_path}; {args.steps} steps of "
          f"{args.batch_size} after 2; {torch.get_num_threads()} threads; native bf16: {args.bf16}", file=sys.stderr)
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for setup in setups:
            out = measure(setup, model_path, data, args)
            print(f"round {r} {setup:<20} {out['tokens_per_s']:>7.1f} tokens/s  split {out['split']}", file=sys.stderr)
            if setup not in best or out["tokens_per_s"] > best[setup]["tokens_per_s"]:
                best[setup] = out
    first = best[setups[0]]["tokens_per_s"]
    print(json.dumps({"tokens_per_s": {s: best[s]["tokens_per_s"] for s in setups},
                      "speedup_vs_first": {s: round(best[s]["tokens_per_s"] / first, 3) for s in setups},
                      "split": {s: best[s]["split"] for s in setups}, "task": args.task, "method": args.method,
                      "steps": args.steps, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                      "native_bf16": args.bf16, "best_of": args.rounds}))


if __name__ == "__main__":
    main()
