"""Training throughput: fcot's trainer (Ray Train, 2 workers, ZeRO-2) vs a bare single-process PyTorch loop,
and sequence packing vs padding, on real chain-of-thought lengths.

    .venv/bin/python experiments/bench/train.py [--steps 40] [--hidden 256] [--layers 4] [--model PATH]

Data: the 175B teacher's zero-shot-CoT rationales that reached the gold answer (the Zero-shot-CoT authors'
logs in ../shared/data/teacher_logs), in the Fine-tune-CoT format. Model: a random Llama-family decoder
with a BPE tokenizer trained on those texts (or --model). Every number is tokens/s over real tokens
(prompt + completion + EOS, padding excluded), over the same number of optimizer steps of batch_size 8.
Setups run in interleaved rounds and keep their best round (other jobs on a shared machine skew single runs).
The last line is JSON: {"ratio_vs_bare": fcot padded / bare padded, "packing_speedup": fcot packed / fcot padded}.
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


def teacher_rows(logs: Path) -> list[dict]:
    from fcot.prompts import FORMATS
    from fcot.teacher.logs import KOJIMA_DATASETS, parse_zero_shot_cot_log

    fmt = FORMATS["fine_tune_cot"]
    rows = []
    for path in sorted(logs.glob("*_zero_shot_cot.log")):
        for r in parse_zero_shot_cot_log(path):
            if r.pred_after and r.pred_after == r.gold and r.rationale.strip():  # kept by curation: correct
                rows.append({"task": r.task, "index": r.position, "sample_index": 0,
                             "prompt": fmt.render_prompt(r.question), "completion": fmt.render_target(r.gold, r.rationale)})
    if not rows:
        sys.exit(f"no teacher logs in {logs} (known: {', '.join(KOJIMA_DATASETS)})")
    return rows


def bare_loop(model_path: str, rows: list[dict], steps: int, batch_size: int, packing: bool, threads: int) -> dict:
    """The baseline: one process, all cores, plain torch AdamW, the same tokenization and loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcot.train.data import Collator
    from fcot.train.trainer import _loss_sum

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    collate = Collator(tokenizer, 512, encoder_decoder=False, packing=packing)
    order = random.Random(0).sample(rows, len(rows))
    tokens, started = 0, time.perf_counter()
    for step in range(steps):
        chunk = order[step * batch_size:(step + 1) * batch_size]
        batch = collate({"prompt": [r["prompt"] for r in chunk], "completion": [r["completion"] for r in chunk]})
        loss = _loss_sum(model, batch, False) / batch["label_tokens"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["tokens"])
    seconds = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2)}


def fcot_trainer(work: Path, model_path: str, args, packing: bool, name: str) -> dict:
    from fcot.config import load_config
    from fcot.train.config import TrainConfig
    from fcot.train.trainer import train

    cfg = load_config(TrainConfig, None, [
        f"data={work / 'data'}", f"model={model_path}", f"output_dir={work / name}", "num_workers=2",
        "cpus_per_worker=1", "deepspeed.stage=2", f"batch_size={args.batch_size}", f"max_steps={args.steps}",
        f"packing={str(packing).lower()}", "wandb.mode=disabled", "lr=3e-4"])
    s = train(cfg)
    return {"tokens_per_s": s["tokens_per_s"], "tokens": s["tokens"], "seconds": s["train_s"],
            "startup_s": s["startup_s"], "wall_s": s["wall_s"], "steps": s["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (the paper: 8)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each setup keeps its best")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model", help="a local model folder instead of the random Llama")
    parser.add_argument("--logs", default=str(ROOT.parent / "shared" / "data" / "teacher_logs"))
    parser.add_argument("--work", help="keep data, model and runs here (default: a temporary folder)")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fcot.models import make_tiny_model
    from fcot.ray_utils import init_ray

    work = Path(args.work or tempfile.mkdtemp(prefix="fcot-bench-train-"))
    rows = teacher_rows(Path(args.logs))
    (work / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), work / "data" / "part-0.parquet")
    model_path = args.model or str(make_tiny_model(
        work / "model", "llama", vocab_texts=[r["prompt"] + r["completion"] for r in rows], vocab_size=4096,
        hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())
    tok = AutoTokenizer.from_pretrained(model_path)
    lengths = [len(tok(r["prompt"] + r["completion"]).input_ids) + 1 for r in rows]
    print(f"data: {len(rows)} correct teacher rationales, {sum(lengths) / len(lengths):.0f} tokens on average "
          f"({min(lengths)}-{max(lengths)}); model: {params / 1e6:.1f}M parameters; {args.steps} steps of "
          f"{args.batch_size} examples; "
          f"{os.cpu_count()} CPUs", file=sys.stderr)

    cpus = os.cpu_count() or 2
    init_ray(num_cpus=cpus)
    # Rounds interleave the four setups and each keeps its best round: on a shared machine other jobs
    # come and go, and a run that shared the cores with them says little about the code.
    runs = {"bare_padded": lambda r: bare_loop(model_path, rows, args.steps, args.batch_size, False, cpus),
            "bare_packed": lambda r: bare_loop(model_path, rows, args.steps, args.batch_size, True, cpus),
            "fcot_padded": lambda r: fcot_trainer(work, model_path, args, False, f"padded-{r}"),
            "fcot_packed": lambda r: fcot_trainer(work, model_path, args, True, f"packed-{r}")}
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
    print(f"fcot / bare (padded): {ratio:.2f}   packing / padding: fcot {packing:.2f}, bare {bare_packing:.2f}",
          file=sys.stderr)
    import ray

    ray.shutdown()  # workers' buffered log lines reach stdout before this, so the JSON stays the last line
    print(json.dumps({"ratio_vs_bare": round(ratio, 3), "packing_speedup": round(packing, 3),
                      "bare_packing_speedup": round(bare_packing, 3), "batch_size": args.batch_size,
                      "steps": args.steps, "best_of": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
