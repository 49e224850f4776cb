"""Adaptive diverse reasoning vs a fixed D: teacher tokens spent, questions kept, and the students they make.

    .venv/bin/python experiments/bench/adaptive.py [--questions 40] [--max-samples 16] [--min-correct 2]
                                                   [--round-size 2] [--epochs 8] [--work DIR]

The same teacher, task and questions for both: the bundled SmolLM2-135M-Instruct on coin flip, few-shot-CoT with
the state-tracking prompt (experiments/prompts/coin_flip_state_tracking.json; right on ~38% of its samples),
temperature 0.7, the first --questions training questions.
(1) fixed: D = --max-samples samples per question.
(2) adaptive: rounds of --round-size until --min-correct distinct correct rationales or --max-samples samples.
Each runs the whole chain (`fcot run`: teacher -> curation -> a tiny-llama Fine-tune-CoT student selected on the
dev split -> the 150 test questions) in a folder of its own, so the adaptive teacher generates (and counts)
every sample it spends. Teacher tokens are prompt + completion tokens of both zero-shot-CoT steps.
The last line is JSON: {"token_ratio": adaptive / fixed teacher tokens, "kept_questions_ratio": questions with
a kept rationale, adaptive / fixed, "fixed": {...}, "adaptive": {...}} with each student's test accuracy and
its 95% interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("FCOT_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def run_config(args, name: str, sampling: dict) -> dict:
    return {
        "name": name, "output_dir": str(Path(args.work) / name), "tasks": ["coin_flip"], "wandb_mode": "disabled",
        "methods": ["fine_tune_cot"], "baselines": [],
        "teacher": {"subset": args.questions, "prompt": "few_shot_cot", "progress": False,
                    "few_shot_exemplars": str(ROOT / "experiments" / "prompts" / "coin_flip_state_tracking.json"),
                    "engine": {"kind": "hf", "model": "smollm2-135m", "cpus_per_replica": 2,
                               "batch_size": 32, "hf_batch_size": 32},
                    "sampling": {"temperature": 0.7, "max_new_tokens": 48, **sampling}},
        "curate": {"max_length": 256},
        "train": {"model": "tiny-llama", "epochs": args.epochs, "lr": 0.001, "batch_size": 8, "num_workers": 2,
                  "packing": True},
        "eval": {"engine": {"batch_size": 64, "hf_batch_size": 64, "cpus_per_replica": 2}},
    }


def figures(summary: dict) -> dict:
    from fcot.io import read_json

    stages = summary["stages"]
    teacher = stages["teacher"]["result"]["tasks"]["coin_flip"]
    curated = stages["curate-fine_tune_cot"]["result"]["tasks"]["coin_flip"]
    test = read_json(Path(summary["run_dir"]) / "eval" / "fine_tune_cot" / "metrics.json")["tasks"]["coin_flip"]
    return {"teacher_tokens": teacher["prompt_tokens"] + teacher["completion_tokens"],
            "teacher_completion_tokens": teacher["completion_tokens"], "samples": teacher["samples"],
            "samples_per_question": teacher["samples_per_question"], "teacher_s": stages["teacher"]["wall_s"],
            "kept": curated["kept"], "questions": curated["questions"],
            "questions_kept": curated["questions"] - curated["questions_without_sample"],
            "kept_per_question": curated["kept_per_question"],
            "test_accuracy": test["accuracy"], "test_accuracy_ci": test["accuracy_ci"], "majority": test["majority"],
            "collapsed": test["collapsed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--max-samples", type=int, default=16, help="B (and the fixed D)")
    parser.add_argument("--min-correct", type=int, default=2, help="m")
    parser.add_argument("--round-size", type=int, default=2, help="r")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--work", help="run folders here (default: a temporary folder)")
    args = parser.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="fcot-bench-adaptive-")

    from fcot.config import load_config
    from fcot.run import RunConfig, run

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for name, sampling in (("fixed", {"num_samples": args.max_samples}),
                           ("adaptive", {"adaptive": {"min_correct": args.min_correct, "max_samples": args.max_samples,
                                                      "round_size": args.round_size}})):
        started = time.time()
        summary = run(load_config(RunConfig, base=run_config(args, name, sampling)), log=log)
        results[name] = figures(summary) | {"wall_s": round(time.time() - started, 1)}
        log(f"{name}: {json.dumps(results[name])}")
    fixed, adaptive = results["fixed"], results["adaptive"]
    out = {"token_ratio": round(adaptive["teacher_tokens"] / fixed["teacher_tokens"], 3),
           "completion_token_ratio": round(adaptive["teacher_completion_tokens"]
                                           / fixed["teacher_completion_tokens"], 3),
           "kept_questions_ratio": round(adaptive["questions_kept"] / max(1, fixed["questions_kept"]), 3),
           "questions": args.questions, "max_samples": args.max_samples, "min_correct": args.min_correct,
           "round_size": args.round_size, "fixed": fixed, "adaptive": adaptive}
    import ray

    ray.shutdown()  # workers' buffered log lines reach stdout before this, so the JSON stays the last line
    print(json.dumps(out))


if __name__ == "__main__":
    main()
