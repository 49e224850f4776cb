"""On-policy distillation against continued SFT and offline KD at this machine's scale, at equal student steps.

    FCOT_DATA_DIR=../shared/data .venv/bin/python experiments/bench/on_policy.py [--questions 120] [--samples 4]
        [--sft-epochs 8] [--rounds 2] [--hidden 128] [--layers 4] [--test 60] [--out runs/bench_on_policy]

The teacher: the bundled SmolLM2-135M-Instruct, live (hf engine), zero-shot CoT with D samples per question and its
top-20 logprobs, on the first --questions MultiArith training questions. The student: kd.py's SmolLM2-shaped model
of ~7.3M parameters (SmolLM2's tokenizer, random init), first fine-tuned on the teacher's rationales (Fine-tune-CoT,
`curate.filter: all`, --sft-epochs). From that student, three continuations, each with the same student steps S:
  on_policy  `fcot run` of the same run with methods [fine_tune_cot, on_policy] (the SFT stages are found done):
             --rounds rounds of its own samples (--samples per question, T = 1) graded by the teacher, the reverse KL
             at every rationale token; S = its steps over all rounds
  sft        Fine-tune-CoT training continued on the same curated rows for S steps (`fcot train`, max_steps)
  kd         offline KD on the teacher's top-20 of the same rows (objective kd, alpha 0.5, T = 1) for S steps
Measured for the start and each continuation, on the dev questions curation held out (never trained on): the
per-token KL(student || teacher) on the student's own samples (fcot.rollout with that student: the mean over the
graded tokens of log p_student - log p_teacher of the sampled token), the per-token KL(teacher's top-20 || student)
on the teacher's rationales (kd.py's teacher_kl), dev accuracy, and test accuracy on --test questions with 95%
intervals beside the majority rate; and the teacher tokens each used (its samples; the on-policy grades on top).
The last line is JSON: {"kl_own": {student: KL}, "kl_teacher": {...}, "runs": {...}}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from kd import ROOT, TEACHER_LOGPROBS, _pct, make_student, teacher_kl  # this folder's KD bench: one home each


def run_config(args, out: Path, student: Path, methods: list[str]) -> dict:
    return {
        "name": "on-policy-bench", "output_dir": str(out / "run"), "tasks": ["multiarith"], "methods": methods,
        "baselines": [], "wandb_mode": "disabled",
        "teacher": {"output_dir": str(out / "teacher"), "subset": args.questions,
                    "engine": {"kind": "hf", "model": "smollm2-135m", "cpus_per_replica": 2, "hf_batch_size": 32},
                    "sampling": {"num_samples": args.samples, "max_new_tokens": args.max_new_tokens,
                                 "logprobs": TEACHER_LOGPROBS}},
        "curate": {"filter": "all", "train_questions": 0.8, "max_length": 256},
        "train": {"model": str(student), "epochs": args.sft_epochs, "batch_size": 16, "lr": 1e-3, "packing": True,
                  "num_workers": 1, "cpus_per_worker": 2, "selection": "last"},
        "eval": {"subset": args.test, "max_new_tokens": args.max_new_tokens + 32,
                 "engine": {"cpus_per_replica": 2, "hf_batch_size": 32}},
        "on_policy": {"rounds": args.rounds, "samples_per_question": args.samples, "temperature": 1.0,
                      "max_new_tokens": args.max_new_tokens, "lr": args.lr,
                      "teacher": {"kind": "hf", "model": "smollm2-135m", "cpus_per_replica": 2, "batch_size": 32}},
    }


def fcot(*argv: str) -> float:
    started = time.time()
    subprocess.run([str(Path(sys.executable).parent / "fcot"), *argv], check=True, cwd=ROOT)
    return round(time.time() - started, 1)


def write(out: Path, name: str, config: dict) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def continued(args, out: Path, run: Path, kind: str, steps: int) -> dict:
    """The SFT student trained `steps` more steps on the run's curated rows: Fine-tune-CoT (sft) or offline KD."""
    curated = run / "curated" / "fine_tune_cot"
    data = curated / "train"
    if kind == "kd":  # the same rows with the teacher's top-k carried (curate.teacher_logprobs)
        data = out / "curated_kd" / "train"
    objective = {"kind": "kd", "temperature": 1.0, "alpha": 0.5} if kind == "kd" else {"kind": "sft"}
    cfg = {"data": str(data), "model": str(run / "students" / "fine_tune_cot" / "model"),
           "output_dir": str(out / kind), "epochs": 1000, "max_steps": steps, "batch_size": 16, "lr": args.lr,
           "packing": True, "num_workers": 1, "cpus_per_worker": 2, "selection": "last", "objective": objective,
           "dev": {"path": str(curated / "dev.jsonl"), "format": "fine_tune_cot", "every": 1000},  # at the end
           "wandb": {"mode": "disabled"}}
    seconds = fcot("train", str(write(out, f"train_{kind}", cfg)))
    return {"model": str(out / kind / "model"), "seconds": seconds}


def curate_with_logprobs(out: Path, run: Path) -> None:
    """The run's Fine-tune-CoT curation again with the teacher's top-k carried (for the offline KD student)."""
    config = json.loads((run / "config.json").read_text())["curate"]
    config.update(method="fine_tune_cot", output_dir=str(out / "curated_kd"), teacher_logprobs=True)
    fcot("curate", str(write(out, "curate_kd", config)))


def own_kl(args, out: Path, run: Path, name: str, model: str) -> dict:
    """The student's per-token KL to the teacher on its own samples of the held-out (dev) questions: a rollout."""
    cfg = {"questions": str(run / "curated" / "fine_tune_cot" / "dev.jsonl"), "tasks": ["multiarith"],
           "method": "fine_tune_cot", "samples_per_question": args.samples, "temperature": 1.0,
           "max_new_tokens": args.max_new_tokens, "output_dir": str(out / "held_out" / name),
           "student": {"kind": "hf", "model": model, "cpus_per_replica": 2, "batch_size": 32},
           "teacher": {"kind": "hf", "model": "smollm2-135m", "cpus_per_replica": 2, "batch_size": 32}}
    fcot("rollout", str(write(out, f"rollout_{name}", cfg)))
    stats = json.loads((out / "held_out" / name / "stats.json").read_text())
    return {k: stats[k] for k in ("kl_per_token", "graded_tokens", "samples", "accuracy")}


def test_accuracy(args, out: Path, name: str, model: str) -> dict:
    cfg = {"engine": {"model": model, "cpus_per_replica": 2, "hf_batch_size": 32}, "tasks": ["multiarith"],
           "method": "fine_tune_cot", "subset": args.test, "max_new_tokens": args.max_new_tokens + 32,
           "output_dir": str(out / "eval" / name)}
    fcot("eval", str(write(out, f"eval_{name}", cfg)))
    m = json.loads((out / "eval" / name / "metrics.json").read_text())["tasks"]["multiarith"]
    return {"test": m["accuracy"], "test_ci": m["accuracy_ci"], "majority": m["majority"], "n": m["n"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=120)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sft-epochs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4, help="the continuations' learning rate")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--test", type=int, default=60)
    p.add_argument("--out", default="runs/bench_on_policy")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = make_student(out / f"student-smollm2-h{args.hidden}x{args.layers}", args.hidden, args.layers)
    run = out / "run"
    seconds = {"start": fcot("run", str(write(out, "start", run_config(args, out, student, ["fine_tune_cot"]))))}
    seconds["on_policy"] = fcot("run", str(write(out, "on_policy", run_config(
        args, out, student, ["fine_tune_cot", "on_policy"]))))
    steps = sum(json.loads((run / "stages" / f"train-on_policy-{r}.json").read_text())["result"]["steps"]
                for r in range(1, args.rounds + 1))
    curate_with_logprobs(out, run)
    models = {"start": str(run / "students" / "fine_tune_cot" / "model"),
              "on_policy": str(run / "students" / "on_policy" / f"round_{args.rounds}" / "model")}
    for kind in ("sft", "kd"):
        done = continued(args, out, run, kind, steps)
        models[kind], seconds[kind] = done["model"], done["seconds"]
    teacher = json.loads((out / "teacher" / "summary.json").read_text())
    teacher["output_dir"] = str(out / "teacher")
    rounds = [json.loads((run / "rollouts" / "on_policy" / f"round_{r}" / "stats.json").read_text())
              for r in range(1, args.rounds + 1)]
    sampled = sum(t["prompt_tokens"] + t["completion_tokens"] for t in teacher["tasks"].values())
    runs = {}
    for name, model in models.items():
        runs[name] = {"own": own_kl(args, out, run, name, model), "steps": 0 if name == "start" else steps,
                      "teacher": teacher_kl(run, teacher, model_dir=Path(model)),
                      **test_accuracy(args, out, name, model),
                      "teacher_tokens": sampled + (sum(r["teacher_tokens"] for r in rounds)
                                                   if name == "on_policy" else 0),
                      "seconds": seconds.get(name)}
    print("| student | steps | KL / token, own samples (held-out) | KL / token, teacher's rationales (held-out) | "
          "held-out sample accuracy | test accuracy | majority | teacher tokens | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        print(f"| {name} | {r['steps']} | {r['own']['kl_per_token']:.4f} | {r['teacher']['kl_per_token']:.4f} | "
              f"{_pct(r['own']['accuracy'], None)} | {_pct(r['test'], r['test_ci'])} (n {r['n']}) | "
              f"{_pct(r['majority'], None)} | {r['teacher_tokens']:,} | {r['seconds']} |")
    print(json.dumps({"kl_own": {k: r["own"]["kl_per_token"] for k, r in runs.items()},
                      "kl_teacher": {k: r["teacher"]["kl_per_token"] for k, r in runs.items()},
                      "steps": steps, "rounds": rounds, "runs": runs}, default=str))


if __name__ == "__main__":
    main()
