"""`fcot report DIR [DIR ...]`: report.md with PNG plots, rebuilt from a run's or a sweep's folder.

Rule: no accuracy without its noise. Every accuracy is written `55.3% [47.3, 63.3]` (95% bootstrap interval over
questions), beside the rates it must beat (the test split's majority answer, random guessing on multiple
choice); a student that gives one answer to >= 90% of the questions is marked collapsed; "X over Y" is written
only with the paired-bootstrap interval of the difference, and the first lines say whether each method beat the
method it is compared with beyond the noise: its `reference` (fcot.methods), after the run's `primary_method`
against its `reference_method`. Sweeps: the same pairs, mean over seeds with an interval that resamples seeds and
questions; student size on a log axis of parameter counts, D and data size on log axes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fcot import laws
from fcot.errors import FcotError
from fcot.io import atomic_write_text, iter_jsonl, read_json
from fcot.layout import RunLayout
from fcot.methods import METHODS
from fcot.prices import Prices, stage_cost
from fcot.stats import fmt_acc, fmt_diff, paired_difference, seeds_interval, wilson

LOG_AXES = ("num_samples", "train_questions", "lr", "max_samples", "min_correct", "model")


def _plot(path: Path, draw) -> str:
    import matplotlib  # heavy: only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, as above

    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def prediction_outcomes(predictions: Path) -> dict[tuple, bool]:
    """(task, index) -> correct, from an evaluation's predictions.jsonl."""
    return {(r["task"], int(r["index"])): bool(r["correct"]) for _, r in iter_jsonl(predictions)}


def comparison(oa: dict[tuple, bool], ob: dict[tuple, bool], task: str) -> tuple[float, float, float] | None:
    """Paired bootstrap of accuracy(a) - accuracy(b) on the questions of `task` both answered."""
    keys = sorted(k for k in oa if k in ob and k[0] == task)
    return paired_difference([oa[k] for k in keys], [ob[k] for k in keys]) if keys else None


def _label(method: str, short: bool = False) -> str:
    """How reports name a method (fcot.methods: its label, `short`: its short label); a baseline by its name."""
    if method not in METHODS:
        return method
    return METHODS[method].short_label if short else METHODS[method].label


def _verdict(task: str, diff, a: str, b: str) -> str:
    """One verdict of `a` against `b`: beats or is worse only where the interval of the difference excludes 0."""
    d, lo, hi = diff
    la, lb = _label(a), _label(b)
    if lo > 0:
        return f"**{task}: {la} beats {lb} by {fmt_diff(d, lo, hi)}**: the interval excludes 0."
    if hi < 0:
        return f"**{task}: {la} is worse than {lb} by {fmt_diff(d, lo, hi)}**."
    return (f"**{task}: no significant difference between {la} and {lb}** ({fmt_diff(d, lo, hi)}; the interval "
            "includes 0).")


def compared(methods: list[str], primary: str | None = None, reference: str | None = None) -> list[tuple[str, str]]:
    """The (method, reference) pairs among `methods` that a report gives verdicts for: `primary` against
    `reference` first (the run config's `primary_method`, `reference_method`), then every method against the
    reference its Method names (fcot.methods); a pair already compared, in either order, is not repeated."""
    given = [(primary, reference)] if primary and reference else []
    pairs: list[tuple[str, str]] = []
    for a, b in [*given, *[(m, METHODS[m].reference) for m in methods if m in METHODS]]:
        if a != b and a in methods and b in methods and {a, b} not in [set(p) for p in pairs]:
            pairs.append((a, b))
    return pairs


def configured(layout: RunLayout) -> tuple[str | None, str | None]:
    """(primary_method, reference_method) of a run as its config.json names them (None: not named)."""
    cfg = read_json(layout.config) if layout.config.exists() else {}
    return cfg.get("primary_method"), cfg.get("reference_method")


def stage_name(name: str) -> tuple[str, str]:
    """A stage's (kind, subject): fcot.run.stages names each stage KIND or KIND-SUBJECT (`teacher`,
    `teacher-NAME`, `curate-METHOD`, `train-METHOD`, `eval-METHOD`), and no kind has a hyphen."""
    kind, _, subject = name.partition("-")
    return kind, subject


def _results(stages: dict[str, dict], kind: str, by_stage: bool = False) -> dict[str, dict]:
    """{subject: result} of a run's stages of one kind, in the chain's order (`by_stage`: keyed by stage name)."""
    return {(n if by_stage else stage_name(n)[1]): m["result"] for n, m in stages.items() if stage_name(n)[0] == kind}


@dataclass(frozen=True)
class RunView:
    """What a run's report reads: its stage markers in the chain's order, their results by kind, its tasks, and
    the test outcomes of each student that was trained and evaluated."""

    layout: RunLayout
    stages: dict[str, dict]  # stage name -> marker
    teachers: dict[str, dict]  # stage name (`teacher`, `teacher-NAME`) -> result
    curates: dict[str, dict]  # method -> result
    trains: dict[str, dict]
    evals: dict[str, dict]  # method or baseline -> result
    rounds: dict[str, list[dict]]  # on-policy method -> per round: {round, rollout, train} results
    tasks: list[str]
    outcomes: dict[str, dict[tuple, bool]]  # student -> (task, index) -> correct

    def rates(self, task: str) -> dict | None:
        """The metrics of `task` that hold its test split's rates to beat (majority, random): the first eval's."""
        return next((e["tasks"][task] for e in self.evals.values() if task in e["tasks"]), None)


def read_run(run_dir: str | Path) -> RunView:
    """A run folder's markers (stages/), in the order summary.json gives, then any others by name."""
    layout = RunLayout(Path(run_dir))
    if not layout.stages.is_dir():
        raise FcotError(f"{run_dir}: not a run directory (no stages/ folder)")
    found = {p.stem: read_json(p) for p in sorted(layout.stages.glob("*.json"))}
    order = read_json(layout.summary).get("order", []) if layout.summary.exists() else []
    stages = {name: found[name] for name in [*order, *sorted(found)] if name in found}  # the chain's order
    teacher = stages.get("teacher", {}).get("result", {})
    evals, trains = _results(stages, "eval"), _results(stages, "train")
    rounds: dict[str, list[dict]] = {}  # an on-policy method's stages are rollout-METHOD-R and train-METHOD-R
    for subject, result in _results(stages, "rollout").items():
        method, _, r = subject.rpartition("-")
        rounds.setdefault(method, []).append({"round": int(r), "rollout": result, "train": trains.pop(subject, None)})
    for method, done in rounds.items():  # its student is its last round's
        if done[-1]["train"] is not None:
            trains[method] = done[-1]["train"]
    tasks = list(dict.fromkeys(t for e in evals.values() for t in e["tasks"])) or list(teacher.get("tasks", {}))
    students = [m for m in trains if m in evals and (layout.eval(m) / "predictions.jsonl").exists()]
    outcomes = {m: prediction_outcomes(layout.eval(m) / "predictions.jsonl") for m in students}
    return RunView(layout, stages, _results(stages, "teacher", by_stage=True), _results(stages, "curate"), trains,
                   evals, rounds, tasks, outcomes)


def build_report(run_dir: str | Path) -> Path:
    """report.md of a run, and its plots: the verdicts first, then the test accuracy (with the k-sample views,
    every pair of students and the teachers), training and model selection, curation, and time, tokens and cost."""
    run = read_run(run_dir)
    lines = [f"# fcot run: {run.layout.root.name}", ""]
    for section in (_verdicts, _collapsed, _accuracy, _sampled, _every_pair, _teachers):
        lines += section(run)
    lines.append("")  # the end of the accuracy section
    for section in (_accuracy_plot, _training, _rounds, _curation, _costs):
        lines += section(run)
    return atomic_write_text(run.layout.report, "\n".join(lines) + "\n")


def _verdicts(run: RunView) -> list[str]:
    """The verdicts first: each compared pair of students (`compared`), per task, beyond the noise or not."""
    lines = []
    for a, b in compared(list(run.outcomes), *configured(run.layout)):
        for task in run.tasks:
            diff = comparison(run.outcomes[a], run.outcomes[b], task)
            if diff is not None:
                lines += [_verdict(task, diff, a, b) + " (paired bootstrap over the test questions, 95%)", ""]
    return lines


def _collapsed(run: RunView) -> list[str]:
    """The students (and baselines) that gave one answer to >= 90% of a task's questions, named up front."""
    collapsed = [f"{m} on {t}" for m, e in run.evals.items() for t, x in e["tasks"].items() if x.get("collapsed")]
    return [f"Collapsed (one answer for ≥ 90% of the questions): {', '.join(collapsed)}.", ""] if collapsed else []


def _accuracy(run: RunView) -> list[str]:
    """Every evaluated method's test accuracy per task with its interval, beside the task's rates to beat."""
    lines = ["## Accuracy on the test split", "",
             "95% bootstrap intervals over questions. `majority`: always the test split's most frequent answer; "
             "`random`: a uniform guess among the choices.", "",
             "| task | method | accuracy | n | correct format | most frequent prediction | |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for task in run.tasks:
        for method, e in run.evals.items():
            m = e["tasks"].get(task)
            if m is None:
                continue
            mark = "**collapsed**" if m.get("collapsed") else ""
            top = f"{m.get('top_prediction')} ({100 * m.get('top_prediction_share', 0):.0f}%)"
            lines.append(f"| {task} | {method} | {fmt_acc(m['accuracy'], m.get('accuracy_ci'))} | {m['n']} | "
                         f"{100 * m['correct_format']:.0f}% | {top} | {mark} |")
        ref = run.rates(task)
        if ref is not None:
            lines.append(f"| {task} | majority (`{ref['majority_answer']}`) | {fmt_acc(ref['majority'])} | {ref['n']} "
                         f"| | | |")
            if ref.get("random") is not None:
                lines.append(f"| {task} | random guess | {fmt_acc(ref['random'])} | {ref['n']} | | | |")
    return lines


def _sampled(run: RunView) -> list[str]:
    """Self-consistency: every sample kept, so all three views of k samples per question."""
    sampled = [(t, method, m) for t in run.tasks for method, e in run.evals.items()
               if (m := e["tasks"].get(t)) is not None and m.get("k", 1) > 1]
    if not sampled:
        return []
    return ["", "k samples per question: pass@1 is their mean accuracy, maj@k the majority vote's (the accuracy "
            "above), pass@k whether any is right; 95% bootstrap intervals over questions.", "",
            "| task | method | k | pass@1 | maj@k | pass@k |", "| --- | --- | --- | --- | --- | --- |",
            *[f"| {t} | {method} | {m['k']} | {fmt_acc(m['pass@1'], m['pass@1_ci'])} | "
              f"{fmt_acc(m['maj@k'], m['maj@k_ci'])} | {fmt_acc(m['pass@k'], m['pass@k_ci'])} |"
              for t, method, m in sampled]]


def _every_pair(run: RunView) -> list[str]:
    """Every pair of trained methods (more than one pair only), paired over the same test questions."""
    students = list(run.outcomes)
    pairs = [(a, b) for i, a in enumerate(students) for b in students[i + 1:]]
    if len(pairs) <= 1:
        return []
    lines = ["", "Every pair of trained methods (row − column method's accuracy on the same test questions, "
             "paired bootstrap, 95%):", "", "| task | methods | difference |", "| --- | --- | --- |"]
    for task in run.tasks:
        for a, b in pairs:
            diff = comparison(run.outcomes[a], run.outcomes[b], task)
            if diff is not None:
                lines.append(f"| {task} | {_label(a)} − {_label(b)} | {fmt_diff(*diff)} |")
    return lines


def _teachers(run: RunView) -> list[str]:
    """Each teacher on the training questions it labeled: its accuracy over all samples, with a Wilson interval."""
    if not run.teachers:
        return []
    lines = ["", "Teachers on the training questions they label (the students learn from `teacher`; samples per "
             "question: how many questions got how many samples):", "",
             "| stage | task | teacher | samples | correct (all samples, 95% interval) | questions with a correct "
             "sample | samples per question | tokens |", "|" + " --- |" * 8]
    for stage, result in run.teachers.items():
        ident = result.get("teacher", {})
        for task, t in result["tasks"].items():
            spread = ", ".join(f"{k}: {v}" for k, v in (t.get("samples_per_question") or {}).items())
            acc = t.get("accuracy_all_samples")
            n = t["samples"]
            ci = None if acc is None or not n else wilson(acc, n)
            lines.append(f"| {stage} | {task} | {ident.get('engine', '')} {ident.get('model', '')} | {n} | "
                         f"{fmt_acc(acc, ci)} | {t['questions_with_a_correct_sample']} of {t['questions']} | "
                         f"{spread} | {t['prompt_tokens'] + t['completion_tokens']:,} |")
    return lines


def _draw_accuracy(plt, run: RunView):
    """Bars per task, one per evaluated method with its interval; the majority rate as a dashed line."""
    evals, tasks = run.evals, run.tasks
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * (len(evals) + 1) * max(1, len(tasks))), 3.6))
    width = 0.8 / max(1, len(evals))
    for j, (method, e) in enumerate(evals.items()):
        xs, ys, err = [], [], [[], []]
        for i, task in enumerate(tasks):
            m = e["tasks"].get(task)
            if m is None:
                continue
            lo, hi = m.get("accuracy_ci") or (m["accuracy"], m["accuracy"])
            xs.append(i + j * width)
            ys.append(100 * m["accuracy"])
            err[0].append(100 * (m["accuracy"] - lo))
            err[1].append(100 * (hi - m["accuracy"]))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=method)
    for i, task in enumerate(tasks):
        ref = run.rates(task)
        if ref is not None:
            ax.hlines(100 * ref["majority"], i - width / 2, i + width * (len(evals) - 0.5), colors="k",
                      linestyles="--", label="majority" if i == 0 else None)
    ax.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(tasks))], tasks)
    ax.set(ylabel="test accuracy (%)", ylim=(0, 105), title="Students and baselines (95% intervals)")
    ax.legend(fontsize=8, ncol=3)
    return fig


def _accuracy_plot(run: RunView) -> list[str]:
    """accuracy.png: every evaluated method per task, with its interval and the majority rate."""
    if not (run.tasks and run.evals):
        return []
    return [f"![accuracy]({_plot(run.layout.root / 'accuracy.png', lambda plt: _draw_accuracy(plt, run))})", ""]


def _training(run: RunView) -> list[str]:
    """Each student's training and the epoch chosen on dev (never on test), with curves.png."""
    if not run.trains:
        return []
    lines = ["## Training and model selection", "",
             "The student is the epoch with the best dev accuracy (`selection: best_dev`; dev questions are "
             "carved from the training questions) or the last epoch; the test split never chooses.", "",
             "| student | parameters | steps | final loss | tokens/s | selected epoch | its dev accuracy | dev "
             "questions |", "|" + " --- |" * 8]
    for method, r in run.trains.items():
        dev = r.get("dev") or []
        params = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "—"
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "—"
        lines.append(f"| {method} | {params} | {r['steps']} | {loss} | {r['tokens_per_s']:.0f} | "
                     f"{r.get('selected_epoch', '—')} of {r.get('epochs', '—')}"
                     f"{' (early stop)' if r.get('stopped_early') else ''} | "
                     f"{fmt_acc(r.get('selected_dev_accuracy'), r.get('selected_dev_accuracy_ci'))} | "
                     f"{dev[0]['n'] if dev else '—'} |")
    lines += ["", "The dev accuracy of every epoch is in the plot, with its 95% interval for the dev split's size."
              + (" Early stop: training ended once `train.patience` dev evaluations in a row had not beaten the "
                 "best." if any(r.get("stopped_early") for r in run.trains.values()) else "")]
    return lines + ["", f"![curves]({_plot(run.layout.root / 'curves.png', lambda plt: _draw_curves(plt, run))})",
                    ""]


def _rounds(run: RunView) -> list[str]:
    """Each round of an on-policy student: its own samples, how far they are from the teacher, what it learned."""
    if not run.rounds:
        return []
    lines = ["## On-policy rounds", "",
             "Each round the student samples its own rationales of the training questions, the teacher grades every "
             "rationale token, and the student trains on them (fcot.rollout). KL: the mean over the graded tokens "
             "of log p_student - log p_teacher of the sampled token, an estimate of the per-token KL(student || "
             "teacher) of the round's student on its own samples (lower: closer to the teacher).", "",
             "| method | round | samples | their accuracy | graded tokens | KL per token | dev accuracy after | "
             "student tokens | teacher tokens |", "|" + " --- |" * 9]
    for method, done in run.rounds.items():
        for d in done:
            ro, tr = d["rollout"], d["train"] or {}
            acc = "—" if ro.get("accuracy") is None else f"{100 * ro['accuracy']:.1f}%"
            lines.append(f"| {method} | {d['round']} | {ro['samples']} | {acc} | {ro['graded_tokens']:,} | "
                         f"{ro['kl_per_token']:.3f} | "
                         f"{fmt_acc(tr.get('selected_dev_accuracy'), tr.get('selected_dev_accuracy_ci'))} | "
                         f"{ro['student_tokens']:,} | {ro['teacher_tokens']:,} |")
    return lines + [""]


def _draw_curves(plt, run: RunView):
    """Each student's training loss per step, and its dev accuracy per epoch with a band and the selected star."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for method, r in run.trains.items():
        axes[0].plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=method)
        if r.get("dev"):
            epochs = [d["epoch"] for d in r["dev"]]
            line, = axes[1].plot(epochs, [100 * d["accuracy"] for d in r["dev"]], "o-", label=method)
            band = [wilson(d["accuracy"], max(1, d["n"])) for d in r["dev"]]
            axes[1].fill_between(epochs, [100 * lo for lo, _ in band], [100 * hi for _, hi in band],
                                 color=line.get_color(), alpha=0.15)
            sel = next((d for d in r["dev"] if d["epoch"] == r.get("selected_epoch")), None)
            if sel:
                axes[1].plot([sel["epoch"]], [100 * sel["accuracy"]], "*", ms=14, color=line.get_color())
    axes[0].set(xlabel="optimizer step", ylabel="train loss", title="Training loss")
    axes[1].set(xlabel="epoch", ylabel="dev accuracy (%)", title="Dev accuracy (★ selected)")
    for ax in axes:
        ax.legend(fontsize=8)
    return fig


def _curation(run: RunView) -> list[str]:
    """What curation kept and dropped per method and task, its majority labels, and kept.png."""
    if not run.curates:
        return []
    lines = ["## Curation", "", "| method | task | samples | kept | incorrect or none | too long | duplicates | "
             "questions without a sample | kept per question | dev questions |", "|" + " --- |" * 10]
    for method, c in run.curates.items():
        for task, s in c["tasks"].items():
            spread = ", ".join(f"{k}: {v}" for k, v in (s.get("kept_per_question") or {}).items())
            lines.append(f"| {method} | {task} | {s.get('samples', 0)} | {s.get('kept', 0)} | "
                         f"{sum(s.get(f'dropped_{k}', 0) for k in ('incorrect', 'no_answer', 'no_rationale'))} | "
                         f"{s.get('dropped_too_long', 0)} | "
                         f"{s.get('dropped_duplicate', 0)} | {s.get('questions_without_sample', 0)} of "
                         f"{s.get('questions', 0)} | {spread or '—'} | {s.get('dev_questions', 0)} |")
    lines += ["", "Incorrect or none: samples off the label (`curate.filter: correct`), or with no answer or no "
              "rationale. Kept per question: how many training questions kept how many rationales (0: none)."]
    lines += _majority_labels(run)
    rationales = [m for m in run.curates if m in METHODS and METHODS[m].uses_rationales]
    if rationales:  # the first method that keeps the teacher's samples (they all keep the same ones)
        c = run.curates[rationales[0]]["tasks"]
        lines += ["", f"![kept]({_plot(run.layout.root / 'kept.png', lambda plt: _draw_kept(plt, c))})"]
    return lines + [""]


def _majority_labels(run: RunView) -> list[str]:
    """Curation's majority labels (`curate.label: majority`), and how often they equal the gold answer."""
    labels = [(m, t, s["labels"]) for m, c in run.curates.items() for t, s in c["tasks"].items() if s.get("labels")]
    if not labels:
        return []
    lines = ["", "Majority labels (`curate.label: majority`): a training question's label is the most "
             "frequent answer among its samples, given when at least `min_votes` reach it; where the question "
             "has gold, how often the label equals it, with its 95% Wilson interval.", "",
             "| method | task | labeled questions | min votes | label = gold |", "|" + " --- |" * 5]
    for method, task, lab in labels:
        equal = ("—" if not lab["labeled_with_gold"] else
                 f"{lab['label_equals_gold']} of {lab['labeled_with_gold']} "
                 f"({fmt_acc(lab['label_equals_gold_rate'], lab['label_equals_gold_ci'])})")
        lines.append(f"| {method} | {task} | {lab['labeled']} of {lab['questions']} | {lab['min_votes']} | "
                     f"{equal} |")
    return lines


def _draw_kept(plt, c: dict):
    """The share of the teacher's samples curation kept, per task."""
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(c)), 3))
    values = [100 * s.get("kept", 0) / max(1, s.get("samples", 0)) for s in c.values()]
    ax.bar_label(ax.bar(list(c), values), fmt="%.0f")
    ax.set(ylabel="kept (%)", ylim=(0, 105), title="Teacher samples kept by curation")
    return fig


def _price_list(prices: Prices) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in prices.model_dump().items() if v is not None)


def _costs(run: RunView) -> list[str]:
    """The ledger: each stage's wall, CPU and GPU seconds, what it reserved and its precision; teacher tokens,
    what a teacher record costs on disk, and cost.png."""
    prices = Prices(**(read_json(run.layout.config).get("prices") or {})) if run.layout.config.exists() else Prices()
    money = ["", f"Cost at the run's prices (fcot.prices: {_price_list(prices)}): what each stage held and, for a "
             "teacher behind an API, its tokens."] if prices.set else []
    lines = ["## Time, tokens and cost", "",
             "CPU-seconds are the CPU time of every process that worked for a stage (driver, Ray actors, training "
             "workers); GPU-seconds the time each stage's workers held their GPUs; `reserved` what the stage asked "
             "Ray for; `precision` the dtype the stage's model ran in, and why (fcot.hardware).", *money, "",
             "| stage | wall s | CPU s | GPU s | reserved | precision |" + " cost |" * prices.set,
             "| --- " * (6 + prices.set) + "|"]
    for name, m in run.stages.items():
        reserved = ", ".join(f"{v:g} {r}" for r, v in (m.get("reserved") or {}).items() if v) or "—"
        p = (m.get("result") or {}).get("precision")
        precision = f"{p['dtype']} ({p['why']})" if p else "—"
        cost = f" ${stage_cost(m, prices):,.4f} |" if prices.set else ""
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['cpu_s']:.0f} | {m['gpu_s']:.0f} | {reserved} | {precision} |"
                     + cost)
    if prices.set:
        lines += ["", f"The run cost ${sum(stage_cost(m, prices) for m in run.stages.values()):,.4f}."]
    tokens = sum(t.get("prompt_tokens", 0) + t.get("completion_tokens", 0)
                 for r in run.teachers.values() for t in (r.get("tasks") or {}).values())
    lines += ["", f"Teacher tokens (prompt + completion, both steps, every teacher): {tokens:,}."]
    for name, r in run.teachers.items():  # what a record costs on disk, and its share for the stored logprobs
        st = r.get("store")
        if st and st["records"]:
            k = (r.get("teacher") or {}).get("logprobs")  # asked for: else the column holds nulls only
            without = (st["bytes"] - st["logprobs_bytes"]) / st["records"]
            lp = f"; {without:,.0f} without its top-{k} logprobs" if k else ""
            lines.append(f"Teacher records of {name} on disk: {st['records']:,} in {st['bytes'] / 1e6:,.2f} MB, "
                         f"{st['bytes'] / st['records']:,.0f} bytes per record{lp}.")
    if run.stages:
        lines += ["", f"![cost]({_plot(run.layout.root / 'cost.png', lambda plt: _draw_cost(plt, run.stages))})", ""]
    return lines


def _draw_cost(plt, stages: dict[str, dict]):
    """Wall seconds per stage, in the chain's order."""
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(stages)), 3))
    ax.bar_label(ax.bar(list(stages), [m["wall_s"] for m in stages.values()]), fmt="%.0f", fontsize=8)
    ax.set(ylabel="wall seconds", title="Time per stage")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return fig


# ---------------------------------------------------------------------------------------------- sweeps

def _primary(results: dict) -> str | None:
    """A sweep's primary method (whose dev accuracy is its metric): as results.json names it, else the first."""
    methods = results.get("methods", [])
    return results.get("primary_method") or (methods[0] if methods else None)


def _compared(results: dict) -> list[tuple[str, str]]:
    """The pairs a sweep's report compares (`compared`): its trials' primary and reference method, then each
    method's reference."""
    return compared(results.get("methods", []), results.get("primary_method"), results.get("reference_method"))


def difference_key(a: str, b: str, task: str) -> str:
    """The key of a grid point's difference of method `a` minus method `b` on `task` (points.json)."""
    return f"difference/{a}/{b}/{task}"


def trial_dev_outcomes(row: dict, method: str) -> list[int] | None:
    """The selected epoch's dev outcomes of a trial's student (from its train stage's marker)."""
    if not row.get("run_dir"):
        return None
    marker = RunLayout(Path(row["run_dir"])).marker(f"train-{method}")
    if not marker.exists():
        return None
    result = read_json(marker)["result"]
    return next((d["outcomes"] for d in result.get("dev", []) if d["epoch"] == result.get("selected_epoch")
                 and "outcomes" in d), None)


def _trial_outcomes(row: dict, method: str) -> dict[tuple, bool] | None:
    """A trial's test outcomes of a method (its eval's predictions.jsonl), None where it has none."""
    if not row.get("run_dir"):
        return None
    path = RunLayout(Path(row["run_dir"])).eval(method) / "predictions.jsonl"
    return prediction_outcomes(path) if path.exists() else None


def sweep_points(results: dict) -> list[dict]:
    """One entry per grid point (its seeds together): the primary method's dev accuracy, and per method and task
    the mean test accuracy with an interval resampling seeds and questions, and each compared pair's difference
    (`compared`, at `difference_key`), paired the same way."""
    axes = results["axes"]
    points: dict[str, list[dict]] = {}
    for r in results["trials"]:
        points.setdefault(json.dumps([r.get(a) for a in axes]), []).append(r)
    out = []
    for key, rows in points.items():
        done = [r for r in rows if r["status"] == "done"]
        p = {a: v for a, v in zip(axes, json.loads(key))}
        p.update(seeds=len(done), trials=len(rows), stopped=sum(r["status"].startswith("stopped") for r in rows),
                 parameters=next((r.get("parameters") for r in rows if r.get("parameters")), None))
        p.update(_dev_point(done, _primary(results)))
        p.update(_test_point(results, done))
        out.append(p)
    return out


def _dev_point(done: list[dict], primary: str | None) -> dict:
    """A grid point's dev accuracy: the mean over seeds of the primary's selected epoch, with an interval that
    resamples seeds and dev questions where every seed's dev outcomes are stored (the same dev split)."""
    devs = [r["dev_accuracy"] for r in done if r.get("dev_accuracy") is not None]
    out = {"dev_accuracy": sum(devs) / len(devs) if devs else None}
    vectors = [v for v in (trial_dev_outcomes(r, primary) for r in done) if v] if primary else []
    if vectors and len({len(v) for v in vectors}) == 1:
        mean, lo, hi = seeds_interval(vectors)
        out.update(dev_accuracy=mean, dev_accuracy_ci=[lo, hi])
    return out


def _test_point(results: dict, done: list[dict]) -> dict:
    """A grid point's test accuracy per method and task (on the questions every seed answered) and, per task, the
    difference of each compared pair."""
    methods = results.get("methods", [])
    trial_outcomes = {m: [o for o in (_trial_outcomes(r, m) for r in done) if o] for m in methods}
    out = {}
    for task in results.get("tasks", []):
        per_method = {}
        for method in methods:
            vectors = [v for o in trial_outcomes[method] if (v := {i: c for (t, i), c in o.items() if t == task})]
            if not vectors:
                continue
            common = sorted(set.intersection(*(set(v) for v in vectors)))
            per_method[method] = [[v[i] for i in common] for v in vectors]
            mean, lo, hi = seeds_interval(per_method[method])
            out[f"{method}/{task}"] = {"mean": mean, "ci": [lo, hi],
                                       "collapsed": any(r.get(f"{method}/{task}/collapsed") for r in done),
                                       "kept": [r.get(f"{method}/kept") for r in done]}
        for a, b in _compared(results):
            diff = _seeds_difference(per_method.get(a), per_method.get(b))
            if diff is not None:
                out[difference_key(a, b, task)] = diff
    return out


def _seeds_difference(a: list | None, b: list | None) -> dict | None:
    """Mean and interval of a - b over seeds and questions; None unless both have the same seeds and questions."""
    if not a or not b or len(a) != len(b) or len(a[0]) != len(b[0]):
        return None
    mean, lo, hi = seeds_interval([[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)])
    return {"mean": mean, "ci": [lo, hi]}


def _x(point: dict, axis: str):
    """An axis value to plot: a student's parameter count for `train.model`, else the value."""
    if axis == "train.model" and point.get("parameters"):
        return point["parameters"]
    return point.get(axis)


def build_sweep_report(sweep_dir: str | Path) -> Path:
    """report.md for a sweep, and points.json: the verdicts of each compared pair over the grid, the trials, every
    grid point with intervals, the rates to beat, the best point by dev accuracy, the trials stopped or failed, and
    a plot per axis."""
    sweep_dir = Path(sweep_dir)
    results = read_json(sweep_dir / "results.json")
    points = sweep_points(results)
    atomic_write_text(sweep_dir / "points.json", json.dumps(points, indent=2) + "\n")
    lines = [f"# fcot sweep: {results['name']}", ""]
    for section in (_sweep_verdicts, _sweep_trials, _points_table):
        lines += section(results, points)
    for section in (_rates_to_beat, _best, _unfinished):
        lines += section(results)
    fitted = {axis: _fit_laws(results, axis) for axis in results["axes"]}
    joint = {pair: _fit_joint(results, pair) for pair in _numeric_pairs(results)}
    atomic_write_text(sweep_dir / "laws.json", json.dumps(
        {**{a: [{"task": k[0], "method": k[1], "others": list(k[2:]), **law} for k, law in f.items()]
            for a, f in fitted.items()},
         **{" x ".join(pair): [{"task": k[0], "method": k[1], "others": list(k[2:]), **law} for k, law in f.items()]
            for pair, f in joint.items()}}, indent=2) + "\n")
    for axis in results["axes"]:
        lines += _laws_table(axis, fitted[axis])
        name = f"sweep_{axis.replace('.', '_')}.png"
        drawn = _plot(sweep_dir / name,
                      lambda plt, axis=axis: _draw_axis(plt, [(results, points)], axis, fitted=fitted[axis],
                                                        joint={p: f for p, f in joint.items() if axis in p}))
        lines += [f"![{axis}]({drawn})", ""]
    for pair, laws_of_pair in joint.items():
        lines += _joint_table(pair, laws_of_pair)
    return atomic_write_text(sweep_dir / "report.md", "\n".join(lines) + "\n")


def _curves(results: dict, axis: str | tuple[str, str]) -> dict[tuple, list]:
    """The points of each curve along a numeric `axis`, or over a pair of them (one curve per task, method and value
    of the other axes): (x, or (x, y) for a pair, a seeds x questions 0/1 matrix of the done trials' test outcomes),
    on the questions every trial of the curve answered, in one order."""
    along = axis if isinstance(axis, tuple) else (axis,)
    others = [a for a in results["axes"] if a not in along]
    raw: dict[tuple, dict] = {}
    for r in results["trials"]:
        xs = tuple(_numeric(r, a) for a in along)
        if r["status"] != "done" or None in xs:
            continue
        for method in results.get("methods", []):
            outcomes = _trial_outcomes(r, method)
            for task in results.get("tasks", []) if outcomes else []:
                key = (task, method, *[str(r.get(o)) for o in others])
                raw.setdefault(key, {}).setdefault(xs if len(xs) > 1 else xs[0], []).append(
                    {i: c for (t, i), c in outcomes.items() if t == task})
    curves = {}
    for key, by_x in raw.items():
        common = sorted(set.intersection(*(set(v) for vs in by_x.values() for v in vs)))
        if common:
            curves[key] = [(x, [[float(v[i]) for i in common] for v in vs]) for x, vs in sorted(by_x.items())]
    return curves


def _numeric_pairs(results: dict) -> list[tuple[str, str]]:
    """The pairs of swept axes that both vary over numbers (a joint law each)."""
    numeric = [a for a in results["axes"] if len({_numeric(r, a) for r in results["trials"]} - {None}) >= 2]
    return [(a, b) for i, a in enumerate(numeric) for b in numeric[i + 1:]]


def _numeric(row: dict, axis: str) -> float | None:
    """A trial's value along a numeric axis (a student: its parameters), None where it is not a number."""
    x = row.get("parameters") if axis == "train.model" else row.get(axis)
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fit_joint(results: dict, pair: tuple[str, str]) -> dict[tuple, dict]:
    """The joint law (fcot.laws.fit_joint) of every task, method and value of the other axes over `pair`."""
    return {key: law for key, pts in _curves(results, pair).items() if (law := laws.fit_joint(pts)) is not None}


def _joint_table(pair: tuple[str, str], fitted: dict[tuple, dict]) -> list[str]:
    """report.md's table of the joint laws over two axes, as the one-axis table."""
    if not fitted:
        return []
    x, y = pair
    lines = [f"### Fitted joint laws: test accuracy against {x} and {y}", "",
             f"Form (fcot.laws.fit_joint): acc = a + b ln({x}) + c ln({y}); intervals from a bootstrap over seeds and "
             "test questions. The check: the law fitted without the largest point (by the product of the two), "
             "predicting it (extrapolated), beside the measured value.", "",
             "| task | method | other axes | parameters (95% interval) | RMSE | LOO RMSE | check at | predicted "
             "(extrapolated) | measured |", "| --- " * 9 + "|"]
    for (task, method, *others), law in fitted.items():
        params = ", ".join(f"{n} = {p['value']:.3g} [{p['ci'][0]:.3g}, {p['ci'][1]:.3g}]"
                           for n, p in law["parameters"].items())
        c = law["check"]
        check = ["—"] * 3 if c is None else [f"{c['x'][0]:g}, {c['x'][1]:g}",
                                             fmt_acc(c["predicted"], c["predicted_ci"]),
                                             fmt_acc(c["measured"], c["measured_ci"])]
        loo = "—" if law["loo_rmse"] is None else f"{100 * law['loo_rmse']:.1f} pts"
        lines.append(f"| {task} | {_label(method)} | {', '.join(others) or '—'} | {params} | "
                     f"{100 * law['rmse']:.1f} pts | {loo} | " + " | ".join(check) + " |")
    return lines + [""]


def _fit_laws(results: dict, axis: str) -> dict[tuple, dict]:
    """The law of every curve along `axis` with at least laws.MIN_POINTS values (fcot.laws)."""
    return {key: law for key, pts in _curves(results, axis).items() if (law := laws.fit(pts)) is not None}


def _laws_table(axis: str, fitted: dict[tuple, dict]) -> list[str]:
    """report.md's table of the laws along `axis`: form (chosen by held-out error), parameters with 95% intervals,
    fit quality, and the extrapolation check (the law fitted without the largest x, predicting it)."""
    if not fitted:
        return []
    lines = [f"### Fitted laws: test accuracy against {axis}", "",
             "Forms (fcot.laws): log-linear acc = a + b ln x; power err = E + A x^-alpha (acc = 1 - err), chosen by "
             "leave-one-point-out RMSE; intervals from a bootstrap over seeds and test questions. The check: the law "
             "fitted without the largest x, predicting it (extrapolated), beside the measured value.", "",
             "| task | method | other axes | form | LOO RMSE (log-linear / power) | parameters (95% interval) | RMSE "
             "| check at x | predicted (extrapolated) | measured |", "| --- " * 10 + "|"]
    for (task, method, *others), law in fitted.items():
        loo = " / ".join("—" if v is None else f"{100 * v:.1f} pts" for v in law["loo_rmse"].values())
        params = ", ".join(f"{n} = {p['value']:.3g} [{p['ci'][0]:.3g}, {p['ci'][1]:.3g}]"
                           for n, p in law["parameters"].items())
        c = law["check"]
        check = ["—"] * 3 if c is None else [f"{c['x']:g}", fmt_acc(c["predicted"], c["predicted_ci"]),
                                             fmt_acc(c["measured"], c["measured_ci"])]
        lines.append(f"| {task} | {_label(method)} | {', '.join(others) or '—'} | {law['form']} | {loo} | {params} "
                     f"| {100 * law['rmse']:.1f} pts | " + " | ".join(check) + " |")
    return lines + [""]


def _sweep_verdicts(results: dict, points: list[dict]) -> list[str]:
    """Per compared pair and task: at how many grid points the method beats its reference beyond the noise, at
    how many it is worse, and where."""
    def where(ps):
        return "; ".join(", ".join(f"{a}={p[a]}" for a in results["axes"]) for p in ps) or "none"

    lines = []
    for a, b in _compared(results):
        for t in results.get("tasks", []):
            diffs = [(p, p[k]) for p in points if (k := difference_key(a, b, t)) in p]
            if not diffs:
                continue
            better = [p for p, d in diffs if d["ci"][0] > 0]
            worse = [p for p, d in diffs if d["ci"][1] < 0]
            lines += [f"**{t}: {_label(a)} beats {_label(b)} beyond the noise at {len(better)} of {len(diffs)} "
                      f"grid points ({where(better)}), is worse at {len(worse)} ({where(worse)}), and no difference "
                      f"is established at the other {len(diffs) - len(better) - len(worse)}** ({_label(a, True)} − "
                      f"{_label(b, True)}, mean over seeds, 95% interval resampling seeds and questions).", ""]
    return lines


def _sweep_trials(results: dict, points: list[dict]) -> list[str]:
    """How many trials, how they were drawn, the shared teacher's runs and tokens, and the rule of model selection."""
    search = results.get("search")
    drawn = (f"{len(points)} points drawn by {search['algorithm']} (seed {search['seed']}) over "
             + ", ".join(f"`{k}` {next(iter(d))} {next(iter(d.values()))}" for k, d in search["space"].items())
             if search else f"{len(points)} grid points")
    return [f"{len(results['trials'])} trials ({drawn} x {len(results.get('seeds', [0]))} seeds); "
            f"teacher runs: {results['teacher_runs']} (shared by every trial, "
            f"{results.get('teacher_tokens', 0):,} tokens). Model selection: `{results['metric']}` (dev split "
            f"carved from the training questions); the test split never chooses.", ""]


def _value(v) -> str:
    """A swept value as the report shows it: a drawn float to 4 significant digits (points.json keeps it whole)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _points_table(results: dict, points: list[dict]) -> list[str]:
    """One row per grid point and task: dev accuracy, each method's test accuracy, each compared pair's difference,
    the primary's kept records per seed, seeds and stopped trials."""
    axes, methods, tasks = results["axes"], results.get("methods", []), results.get("tasks", [])
    pairs, primary = _compared(results), _primary(results)
    cols = [*axes, "dev accuracy", *[f"{m} test" for m in methods],
            *[f"{_label(a, True)} − {_label(b, True)}" for a, b in pairs], "kept", "seeds", "stopped"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for p in points:
        for task in tasks:
            cells = [_value(p.get(a)) for a in axes] + [fmt_acc(p.get("dev_accuracy"), p.get("dev_accuracy_ci"))]
            for m in methods:
                x = p.get(f"{m}/{task}")
                cells.append("—" if x is None else fmt_acc(x["mean"], x["ci"]) + (" **collapsed**" if x["collapsed"]
                                                                                   else ""))
            for a, b in pairs:
                d = p.get(difference_key(a, b, task))
                cells.append("—" if d is None else fmt_diff(d["mean"], *d["ci"]))
            kept = p.get(f"{primary}/{task}", {}).get("kept") if primary else None
            cells += [", ".join(str(k) for k in kept) if kept else "—", str(p["seeds"]), str(p["stopped"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rates_to_beat(results: dict) -> list[str]:
    """Per task, the test split's majority and random-guess rates (as the primary's trials measured them)."""
    primary, lines = _primary(results), []
    for t in results.get("tasks", []) if primary else []:
        ref = next((r for r in results["trials"] if r.get(f"{primary}/{t}/majority") is not None), None)
        if ref is not None:
            guess = ref.get(f"{primary}/{t}/random")
            lines += ["", f"The rates to beat on {t}'s test split: always its most frequent answer, "
                      f"{fmt_acc(ref[f'{primary}/{t}/majority'])}"
                      + (f"; a random guess, {fmt_acc(guess)}" if guess is not None else "")
                      + "; a student marked **collapsed** gives one answer to ≥ 90% of the questions."]
    return lines


def _best(results: dict) -> list[str]:
    """The grid point with the best mean dev accuracy, its test accuracies beside it (never used to choose)."""
    best, axes = results.get("best"), results["axes"]
    if not best:
        return []
    tests = ", ".join(f"{k.split('/')[0]} {fmt_acc(v)}" for k, v in best.items() if k.endswith("/test_accuracy"))
    return ["", "**Best by dev accuracy**: " + ", ".join(f"`{a}={_value(best[a])}`" for a in axes)
            + f" → dev {fmt_acc(best[results['metric']])} (mean of {best['seeds']} seed(s)); test: {tests}.", ""]


def _unfinished(results: dict) -> list[str]:
    """The trials a scheduler stopped early, and the trials that failed with their errors."""
    lines = []
    stopped = [t for t in results["trials"] if t["status"].startswith("stopped")]
    if stopped:
        lines += ["Stopped early by the scheduler: " + "; ".join(
            ", ".join(f"{a}={_value(t.get(a))}" for a in [*results["axes"], "train.seed"]) + f" ({t['status']})"
            for t in stopped), ""]
    errors = [t for t in results["trials"] if t["status"] == "error"]
    if errors:
        lines += ["Failed trials: " + "; ".join(f"{t.get('error', '')}" for t in errors), ""]
    return lines


def _draw_axis(plt, studies: list[tuple[dict, list[dict]]], axis: str, ax=None, fitted: dict | None = None,
               joint: dict | None = None):
    """Test accuracy against `axis`, a curve per task, method and value of the other axes; with `fitted` (a
    sweep's laws along it), each curve's law and its 95% band, dashed; with `joint` (its joint laws with another
    axis, by pair), the joint law at the curve's value of that axis, dotted."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
    numeric = True
    for results, points in studies:
        others = [a for a in results["axes"] if a != axis]
        for task in results.get("tasks", []):
            for method in results.get("methods", []):
                groups: dict[tuple, list] = {}
                for p in points:
                    x = p.get(f"{method}/{task}")
                    if x is not None and axis in p:
                        groups.setdefault(tuple(str(p.get(o)) for o in others), []).append((_x(p, axis), x))
                for key, pts in groups.items():
                    numeric &= all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pts)
                    pts.sort(key=lambda q: (isinstance(q[0], str), q[0]))
                    xs = [v if numeric else str(v) for v, _ in pts]
                    ys = [100 * m["mean"] for _, m in pts]
                    err = [[100 * (m["mean"] - m["ci"][0]) for _, m in pts],
                           [100 * (m["ci"][1] - m["mean"]) for _, m in pts]]
                    label = ", ".join([f"{task} {method}", *[f"{o.split('.')[-1]}={v}" for o, v in zip(others, key)]])
                    line = ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=label)
                    law = (fitted or {}).get((task, method, *key))
                    if law is not None and numeric:
                        c = law["curve"]
                        color = line[0].get_color()
                        ax.plot(c["x"], [100 * y for y in c["y"]], "--", color=color, linewidth=1)
                        ax.fill_between(c["x"], [100 * y for y in c["lo"]], [100 * y for y in c["hi"]], color=color,
                                        alpha=0.15, linewidth=0)
                    for pair, laws_of_pair in (joint or {}).items() if numeric else ():
                        c = _joint_curve(pair, laws_of_pair, axis, others, key, task, method)
                        if c is not None:
                            color = line[0].get_color()
                            ax.plot(c["x"], [100 * y for y in c["y"]], ":", color=color, linewidth=1)
                            ax.fill_between(c["x"], [100 * y for y in c["lo"]], [100 * y for y in c["hi"]],
                                            color=color, alpha=0.08, linewidth=0)
    if numeric and axis.endswith(LOG_AXES):
        ax.set_xscale("log", base=2 if axis.endswith(("num_samples", "max_samples", "min_correct")) else 10)
    xlabel = "student parameters" if axis == "train.model" else axis
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"test accuracy vs {axis} (mean, 95% interval)")
    ax.legend(fontsize=6)
    return fig


def _joint_curve(pair: tuple[str, str], laws_of_pair: dict, axis: str, others: list[str], key: tuple, task: str,
                 method: str) -> dict | None:
    """The joint law of `pair` along `axis` at the plotted curve's value of the pair's other axis (`key`: the
    curve's values of `others`), or None."""
    other = pair[1] if axis == pair[0] else pair[0]
    values = dict(zip(others, key))
    law = laws_of_pair.get((task, method, *[values[o] for o in others if o != other]))
    if law is None or other not in values:
        return None
    try:
        at = f"{float(values[other]):g}"
    except ValueError:
        return None
    return law["curves"]["x" if axis == pair[0] else "y"].get(at)


def build_study_report(sweep_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One figure across several sweeps (tasks): each axis they share, every sweep's curves on it."""
    studies = []
    for d in sweep_dirs:
        results = read_json(Path(d) / "results.json")
        studies.append((results, sweep_points(results)))
    axes = list(dict.fromkeys(a for r, _ in studies for a in r["axes"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def draw(plt):
        fig, grid = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 3.8), squeeze=False)
        for ax, axis in zip(grid[0], axes):
            _draw_axis(plt, [s for s in studies if axis in s[0]["axes"]], axis, ax)
        return fig

    name = _plot(out / "study.png", draw)
    lines = ["# fcot study", "", "Sweeps: " + ", ".join(f"`{r['name']}` ({', '.join(r.get('tasks', []))})"
                                                        for r, _ in studies), "", f"![study]({name})", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
