"""Teacher throughput: one request per sample (the seed code's API loop) vs the engine called once with the
whole batch vs fcot's pool of replicas (`fcot.teacher.pipeline.teach`), on the same CPU model and prompts.

    .venv/bin/python experiments/bench/teacher.py [--questions 32] [--samples 8] [--max-new-tokens 128]
        [--engine vllm|hf] [--naive-samples 16] [--samples-per-batch N] [--kv-cache-gib 2]

Workload, the same for all three: both zero-shot-CoT steps of N = --questions multiarith train questions
(FCOT_DATA_DIR, default ../shared/data; which ones: see (c)) x D = --samples. Step 1 is
`Q: {question}\nA: Let's think step by step.` sampled at temperature 0.7 with fcot's per-sample seeds and
--max-new-tokens; step 2 appends the rationale and `\nTherefore, the answer is` and decodes greedily
(answer_max_new_tokens 32). All three go through fcot's own `plan` (prompts, seeds) and `generate_records`
(step-1 requests, step-2 requests, scoring): only how `engine.generate` is fed differs. Model:
SmolLM2-135M-Instruct (`smollm2-135m`, prepared on first use), `dtype: auto` (bf16 on a CPU with native bf16,
fp32 otherwise: fcot.hardware; --dtype to force one); vllm: enforce_eager, prefix caching, the same KV cache size
(--kv-cache-gib) everywhere. Throughput counts generated tokens of both steps (completion_tokens +
answer_completion_tokens of the records), over wall time.

(a) naive: one engine.generate call per sample and step, in a Python loop (step 1 of a sample, then its
    step 2), on the same engine instance as (b). Timed on the first --naive-samples samples only (a subset, to
    keep the run short); its tok/s is the subset's.
(b) engine direct: one engine.generate with all N x D step-1 requests, then one with all N x D step-2
    requests (VLLMEngine.generate is one `LLM.generate` call; HFEngine.generate micro-batches by hf_batch_size).
    After a warm-up call on an unrelated prompt; the prefix cache is reset before (b) and before (a).
(c) fcot's pool: `teach` with engine.kind = --engine, replicas=1, fcot's default engine.batch_size (or
    --samples-per-batch), into a fresh temporary output dir (nothing cached). `teach` starts its replica (and
    vLLM) inside the call, and a second `teach` starts a new replica, so start-up cannot be excluded by running
    it twice. Instead the same `teach` call first runs W warm-up questions (whole batches: W x D is a multiple
    of samples_per_batch; they are the questions just before the measured ones) and then the measured ones,
    and (c) is read from the records' `created_at` (stamped when a batch's two steps finish, before its shard
    is written). With one replica, batches run one after another, so tok/s = tokens of the measured questions
    / (last created_at - last created_at of the warm-up batches): start-up and the first batch are out, and
    everything after (shard writes, the pool's scheduling, the driver) is in. The script checks that every
    measured record was stamped after every warm-up record. The wall-clock figure of the whole `teach` call
    (start-up and warm-up included) is printed too, for information.
(b') only with samples_per_batch < N x D: the engine called directly in chunks of samples_per_batch, to tell
    the cost of batch granularity from that of the pool.

The measured questions are multiarith train questions W .. W+N-1 for all three (W = 32 with vllm's default
samples_per_batch 256 and D = 8), so that (a), (b) and (c) time exactly the same samples (same keys).

(a)+(b) and (c) run in separate child processes one after the other, so no engine sits idle beside another.
Ratios are measured within one invocation; the machine is shared and noisy. Targets on the 2-core dev box:
ratio_vs_naive >= 5, ratio_vs_engine >= 0.9. The last line is JSON:
{"tok_s_fcot": (c), "ratio_vs_naive": (c) / (a), "ratio_vs_engine": (c) / (b), ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FCOT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def make_cfg(args, output_dir: str, questions: int):
    from fcot.config import load_config
    from fcot.contracts.teacher import TeachConfig

    engine = {"kind": args.engine, "model": args.model, "dtype": args.dtype, "replicas": 1,
              "cpus_per_replica": args.cpus_per_replica, "kv_cache_gib": args.kv_cache_gib, "enforce_eager": True}
    if args.samples_per_batch:
        engine["batch_size"] = args.samples_per_batch
    return load_config(TeachConfig, base={
        "tasks": "multiarith", "split": "train", "subset": questions, "output_dir": output_dir,
        "progress": False, "engine": engine,
        "sampling": {"num_samples": args.samples, "temperature": 0.7, "max_new_tokens": args.max_new_tokens,
                     "seed": 0}})


def layout(args, output_dir: str):
    """(config of the pool's run, W warm-up questions): W x D is a whole number of batches."""
    spb = make_cfg(args, output_dir, 1).engine.batch_size
    warmup = math.lcm(spb, args.samples) // args.samples
    return make_cfg(args, output_dir, warmup + args.questions), warmup


def tokens(records) -> int:
    return sum(r["completion_tokens"] + r["answer_completion_tokens"] for r in records)


def figures(records, seconds: float) -> dict:
    return {"samples": len(records), "tokens": tokens(records), "seconds": round(seconds, 2),
            "tok_s": tokens(records) / seconds, "load": round(os.getloadavg()[0], 1)}


class OnePerSample:
    """An engine that forwards each request alone: one generate call per sample and step."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, requests):
        return [self.engine.generate([r])[0] for r in requests]


def phase_direct(args) -> dict:
    """(b), (b') and (a) on one engine instance, built with the pool's own `build_engine`."""
    from fcot.contracts.teacher import teacher_id, teacher_identity
    from fcot.engines import Request, build_engine
    from fcot.hardware import use_cpus
    from fcot.teacher.pipeline import generate_records
    from fcot.teacher.plan import plan

    use_cpus(args.cpus_per_replica)  # the threads a replica of the pool gets
    cfg, warmup = layout(args, tempfile.mkdtemp(prefix="fcot-bench-teacher-direct-"))
    items = plan(cfg)[warmup * args.samples:]  # the measured questions, as in (c)
    teacher = (teacher_id(cfg), json.dumps(teacher_identity(cfg), sort_keys=True))
    started = time.perf_counter()
    engine = build_engine(cfg.engine)
    out = {"startup_s": round(time.perf_counter() - started, 2)}
    reset = getattr(getattr(engine, "llm", None), "reset_prefix_cache", lambda: None)
    warm = Request(prompt="Q: Tom has 3 red balls and 4 blue balls. How many balls does he have?\nA:",
                   max_new_tokens=16, temperature=0.7, seed=1)
    engine.generate([warm] * 4)

    reset()
    t = time.perf_counter()
    direct = generate_records(cfg, engine, items, teacher)
    out["engine"] = figures(direct, time.perf_counter() - t)
    out["per_key"] = {r["key"]: r["rationale"] for r in direct}

    spb = cfg.engine.batch_size
    if spb < len(items):
        reset()
        t, chunked = time.perf_counter(), []
        for i in range(0, len(items), spb):
            chunked += generate_records(cfg, engine, items[i:i + spb], teacher)
        out["engine_chunked"] = figures(chunked, time.perf_counter() - t)

    reset()
    t = time.perf_counter()
    naive = generate_records(cfg, OnePerSample(engine), items[:args.naive_samples], teacher)
    out["naive"] = figures(naive, time.perf_counter() - t)
    return out


def phase_pool(args) -> dict:
    """(c): fcot's teach into a fresh folder, warm-up batches first; timed from the records' created_at."""
    from fcot.contracts.records import RecordStore
    from fcot.ray_utils import init_ray
    from fcot.teacher.pipeline import teach
    from fcot.teacher.plan import plan

    work = tempfile.mkdtemp(prefix="fcot-bench-teacher-pool-")
    cfg, warmup = layout(args, work)
    measured_keys = {it["key"] for it in plan(cfg)[warmup * args.samples:]}
    init_ray(num_cpus=os.cpu_count())
    started = time.perf_counter()
    summary = teach(cfg)
    wall = time.perf_counter() - started
    rows = RecordStore(Path(work) / "records").read().to_pylist()
    measured = [r for r in rows if r["key"] in measured_keys]
    warm = [r for r in rows if r["key"] not in measured_keys]
    if len(measured) != len(measured_keys) or not warm:
        raise SystemExit(f"expected {len(measured_keys)} measured records and warm-up ones, "
                         f"got {len(measured)}, {len(warm)}")
    t0, t1 = max(r["created_at"] for r in warm), max(r["created_at"] for r in measured)
    if min(r["created_at"] for r in measured) <= t0:
        raise SystemExit("a measured batch finished before the warm-up batches: cannot time the pool this way")
    stamps = sorted({r["created_at"] for r in rows})
    return {
        "samples_per_batch": cfg.engine.batch_size, "warmup_questions": warmup, "batches": len(stamps),
        "batch_gaps_s": [round(b - a, 2) for a, b in zip(stamps, stamps[1:])],
        "pool": figures(measured, t1 - t0),
        "teach_wall": {**figures(rows, wall), "summary_wall_s": summary["wall_s"]},
        "per_key": {r["key"]: r["rationale"] for r in measured},
    }


def run_phase(name: str, argv: list[str], log) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] phase {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--phase", name, *argv], stdout=subprocess.PIPE,
                          stderr=log, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"phase {name} failed ({proc.returncode}); see its log")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="D, samples per question")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="step 1 (the rationale)")
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--naive-samples", type=int, default=16, help="(a) is timed on this many samples")
    parser.add_argument("--samples-per-batch", type=int, default=None, help="(c); default: fcot's config default")
    parser.add_argument("--cpus-per-replica", type=float, default=float(os.cpu_count() or 1),
                        help="(c) Ray CPUs of the replica; hf: also the torch threads of every engine")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vllm KV cache, (a)/(b) and (c)")
    parser.add_argument("--log", help="child processes' stderr (default: a temporary file)")
    parser.add_argument("--phase", choices=["direct", "pool"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        result = phase_direct(args) if args.phase == "direct" else phase_pool(args)
        print(json.dumps(result))
        return

    argv = sys.argv[1:]
    from fcot.bundled import prepare_missing

    prepare_missing([args.model], log=lambda m: print(m, file=sys.stderr))  # a fresh machine has none prepared
    precision = make_cfg(args, tempfile.gettempdir(), 1).engine.precision()
    log_path = args.log or tempfile.mktemp(prefix="fcot-bench-teacher-", suffix=".log")
    print(f"{args.questions} multiarith questions x D={args.samples}, max_new_tokens {args.max_new_tokens} (+32 for "
          f"step 2), engine {args.engine} ({args.model}, {precision.dtype}: {precision.why}), {os.cpu_count()} CPUs; "
          f"child logs: {log_path}", file=sys.stderr, flush=True)
    with open(log_path, "a") as log:
        direct = run_phase("direct", argv, log)
        pool = run_phase("pool", argv, log)

    a, b, c = direct["naive"], direct["engine"], pool["pool"]
    common = set(direct["per_key"]) & set(pool["per_key"])  # the same samples (prompt, seed) in (b) and (c)
    same = sum(direct["per_key"][k] == pool["per_key"][k] for k in common)
    rows = [("(a) naive, 1 request/sample (subset)", a), ("(b) engine, whole batch", b)]
    if "engine_chunked" in direct:
        rows.append((f"(b') engine, chunks of {pool['samples_per_batch']}", direct["engine_chunked"]))
    rows += [("(c) fcot pool (after warm-up batch)", c), ("(c') teach wall, start-up+warm-up", pool["teach_wall"])]
    print(f"{'':<38} {'samples':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'load':>5}", file=sys.stderr)
    for name, r in rows:
        print(f"{name:<38} {r['samples']:>7} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tok_s']:>8.1f} "
              f"{r['load']:>5.1f}", file=sys.stderr)
    print(f"load: the 1-minute load average when the row's timing ended ({os.cpu_count()} CPUs); other jobs on the "
          "machine skew the ratios", file=sys.stderr)
    print(f"questions {pool['warmup_questions']}..{pool['warmup_questions'] + args.questions - 1} measured; engine "
          f"start-up in (a)/(b): {direct['startup_s']} s; pool: samples_per_batch {pool['samples_per_batch']}, "
          f"{pool['batches']} batches, gaps {pool['batch_gaps_s']} s; identical rationales (b) vs (c): "
          f"{same}/{len(common)}", file=sys.stderr)
    out = {"tok_s_fcot": round(c["tok_s"], 1), "ratio_vs_naive": round(c["tok_s"] / a["tok_s"], 3),
           "ratio_vs_engine": round(c["tok_s"] / b["tok_s"], 3), "tok_s_naive": round(a["tok_s"], 1),
           "tok_s_engine": round(b["tok_s"], 1), "tok_s_teach_wall": round(pool["teach_wall"]["tok_s"], 1),
           "engine": args.engine, "dtype": precision.dtype, "questions": args.questions, "samples": args.samples,
           "max_new_tokens": args.max_new_tokens, "naive_samples": a["samples"],
           "samples_per_batch": pool["samples_per_batch"], "identical_rationales": f"{same}/{len(common)}"}
    if "engine_chunked" in direct:
        out["tok_s_engine_chunked"] = round(direct["engine_chunked"]["tok_s"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
