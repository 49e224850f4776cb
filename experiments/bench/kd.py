"""Logit-level KD against SFT at this machine's scale: does a student learn the teacher's distribution better from
its stored top-k logprobs than from its sampled tokens alone?

    FCOT_DATA_DIR=../shared/data .venv/bin/python experiments/bench/kd.py [--questions 150] [--samples 4]
        [--epochs 12] [--hidden 128] [--layers 4] [--label gold|majority|both] [--out runs/bench_kd]

The teacher: the bundled SmolLM2-135M-Instruct, live (hf engine), zero-shot CoT with D samples per question and
`teacher.sampling.logprobs: 20`, on the first --questions MultiArith training questions. The students: a
SmolLM2-shaped model of ~7.3M parameters (4 layers, hidden 128, SmolLM2's tokenizer: KD needs the teacher's token
ids; 6.3M of it the embedding), random init, the same seed. Both train on the same curated records
(`curate.filter: all`: every sample with an answer, as OpenThoughts found verification did not help), for the same
steps (`--epochs`, `train.selection: last`), one with `train.objective: sft`, one with
`{kind: kd, temperature: 1, alpha: 0.5}`. `curate.train_questions: 0.8` keeps a fifth of the teacher's questions
out of training: their rationales are the held-out set.

Measured per student: the per-token KL(teacher's top-20, renormalized || student) over the held-out rationale tokens
(the same alignment and KL as training, fcot.train.data.teacher_targets and fcot.train.objectives.kd_sum, T = 1),
and the same KL with the teacher's mass outside its top 20 as one more outcome (`with tail`); `--tail` adds a
KD student trained with that tail bucket (`objective.tail: true`) beside the default (without), and
its dev and test accuracy with their 95% intervals beside the majority answer (a 3M random-init student is not
expected to answer: the KL is the measure here). `--label majority` runs the same on a user task of the same questions
whose training answers are hidden (`curate.label: majority`, `min_votes: 2`: the teacher's most frequent answer labels
a question; the report states how often it equals the hidden gold). `both` (the default) runs gold, then majority.
The last line is JSON: {"kl_sft", "kl_kd", "kl_ratio", "runs": {label: {...}}} (the first three: the gold run's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEACHER_LOGPROBS = 20


def make_student(dest: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A SmolLM2-shaped decoder of a few million parameters, random init, with SmolLM2's own tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from fcot.models import resolve_model

    if (dest / "config.json").exists():
        return dest
    teacher = resolve_model("smollm2-135m")
    config = AutoConfig.from_pretrained(teacher)
    config.update(dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4))
    torch.manual_seed(seed)
    tmp = dest.with_name(dest.name + ".tmp")
    LlamaForCausalLM(config).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def hidden_gold_task(folder: Path, questions: int) -> dict:
    """MultiArith's training questions (the first `questions` of the paper's split) without their answers, and its
    test questions with theirs, as a user task: curation must label the training questions itself."""
    from fcot.tasks import load_split

    train, test = load_split("multiarith", "train")[:questions], load_split("multiarith", "test")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "multiarith_hidden.jsonl"
    rows = [{"question": s.question} for s in train] + [{"question": s.question, "answer": s.answer} for s in test]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = folder / "split.json"
    split.write_text(json.dumps({"train": list(range(len(train))), "test": list(range(len(train), len(rows)))}))
    return {"name": "multiarith_hidden", "path": str(path), "answer_type": "number", "split_file": str(split)}


def run_config(args, out: Path, student: Path, objective: dict, label: str, task) -> dict:
    majority = label == "majority"
    name = f"{label}_{student.name}_e{args.epochs}_{run_name(objective)}"  # a new setting never reuses a finished run
    return {
        "name": f"kd-{name}", "output_dir": str(out / name),
        "tasks": [task if majority else "multiarith"], "methods": ["fine_tune_cot"], "baselines": [],
        "wandb_mode": "disabled",
        "teacher": {"output_dir": str(out / f"teacher_{label}"), "subset": args.questions,
                    "engine": {"kind": "hf", "model": "smollm2-135m", "cpus_per_replica": 2, "hf_batch_size": 32},
                    "sampling": {"num_samples": args.samples, "max_new_tokens": args.max_new_tokens,
                                 "logprobs": TEACHER_LOGPROBS}},
        "curate": {"filter": "all", "train_questions": 0.8, "max_length": 256,
                   **({"label": "majority", "min_votes": 2} if majority else {})},
        "train": {"model": str(student), "epochs": args.epochs, "batch_size": 16, "lr": 1e-3, "packing": True,
                  "num_workers": 1, "cpus_per_worker": 2, "selection": "last", "objective": objective},
        "eval": {"subset": args.test, "max_new_tokens": args.max_new_tokens + 32,
                 "engine": {"cpus_per_replica": 2, "hf_batch_size": 32}},
    }


def run_name(objective: dict) -> str:
    if objective["kind"] == "sft":
        return "sft"
    tail = "_tail" if objective.get("tail") else ""
    return f"kd_t{objective['temperature']:g}_a{objective['alpha']:g}{tail}"


def teacher_kl(run_dir: Path, teacher: dict, trained_on: bool = False, model_dir: Path | None = None) -> dict:
    """The student's (the run's Fine-tune-CoT student, or `model_dir`) mean per-token KL to the teacher over the
    rationales of the teacher's questions it did not train on (or, `trained_on`, those it did) (T = 1), and how many
    tokens and rationales that is."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcot.contracts.records import RecordStore
    from fcot.prompts import FORMATS
    from fcot.train.data import Collator, teacher_targets
    from fcot.train.objectives import kd_sum

    trained = {r["index"] for r in pq.read_table(run_dir / "curated" / "fine_tune_cot" / "train").to_pylist()}
    records = RecordStore(Path(teacher["output_dir"]) / "records").read(
        teacher["teacher_id"], columns=["index", "question", "rationale", "prediction", "logprobs"]).to_pylist()
    held = [r for r in records if (r["index"] in trained) == trained_on and r["rationale"].strip()
            and r["logprobs"] and r["logprobs"]["tokens"]]
    model_dir = model_dir or run_dir / "students" / "fine_tune_cot" / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fmt = FORMATS["fine_tune_cot"]
    collate = Collator(tok, 512, encoder_decoder=False, packing=False)
    total, tail_total, tokens = 0.0, 0.0, 0
    for r in held:
        prompt = fmt.render_prompt(r["question"])  # as curation renders a pair (the answer matters not: KL is
        completion = fmt.render_target(r["prediction"] or "", r["rationale"])  # over the rationale's tokens)
        [example] = collate.encode([prompt], [completion])
        lp = r["logprobs"]
        positions, ids, values = teacher_targets(example, (lp["tokens"], lp["top_ids"], lp["top_logprobs"]))
        if not len(positions):
            continue
        with torch.no_grad():
            logits = model(torch.tensor([example[0]])).logits[0]
        at = torch.from_numpy(positions.astype("int64") - 1)  # the logits that predict each target
        ids, values = torch.from_numpy(ids.astype("int64")), torch.from_numpy(values.astype("float32"))
        total += float(kd_sum(logits[at], ids, values, 1.0, tail=False))
        tail_total += float(kd_sum(logits[at], ids, values, 1.0, tail=True))
        tokens += len(positions)
    # kl_per_token: KL(teacher's top-k renormalized || student) as before; with_tail: over the top k and the rest
    return {"kl_per_token": total / max(tokens, 1), "kl_with_tail_per_token": tail_total / max(tokens, 1),
            "tokens": tokens, "rationales": len(held), "questions": len({r["index"] for r in held})}


def fcot_run(config: dict, out: Path) -> float:
    path = out / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    subprocess.run([str(Path(sys.executable).parent / "fcot"), "run", str(path)], check=True, cwd=ROOT)
    return time.time() - started


def accuracy(run_dir: Path, task: str) -> dict:
    from fcot.stats import accuracy_interval

    summary = json.loads((run_dir / "summary.json").read_text())
    dev = json.loads((run_dir / "stages" / "train-fine_tune_cot.json").read_text())["result"]
    test = json.loads((run_dir / "eval" / "fine_tune_cot" / "metrics.json").read_text())["tasks"][task]
    selected = next((d for d in dev.get("dev") or [] if d["epoch"] == dev.get("selected_epoch")), None)
    return {"test": test["accuracy"], "test_ci": test.get("accuracy_ci"), "test_n": test["n"],
            "majority": test.get("majority"), "dev": selected and selected["accuracy"],
            "dev_ci": selected and accuracy_interval(selected["outcomes"]), "dev_n": selected and selected["n"],
            "run": summary.get("output_dir")}


def bench(args, out: Path, student: Path, label: str) -> dict:
    task = hidden_gold_task(out / "data", args.questions) if label == "majority" else "multiarith"
    name = task["name"] if isinstance(task, dict) else task
    result = {"seconds": {}}
    kd = {"kind": "kd", "temperature": args.temperature, "alpha": args.alpha}
    students = [("sft", {"kind": "sft"}), ("kd", kd), *[("kd_tail", {**kd, "tail": True})] * args.tail]
    for kind, objective in students:
        config = run_config(args, out, student, objective, label, task)
        result["seconds"][kind] = round(fcot_run(config, out), 1)
        run_dir = Path(config["output_dir"])
        teacher = json.loads((Path(config["teacher"]["output_dir"]) / "summary.json").read_text())
        teacher["output_dir"] = config["teacher"]["output_dir"]
        result[kind] = {"kl": teacher_kl(run_dir, teacher), "kl_trained_on": teacher_kl(run_dir, teacher, True),
                        "accuracy": accuracy(run_dir, name)}
        stats = json.loads((run_dir / "curated" / "fine_tune_cot" / "stats.json").read_text())["tasks"][name]
        result["curated"] = {k: stats.get(k) for k in ("samples", "kept", "questions", "dev_questions", "labels")}
        result["teacher"] = {"records": teacher["records"], "generated": teacher["generated"],
                             "wall_s": teacher["wall_s"], "store": teacher.get("store")}
    result["kl_ratio"] = result["kd"]["kl"]["kl_per_token"] / result["sft"]["kl"]["kl_per_token"]
    if args.tail:
        result["kl_ratio_tail"] = result["kd_tail"]["kl"]["kl_per_token"] / result["sft"]["kl"]["kl_per_token"]
    if label == "majority":
        result["majority_vs_hidden_gold"] = label_agreement(Path(config["output_dir"]), args.questions)
    return result


def label_agreement(run_dir: Path, questions: int) -> dict:
    """How often the majority label a training question got equals its hidden gold answer, with its interval."""
    import pyarrow.parquet as pq

    from fcot.scoring import score
    from fcot.stats import accuracy_interval
    from fcot.tasks import get_task, load_split

    gold = load_split("multiarith", "train")[:questions]
    pairs = pq.read_table(run_dir / "curated" / "fine_tune_cot" / "train").to_pylist()
    labels = {p["index"]: p["completion"].rsplit(" --> ", 1)[1].removesuffix(" END") for p in pairs}
    agree = [score(get_task("multiarith"), label, gold[i].answer).correct for i, label in sorted(labels.items())]
    return {"labeled": len(agree), "equal": sum(agree), "rate": sum(agree) / max(len(agree), 1),
            "ci": accuracy_interval(agree) if agree else None}


def _pct(x, ci) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=150)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--hidden", type=int, default=128, help="the student's hidden size (4 heads, MLP 4x)")
    p.add_argument("--layers", type=int, default=4, help="the student's layers")
    p.add_argument("--test", type=int, default=90, help="test questions evaluated")
    p.add_argument("--label", choices=["gold", "majority", "both"], default="both")
    p.add_argument("--alpha", type=float, default=0.5, help="train.objective.alpha of the KD student")
    p.add_argument("--temperature", type=float, default=1.0, help="train.objective.temperature of the KD student")
    p.add_argument("--tail", action="store_true",
                   help="also a KD student with the tail bucket (objective.tail true), to compare")
    p.add_argument("--out", default="runs/bench_kd")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = make_student(out / f"student-smollm2-h{args.hidden}x{args.layers}", args.hidden, args.layers)
    runs = {label: bench(args, out, student, label)
            for label in (["gold", "majority"] if args.label == "both" else [args.label])}
    for label, r in runs.items():
        print(f"\n{label} labels: teacher {r['teacher']['records']} records ({r['teacher']['wall_s']:.0f} s), curated "
              f"{r['curated']}")
        print("| student | held-out KL / token | with tail | tokens | KL / token on its training rationales | "
              "dev accuracy | test accuracy | majority answer | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for kind in [k for k in ("sft", "kd", "kd_tail") if k in r]:
            k, a = r[kind]["kl"], r[kind]["accuracy"]
            fitted = r[kind]["kl_trained_on"]["kl_per_token"]
            print(f"| {kind} | {k['kl_per_token']:.4f} | {k['kl_with_tail_per_token']:.4f} | {k['tokens']:,} | "
                  f"{fitted:.4f} | "
                  f"{_pct(a['dev'], a['dev_ci'])} | "
                  f"{_pct(a['test'], a['test_ci'])} (n {a['test_n']}) | {_pct(a['majority'], None)} | "
                  f"{r['seconds'][kind]:.0f} |")
        print(f"KD / SFT held-out KL: {r['kl_ratio']:.3f}")
        if "majority_vs_hidden_gold" in r:
            m = r["majority_vs_hidden_gold"]
            print(f"Majority labels: {m['labeled']} questions labeled, {m['equal']} equal to the hidden gold "
                  f"({_pct(m['rate'], m['ci'])})")
    first = runs.get("gold") or next(iter(runs.values()))
    print(json.dumps({"kl_sft": first["sft"]["kl"]["kl_per_token"], "kl_kd": first["kd"]["kl"]["kl_per_token"],
                      "kl_ratio": first["kl_ratio"], "runs": runs}, default=str))


if __name__ == "__main__":
    main()
