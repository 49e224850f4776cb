"""`fcot report RUN_DIR`: report.md with PNG plots, rebuilt from a run directory's stage markers.

A person should rather look at it than read logs: accuracy of teacher, students and baselines; training
and dev curves; the teacher's kept fraction per task; time and tokens per stage; and the cost ledger.
"""

from __future__ import annotations

from pathlib import Path

from fcot.errors import FcotError
from fcot.io import atomic_write_text, read_json


def _load_stages(run_dir: Path) -> dict[str, dict]:
    folder = run_dir / "stages"
    if not folder.is_dir():
        raise FcotError(f"{run_dir}: not a run directory (no stages/ folder)")
    return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _plot(path: Path, draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def build_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    stages = _load_stages(run_dir)
    teacher = stages.get("teacher", {}).get("result", {})
    tasks = list((teacher.get("tasks") or {}).keys())
    evals = {name[len("eval-"):]: m["result"] for name, m in stages.items() if name.startswith("eval-")}
    trains = {name[len("train-"):]: m["result"] for name, m in stages.items() if name.startswith("train-")}
    curates = {name[len("curate-"):]: m["result"] for name, m in stages.items() if name.startswith("curate-")}
    lines = [f"# fcot run: {run_dir.name}", ""]

    # Accuracy table: teacher, trained students, baselines.
    lines += ["## Accuracy (test split unless noted)", "", "| task | teacher (train, greedy) | teacher (train, all samples) | "
              + " | ".join(evals) + " |", "| --- | --- | --- | " + " | ".join("---" for _ in evals) + " |"]
    for task in tasks:
        t = teacher["tasks"][task]
        row = [_pct(t.get("accuracy_greedy")), _pct(t.get("accuracy_all_samples"))]
        row += [_pct(e["tasks"].get(task, {}).get("accuracy")) for e in evals.values()]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    lines += ["", "Teacher accuracy is measured on the training questions it labels; students and baselines on "
              "the test split with greedy decoding and the paper's answer cleansing. `zero_shot` and other baselines "
              "run the untrained student.", ""]

    def draw_accuracy(plt):
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * (len(evals) + 1) * max(1, len(tasks))), 3.6))
        names = ["teacher"] + list(evals)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            values = [(teacher["tasks"][t].get("accuracy_greedy") or teacher["tasks"][t].get("accuracy_all_samples") or 0)
                      if name == "teacher" else (evals[name]["tasks"].get(t, {}).get("accuracy") or 0) for t in tasks]
            bars = ax.bar([i + j * width for i in range(len(tasks))], [100 * v for v in values], width, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(tasks))], tasks)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8, ncol=len(names))
        ax.set_title("Teacher, students and baselines")
        return fig

    if tasks:
        lines += [f"![accuracy]({_plot(run_dir / 'accuracy.png', draw_accuracy)})", ""]

    if trains:
        lines += ["## Training", "", "| student | steps | final loss | tokens/s | best dev accuracy (epoch) |",
                  "| --- | --- | --- | --- | --- |"]
        for method, r in trains.items():
            best = f"{_pct(r.get('best_dev_accuracy'))} ({r.get('best_epoch')})" if r.get("dev") else "—"
            lines.append(f"| {method} | {r['steps']} | {r['final_loss']:.3f} | {r['tokens_per_s']:.0f} | {best} |")

        def draw_curves(plt):
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
            for method, r in trains.items():
                axes[0].plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], label=method)
                if r.get("dev"):
                    axes[1].plot([d["epoch"] for d in r["dev"]], [100 * d["accuracy"] for d in r["dev"]], "o-", label=method)
            axes[0].set(xlabel="optimizer step", ylabel="train loss", title="Training loss")
            axes[1].set(xlabel="epoch", ylabel="dev accuracy (%)", title="Dev accuracy (model selection)")
            for ax in axes:
                ax.legend(fontsize=8)
            return fig

        lines += ["", f"![curves]({_plot(run_dir / 'curves.png', draw_curves)})", ""]

    if curates:
        lines += ["## Curation", "", "| method | task | samples | kept | incorrect | too long | duplicates | questions without a sample |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method, c in curates.items():
            for task, s in c["tasks"].items():
                lines.append(f"| {method} | {task} | {s.get('samples', 0)} | {s.get('kept', 0)} | {s.get('dropped_incorrect', 0)} | "
                             f"{s.get('dropped_too_long', 0)} | {s.get('dropped_duplicate', 0)} | "
                             f"{s.get('questions_without_sample', 0)} of {s.get('questions', 0)} |")
        if "fine_tune_cot" in curates:
            c = curates["fine_tune_cot"]["tasks"]

            def draw_kept(plt):
                fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(c)), 3))
                names = list(c)
                values = [100 * s.get("kept", 0) / max(1, s.get("samples", 0) - s.get("dev_samples", 0)) for s in c.values()]
                ax.bar_label(ax.bar(names, values), fmt="%.0f")
                ax.set(ylabel="kept (%)", ylim=(0, 105), title="Teacher samples kept by curation")
                return fig

            lines += ["", f"![kept]({_plot(run_dir / 'kept.png', draw_kept)})", ""]

    # Cost ledger.
    lines += ["## Time, tokens and cost", "", "| stage | wall s | CPU s | GPU s |", "| --- | --- | --- | --- |"]
    for name, m in stages.items():
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['cpu_s']:.0f} | {m['gpu_s']:.0f} |")
    teacher_tokens = sum(t.get("prompt_tokens", 0) + t.get("completion_tokens", 0) for t in (teacher.get("tasks") or {}).values())
    lines += ["", f"Teacher tokens (prompt + completion, both steps): {teacher_tokens:,}."]
    if "fine_tune_cot" in evals and "vanilla" in evals:
        cot_cost = sum(m["cpu_s"] + m["gpu_s"] for n, m in stages.items()
                       if n == "teacher" or n.endswith("-fine_tune_cot"))
        for task in tasks:
            gain = 100 * ((evals["fine_tune_cot"]["tasks"].get(task, {}).get("accuracy") or 0)
                          - (evals["vanilla"]["tasks"].get(task, {}).get("accuracy") or 0))
            per_point = f"{cot_cost / gain:.0f} CPU/GPU-seconds per point" if gain > 0 else "no gain over vanilla"
            lines.append(f"Fine-tune-CoT over vanilla on {task}: {gain:+.1f} points; {per_point} (teacher + curation + "
                         f"training + evaluation of the Fine-tune-CoT student: {cot_cost:.0f} s).")

    def draw_cost(plt):
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(stages)), 3))
        ax.bar_label(ax.bar(list(stages), [m["wall_s"] for m in stages.values()]), fmt="%.0f", fontsize=8)
        ax.set(ylabel="wall seconds", title="Time per stage")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        return fig

    if stages:
        lines += ["", f"![cost]({_plot(run_dir / 'cost.png', draw_cost)})", ""]
    path = atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return path


def build_sweep_report(sweep_dir: str | Path) -> Path:
    """report.md for a sweep: every trial in a table, accuracy against each swept axis, the best config."""
    sweep_dir = Path(sweep_dir)
    results = read_json(sweep_dir / "results.json")
    metric, axes, trials = results["metric"], results["axes"], results["trials"]
    lines = [f"# fcot sweep: {results['name']}", "",
             f"{len(trials)} trials; metric: {metric} (test accuracy of the Fine-tune-CoT student); "
             f"teacher runs: {results['teacher_runs']} (shared by every trial).", ""]
    cols = axes + [metric] + sorted({k for t in trials for k in t if k.endswith("_kept")}) + ["status"]
    lines += ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for t in sorted(trials, key=lambda t: [str(t.get(a)) for a in axes]):
        lines.append("| " + " | ".join(_pct(t.get(c)) if c == metric else str(t.get(c, "—")) for c in cols) + " |")
    if results.get("best"):
        best = results["best"]
        lines += ["", f"**Best**: " + ", ".join(f"`{a}={best[a]}`" for a in axes) + f" → {_pct(best[metric])}", ""]

    log_axes = ("num_samples", "fraction", "subset", "lr")
    for axis in axes:
        others = [a for a in axes if a != axis]

        def draw(plt, axis=axis, others=others):
            fig, ax = plt.subplots(figsize=(5, 3.4))
            groups: dict[tuple, list] = {}
            for t in trials:
                if t.get(metric) is not None:
                    groups.setdefault(tuple(t.get(o) for o in others), []).append((t[axis], t[metric]))
            for key, points in groups.items():
                points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
                xs = [p[0] for p in points]
                label = ", ".join(f"{o}={v}" for o, v in zip(others, key)) or None
                ax.plot([str(x) for x in xs] if any(isinstance(x, str) for x in xs) else xs,
                        [100 * p[1] for p in points], "o-", label=label)
            if axis.endswith(log_axes) and all(isinstance(t.get(axis), (int, float)) for t in trials):
                ax.set_xscale("log", base=2 if axis.endswith("num_samples") else 10)
            ax.set(xlabel=axis, ylabel=f"{metric} (%)", title=f"{metric} vs {axis}")
            if len(groups) > 1:
                ax.legend(fontsize=7)
            return fig

        name = f"sweep_{axis.replace('.', '_')}.png"
        lines += [f"![{axis}]({_plot(sweep_dir / name, draw)})", ""]
    return atomic_write_text(sweep_dir / "report.md", "\n".join(lines) + "\n")
