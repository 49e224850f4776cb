"""fcot's own cost as the work grows: the teacher's pool and store, curation and evaluation's bookkeeping at
N x D = 10k, 100k and 1M records, with a teacher that costs nothing.

    .venv/bin/python experiments/bench/scale.py [--sizes 10000,100000,1000000] [--samples 50] [--work DIR]

The engine answers at once: every Ray worker of the benchmark's cluster runs a setup hook (Ray's
`worker_process_setup_hook`) that gives fcot's teacher and evaluation a canned engine, defined here, in place of
a model. It reads the two numbers of a synthetic question ("What is 17 plus 25?"), writes a one-line rationale
and the sum (a wrong sum for every third seed, so curation has something to drop), and the answer step returns
the sum. Everything else is fcot's own: `teach` (plan, keys, the replica pool, shard writes, the resume read),
`curate` (formatting, correctness, dedupe, first D, dev carve-out and the write, on Ray Data; run a second time
with the shards already formatted, as `fcot run` leaves them, to time selection and the write alone), and `evaluate`
(k = D samples per question on the canned engine in Ray Data actors: scoring, votes, predictions.jsonl, intervals).
Last, `teacher_streaming`: the teacher again into a new store, as `fcot run` runs it, formatting each shard for
curation in the driver as it is written (`ShardStreamer`), so its curation is the `curate_parts_ready` case.

Each size runs in a fresh process (so its driver's peak RSS is its own): N = size / D train questions of a user
task (a JSONL written under --work) x D = --samples. Printed per stage and size: microseconds per record
(stage wall time / records), the driver's peak RSS after that stage, and its memory during the stage by kind
(MemorySampler: private, and the object-store pages it maps to read Ray objects). The last line is JSON:
{"us_per_record": {stage: {size: us}}, "driver_peak_rss_mb": {size: MB}, "driver_peak_private_mb": {size: MB},
"growth": {stage: us at the largest size / us at the smallest}}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FCOT_DATA_DIR", str(ROOT.parent / "shared" / "data"))

NUMBERS = re.compile(r"What is (\d+) plus (\d+)\?")
GIVES = re.compile(r"which gives (\d+)")


class CannedEngine:
    """Answers at once: a rationale and the sum (wrong for every third seed); the answer step repeats it."""

    name = "canned"

    def generate(self, requests):
        from fcot.engines import Completion

        out = []
        for r in requests:
            text = r.prompt if r.prompt is not None else "\n".join(m["content"] for m in r.messages)
            a, b = map(int, NUMBERS.search(text).groups())
            total = a + b + (1 if r.seed % 3 == 0 else 0)
            if text.rstrip().endswith("Therefore, the answer is"):  # the answer step: the rationale's sum
                out.append(Completion(f" {GIVES.search(text).group(1)}.", "stop", 40, 3))
            else:
                out.append(Completion(f" We add {a} and {b}, which gives {total}. So the answer is {total}.",
                                      "stop", 20, 16))
        return out


def canned_workers() -> None:
    """Ray's worker setup hook: fcot's teacher and evaluation build the canned engine in this process."""
    import fcot.evaluate
    import fcot.teacher.pipeline

    fcot.teacher.pipeline.build_engine = fcot.evaluate.build_engine = lambda cfg, cache_dir=None: CannedEngine()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemorySampler:
    """The driver's memory by kind, sampled every 20 ms from /proc/self/status: peak RSS during a stage, and its
    parts at their own peaks: private (RssAnon: the driver's own objects) and shared (RssShmem: pages of Ray's
    object store the driver mapped to read objects zero-copy; they belong to the store, bounded by its size)."""

    KEYS = {"VmRSS": "rss", "RssAnon": "private", "RssShmem": "shared", "RssFile": "files"}

    def __init__(self):
        import threading

        self.peak: dict = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _now(self) -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in self.KEYS:
                out[self.KEYS[key]] = int(line.split()[1]) / 1024
        return out

    def _run(self) -> None:
        while True:
            now = self._now()
            with self.lock:
                self.peak = {k: max(v, self.peak.get(k, 0.0)) for k, v in now.items()}
            time.sleep(0.02)

    def take(self) -> dict:
        """Peaks since the last take (MB)."""
        with self.lock:
            peak = {k: max(v, self.peak.get(k, 0.0)) for k, v in self._now().items()}
            self.peak = {}
        return {k: round(v, 1) for k, v in peak.items()}


def one_size(size: int, d: int, work: Path) -> dict:
    import ray

    from fcot.config import load_config
    from fcot.contracts.teacher import TeachConfig
    from fcot.curate import CurateConfig, ShardStreamer, curate
    from fcot.evaluate import EvalConfig, evaluate
    from fcot.ray_utils import init_ray
    from fcot.teacher.pipeline import teach

    n = size // d
    path = work / f"sums_{n}.jsonl"
    total = round(n / 0.99) + 1  # a 1% test split, the rest train
    with path.open("w") as f:
        for i in range(total):
            a, b = (i * 7919) % 1000, (i * 104729) % 1000
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    task = {"name": "sums", "path": str(path), "answer_type": "number", "test_fraction": 0.01}
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": canned_workers})
    init_ray()  # fcot's Ray Data settings on the cluster started above
    out: dict = {"size": size, "questions": n, "samples": d, "us": {}, "rss_mb": {}, "memory_mb": {}}
    memory = MemorySampler()
    teacher = {"tasks": [task], "subset": n, "output_dir": str(work / f"teacher_{size}"), "progress": False,
               "engine": {"kind": "openai", "model": "canned", "base_url": "http://canned.invalid", "replicas": 2,
                          "cpus_per_replica": 0.5, "batch_size": 256},
               "sampling": {"num_samples": d, "max_new_tokens": 32}}

    t = time.perf_counter()
    summary = teach(load_config(TeachConfig, base=teacher))
    records = summary["records"]
    out["us"]["teacher"] = 1e6 * (time.perf_counter() - t) / records
    out["rss_mb"]["teacher"] = _rss_mb()
    out["memory_mb"]["teacher"] = memory.take()

    curation = {"tasks": [task], "teacher": teacher, "student": str(work / "tokenizer"),
                "output_dir": str(work / f"cur_{size}"), "dev_fraction": 0.05, "max_length": 256}
    # Twice: from the bare store (every shard formatted here), then with its parts formatted, as `fcot run` leaves
    # them (it formats each shard while the teacher runs): selection and the write alone.
    for stage in ("curate", "curate_parts_ready"):
        t = time.perf_counter()
        curated = curate(load_config(CurateConfig, base=curation))
        out["us"][stage] = 1e6 * (time.perf_counter() - t) / records
        out["rss_mb"][stage] = _rss_mb()
        out["memory_mb"][stage] = memory.take()
    out["kept"] = curated["kept"]

    t = time.perf_counter()
    metrics = evaluate(load_config(EvalConfig, base={
        "engine": {**teacher["engine"], "batch_size": 64}, "tasks": [task], "split": "train", "subset": n,
        "self_consistency": d, "max_new_tokens": 32, "output_dir": str(work / f"eval_{size}")}))
    out["us"]["eval_bookkeeping"] = 1e6 * (time.perf_counter() - t) / (n * d)
    out["rss_mb"]["eval_bookkeeping"] = _rss_mb()
    out["memory_mb"]["eval_bookkeeping"] = memory.take()
    out["pass@k"] = metrics["tasks"]["sums"]["pass@k"]

    # The teacher again, into a new store, as `fcot run` runs it: each shard formatted for curation in this process
    # as it is written (ShardStreamer); curation then finds every part ready (the curate_parts_ready row).
    streamed = {**teacher, "output_dir": str(work / f"teacher_{size}_streamed")}
    streamer = ShardStreamer(load_config(CurateConfig, base={**curation, "teacher": streamed,
                                                             "output_dir": str(work / f"cur_{size}_s")}))
    t = time.perf_counter()
    teach(load_config(TeachConfig, base=streamed), on_shard=streamer)
    out["us"]["teacher_streaming"] = 1e6 * (time.perf_counter() - t) / records
    out["rss_mb"]["teacher_streaming"] = _rss_mb()
    out["memory_mb"]["teacher_streaming"] = memory.take()
    out["streamed_shards"] = streamer.formatted
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--work", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one size, in this process
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fcot-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("SIZE " + json.dumps(one_size(args.one, args.samples, work)), flush=True)
        return
    from fcot.bundled import make_tiny_model

    if not (work / "tokenizer").exists():  # curation measures lengths with the student's tokenizer
        make_tiny_model(work / "tokenizer", "llama", vocab_texts=["What is 1 plus 2? We add and gives So answer"])
    results = []
    for size in map(int, args.sizes.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--one", str(size), "--samples", str(args.samples),
                               "--work", str(work)], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("SIZE ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"size {size} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(lines[-1][5:])
        results.append(r)
        print(f"{size:>9,} records ({r['questions']:,} questions x {r['samples']}): "
              + ", ".join(f"{k} {v:.1f} us/record (driver peak {r['rss_mb'][k]:.0f} MB)" for k, v in r["us"].items())
              + f"; {r['streamed_shards']} shards formatted while the streaming teacher ran", flush=True)
        print(" " * 10 + "driver memory during each stage, peak MB (rss; private; object-store pages): " + ", ".join(
            f"{k} {m['rss']:.0f}; {m['private']:.0f}; {m['shared']:.0f}" for k, m in r["memory_mb"].items()),
              flush=True)
    stages = list(results[0]["us"])
    print(json.dumps({"us_per_record": {s: {r["size"]: round(r["us"][s], 2) for r in results} for s in stages},
                      "driver_peak_rss_mb": {r["size"]: round(max(r["rss_mb"].values()), 1) for r in results},
                      "driver_peak_private_mb": {r["size"]: max(m["private"] for m in r["memory_mb"].values())
                                                 for r in results},
                      "growth": {s: round(results[-1]["us"][s] / results[0]["us"][s], 2) for s in stages}}))


if __name__ == "__main__":
    main()
