"""A KD worker's memory against the curated rows it trains on: do the teacher's top-k, travelling with the curated
rows, cost a worker about their own bytes, whatever the set's size?

    .venv/bin/python experiments/bench/kd_memory.py [--rows 10000 100000] [--k 20] [--workers 2] [--work DIR]

For each size: a curated set of that many rows (one MultiArith-like prompt, a rationale of ~60 tokens of the tiny
Llama's tokenizer, and the teacher's top-k at each rationale token: int32 ids, float16 logprobs, as curation writes
them), then two trainings of the random tiny Llama on two workers with `shard_data: true` (each worker tokenizes
and holds its half) for 2 steps: `objective: sft` and `objective: kd`. Printed per size: the top-k column's bytes
(Arrow, the whole set, and a worker's half), each run's peak worker memory (the largest worker's peak resident set,
fcot's own `peak_memory_mb`), KD − SFT against the worker's half of the column, and the bytes of the targets a KD
worker holds (its `kd_tokens.bytes_held`: the arrays, without the object store's pages it read them through).
Same machine, same invocation: the ratio, not the absolute MB, is the measure. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RATIONALE = ("There are {a} apples and {b} more arrive, so the total is {a} + {b} = {c}. Then {d} are eaten, "
             "which leaves {c} - {d} = {e} apples in the basket at the end of the day.")


def curated_set(folder: Path, rows: int, k: int, tokenizer) -> int:
    """`rows` curated rows with the teacher's top-k (the curated set's TEACHER_LOGPROBS column); returns its bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fcot.contracts.curated import TEACHER_LOGPROBS, row_schema

    rng = np.random.default_rng(0)
    distinct = 512  # rationales, repeated: tokenizing 100k distinct texts here would only slow the set-up
    texts = []
    for i in range(distinct):
        a, b, d = (int(x) for x in rng.integers(2, 90, 3))
        texts.append(" " + RATIONALE.format(a=a, b=b, c=a + b, d=min(d, a + b), e=a + b - min(d, a + b)))
    emitted = tokenizer(texts, add_special_tokens=False).input_ids
    folder.mkdir(parents=True, exist_ok=True)
    schema, written, per_file = row_schema(True), 0, 20_000
    for start in range(0, rows, per_file):
        n = min(per_file, rows - start)
        pick = [(start + j) % distinct for j in range(n)]
        tokens = [emitted[p] for p in pick]
        lengths = np.array([len(t) for t in tokens])
        positions = int(lengths.sum())
        ids = rng.integers(0, tokenizer.vocab_size, (positions, k), dtype=np.int32)
        ids[:, 0] = np.concatenate(tokens)  # the emitted token first, as a teacher's top-1 usually is
        lps = np.sort(np.log(rng.dirichlet(np.ones(k + 4), positions)[:, :k]), -1)[:, ::-1].astype(np.float16)
        row_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        k_offsets = pa.array(np.arange(0, positions * k + 1, k, dtype=np.int32))
        topk = pa.StructArray.from_arrays([
            pa.ListArray.from_arrays(row_offsets, pa.array(np.concatenate(tokens).astype(np.int32))),
            pa.ListArray.from_arrays(row_offsets, pa.ListArray.from_arrays(k_offsets, pa.array(ids.ravel()))),
            pa.ListArray.from_arrays(row_offsets, pa.ListArray.from_arrays(k_offsets, pa.array(lps.ravel())))],
            fields=list(schema.field(TEACHER_LOGPROBS).type))
        table = pa.table({
            "task": ["multiarith"] * n, "index": np.arange(start, start + n), "sample_index": np.zeros(n, np.int64),
            "part": np.zeros(n, np.int64), "weight_key": [""] * n,
            "prompt": [f"Question {start + j}: how many apples are left? ###" for j in range(n)],
            "completion": [texts[p] + " --> 5 END" for p in pick],
            "length": lengths + 24, "completion_length": lengths + 6, TEACHER_LOGPROBS: topk}).cast(schema)
        pq.write_table(table, folder / f"part-{start // per_file:05d}.parquet")
        written += table.column(TEACHER_LOGPROBS).nbytes
    return written


def train_once(data: Path, model: Path, out: Path, workers: int, kd: bool) -> dict:
    from fcot.config import load_config
    from fcot.train.config import TrainConfig
    from fcot.train.trainer import train

    cfg = load_config(TrainConfig, None, [
        f"data={data}", f"model={model}", f"output_dir={out}", f"num_workers={workers}", "cpus_per_worker=1",
        "batch_size=8", "max_steps=2", "epochs=1", "shard_data=true", "wandb.mode=disabled", "keep_checkpoints=1",
        "max_length=256", "precision=fp32", f"objective.kind={'kd' if kd else 'sft'}"])
    s = train(cfg)
    return {"peak_memory_mb": s["peak_memory_mb"], "examples_per_worker": s["examples_per_worker"],
            "kd_tokens": s.get("kd_tokens"), "wall_s": s["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", help="keep data and runs here (default: a temporary folder)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from fcot.bundled import make_tiny_model
    from fcot.tasks import load_records

    work = Path(args.work or tempfile.mkdtemp(prefix="fcot-kd-memory-")).resolve()
    texts = [s.question for s in load_records("multiarith")] + [RATIONALE, "Therefore, the answer is --> END ###"]
    model = make_tiny_model(work / "tiny-llama", "llama", vocab_texts=texts)
    tokenizer = AutoTokenizer.from_pretrained(model)
    results = {}
    for rows in args.rows:
        data = work / f"curated-{rows}"
        topk_bytes = curated_set(data, rows, args.k, tokenizer)
        sft = train_once(data, model, work / f"sft-{rows}", args.workers, kd=False)
        kd = train_once(data, model, work / f"kd-{rows}", args.workers, kd=True)
        half = topk_bytes / args.workers / 2**20
        extra = kd["peak_memory_mb"] - sft["peak_memory_mb"]
        results[rows] = {"topk_mb": round(topk_bytes / 2**20, 1), "topk_mb_per_worker": round(half, 1),
                         "sft": sft, "kd": kd, "kd_minus_sft_mb": round(extra, 1),
                         "kd_extra_over_topk_per_worker": round(extra / half, 2),
                         "held_mb": round(kd["kd_tokens"]["bytes_held"] / 2**20, 1),
                         "held_over_topk_per_worker": round(kd["kd_tokens"]["bytes_held"] / 2**20 / half, 2)}
        held = kd["kd_tokens"]["bytes_held"] / 2**20
        print(f"{rows:>7} rows, top-{args.k}: {topk_bytes / 2**20:,.0f} MB in the curated set "
              f"({half:,.0f} MB a worker's half); a worker holds {held:,.0f} MB of targets ({held / half:.2f}×); "
              f"peak worker memory sft {sft['peak_memory_mb']:,.0f} MB, kd {kd['peak_memory_mb']:,.0f} MB: "
              f"kd − sft = {extra:,.0f} MB = {extra / half:.2f}× the worker's top-k bytes", flush=True)
    print(json.dumps({"k": args.k, "workers": args.workers, "results": results}))


if __name__ == "__main__":
    main()
