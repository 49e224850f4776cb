"""report.md of a run and of a sweep, built from small synthetic folders (no Ray, no model): the verdict of every
method against its reference (fcot.methods: Method.reference), so a method added to METHODS is reported without
editing the report; and the house rule that no function of the report or the sweep is longer than 80 lines."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest

from fcot.methods import METHODS, Method

TASKS = ("coin_flip", "multiarith")
RATES = {"fine_tune_cot": 0.85, "vanilla": 0.35, "step_by_step": 0.6, "zero_shot": 0.2}


def _write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _outcomes(method: str, task: str, n: int, seed: int = 0) -> list[bool]:
    rng = random.Random(f"{method}/{task}/{seed}")
    return [rng.random() < RATES.get(method, 0.7) for _ in range(n)]


def _marker(result: dict, wall: float, precision: bool = False) -> dict:
    if precision:
        result = {**result, "precision": {"dtype": "float32", "why": "CPU"}}
    return {"result": result, "wall_s": wall, "cpu_s": 2 * wall, "gpu_s": 0.0, "reserved": {"CPU": 1, "GPU": 0}}


def _eval_result(method: str, n: int, sampled: bool = False) -> dict:
    tasks = {}
    for task in TASKS:
        correct = _outcomes(method, task, n)
        acc = sum(correct) / n
        m = {"accuracy": acc, "accuracy_ci": [max(0, acc - 0.1), min(1, acc + 0.1)], "n": n, "correct_format": 0.9,
             "top_prediction": "yes", "top_prediction_share": 0.95 if method == "vanilla" else 0.5,
             "collapsed": method == "vanilla" and task == "coin_flip", "majority": 0.55, "majority_answer": "yes",
             "random": 0.5 if task == "coin_flip" else None}
        if sampled:
            m.update({"k": 4, "pass@1": acc - 0.05, "pass@1_ci": [acc - 0.15, acc + 0.05], "maj@k": acc,
                      "maj@k_ci": [acc - 0.1, acc + 0.1], "pass@k": acc + 0.05, "pass@k_ci": [acc - 0.05, acc + 0.1]})
        tasks[task] = m
    return {"tasks": tasks}


def _train_result(method: str, n_dev: int = 10, seed: int = 0) -> dict:
    dev = [{"epoch": e, "accuracy": 0.1 * e, "n": n_dev, "outcomes": [int(c) for c in _outcomes(method, "dev", n_dev,
                                                                                                 seed + e)]}
           for e in (1, 2, 3)]
    return {"parameters": 2885888, "steps": 12, "final_loss": 0.51, "tokens_per_s": 1234.5, "selected_epoch": 2,
            "epochs": 3, "stopped_early": method == "vanilla", "selected_dev_accuracy": 0.2,
            "selected_dev_accuracy_ci": [0.05, 0.5], "dev": dev, "loss_curve": [1.0, 0.8, 0.6, 0.51],
            "trainable_parameters": 1000}


def _curate_result(method: str) -> dict:
    tasks = {}
    for task in TASKS:
        s = {"samples": 40, "kept": 30, "dropped_incorrect": 6, "dropped_no_answer": 1, "dropped_too_long": 2,
             "dropped_duplicate": 1, "questions_without_sample": 3, "questions": 20,
             "kept_per_question": {"0": 3, "1": 5, "2": 12}, "dev_questions": 4}
        if method == "vanilla" and task == "coin_flip":
            s["labels"] = {"labeled": 18, "questions": 20, "min_votes": 2, "labeled_with_gold": 10,
                           "label_equals_gold": 8, "label_equals_gold_rate": 0.8, "label_equals_gold_ci": [0.5, 0.95]}
        tasks[task] = s
    return {"tasks": tasks, "kept": 60}


def _teacher_result(model: str, store: bool) -> dict:
    tasks = {t: {"samples_per_question": {"4": 20}, "accuracy_all_samples": 0.6, "samples": 80,
                 "questions_with_a_correct_sample": 15, "questions": 20, "prompt_tokens": 1000,
                 "completion_tokens": 2345} for t in TASKS}
    out = {"tasks": tasks, "teacher": {"engine": "recorded", "model": model, "logprobs": 5 if store else None}}
    if store:
        out["store"] = {"records": 160, "bytes": 320000, "logprobs_bytes": 120000}
    return out


def make_run(root: Path, methods=("fine_tune_cot", "vanilla"), baselines=("zero_shot",), config: dict | None = None,
             n: int = 30) -> Path:
    """A run folder as fcot.run leaves it: stage markers, the chain's order, the students' predictions."""
    order = ["teacher", "teacher-big"]
    _write(root / "stages" / "teacher.json", _marker(_teacher_result("gpt-3", True), 3.0))
    _write(root / "stages" / "teacher-big.json", _marker(_teacher_result("gpt-4", False), 4.0))
    for i, method in enumerate(methods):
        order += [f"curate-{method}", f"train-{method}", f"eval-{method}"]
        _write(root / "stages" / f"curate-{method}.json", _marker(_curate_result(method), 1.0))
        _write(root / "stages" / f"train-{method}.json", _marker(_train_result(method), 10.0 + i, precision=True))
        _write(root / "stages" / f"eval-{method}.json", _marker(_eval_result(method, n, sampled=i == 0), 5.0))
        rows = [{"task": t, "index": j, "correct": c} for t in TASKS for j, c in enumerate(_outcomes(method, t, n))]
        _write_lines(root / "eval" / method / "predictions.jsonl", rows)
    for b in baselines:
        order.append(f"eval-{b}")
        _write(root / "stages" / f"eval-{b}.json", _marker(_eval_result(b, n), 2.0))
    _write(root / "summary.json", {"order": order})
    if config is not None:
        _write(root / "config.json", config)
    return root


def make_sweep(root: Path, methods=("fine_tune_cot", "vanilla"), values=(35, 105), seeds=(0, 1), n: int = 30,
               extra: dict | None = None, samples: tuple = ()) -> Path:
    """A sweep folder as fcot.sweep leaves it: results.json and each trial's run folder; with `samples`, a second
    axis (curate.num_samples) crossed with the first."""
    rows = []
    for v, d in [(v, d) for v in values for d in samples or [None]]:
        for seed in seeds:
            run_dir = root / "trials" / f"q={v},d={d},seed={seed}"
            row = {"curate.train_questions": v, "train.seed": seed, "status": "done", "run_dir": str(run_dir),
                   "dev_accuracy": 0.2 + 0.001 * v, "parameters": 2885888, **({"curate.num_samples": d} if d else {})}
            for m in methods:
                _write(run_dir / "stages" / f"train-{m}.json", _marker(_train_result(m, seed=seed), 1.0))
                preds = [{"task": t, "index": j, "correct": c} for t in TASKS
                         for j, c in enumerate(_outcomes(m, t, n, seed + v + 1000 * (d or 0)))]
                _write_lines(run_dir / "eval" / m / "predictions.jsonl", preds)
                row.update({f"{m}/kept": v - 2, f"{m}/test_accuracy": RATES.get(m, 0.7)})
                for t in TASKS:
                    row.update({f"{m}/{t}/collapsed": m == "vanilla", f"{m}/{t}/majority": 0.55,
                                f"{m}/{t}/random": 0.5 if t == "coin_flip" else None})
            rows.append(row)
    rows.append({"curate.train_questions": values[-1], "train.seed": 9, "status": "stopped at epoch 1 of 3"})
    rows.append({"curate.train_questions": values[0], "train.seed": 8, "status": "error", "error": "lost a node"})
    best = {"curate.train_questions": values[-1], **({"curate.num_samples": samples[-1]} if samples else {}),
            "dev_accuracy": 0.3, "seeds": len(seeds),
            **{f"{m}/test_accuracy": RATES.get(m, 0.7) for m in methods}}
    _write(root / "results.json", {"name": "synthetic", "sweep_dir": str(root), "metric": "dev_accuracy",
                                   "axes": ["curate.train_questions", *["curate.num_samples"] * bool(samples)],
                                   "seeds": list(seeds), "methods": list(methods),
                                   "tasks": list(TASKS), "trials": rows, "best": best, "teacher_runs": 1,
                                   "teacher_tokens": 1234, **(extra or {})})
    return root


def _verdicts(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("**")]


def test_the_default_run_gives_fine_tune_cot_against_vanilla_first_and_only(tmp_path):
    from fcot.report import build_report

    run = make_run(tmp_path / "run", config={"primary_method": "fine_tune_cot", "reference_method": "vanilla"})
    report = build_report(run).read_text()
    lines = report.splitlines()
    assert lines[:2] == ["# fcot run: run", ""]
    assert lines[2].startswith("**coin_flip: Fine-tune-CoT beats vanilla fine-tuning by +")
    assert lines[2].endswith("**: the interval excludes 0. (paired bootstrap over the test questions, 95%)")
    assert [v.split(":")[0] for v in _verdicts(report)] == ["**coin_flip", "**multiarith"]
    assert "| coin_flip | vanilla | " in report and "**collapsed**" in report and "![kept](kept.png)" in report
    for png in ("accuracy.png", "curves.png", "kept.png", "cost.png"):
        assert (run / png).stat().st_size > 1000


def test_a_method_added_to_methods_is_reported_against_its_reference(tmp_path, monkeypatch):
    """No edit of the report: the new Method's reference gives its verdicts, under its label, in a run's report
    and a sweep's (its short label in the sweep's column)."""
    from fcot.report import build_report, build_sweep_report, difference_key

    monkeypatch.setitem(METHODS, "distill_x", Method("distill_x", "Distilled X", True, METHODS["fine_tune_cot"].tasks,
                                                     reference="vanilla", short="X"))
    methods = ("fine_tune_cot", "distill_x", "vanilla")
    run = make_run(tmp_path / "run", methods, config={"primary_method": "fine_tune_cot",
                                                      "reference_method": "vanilla"})
    verdicts = _verdicts(build_report(run).read_text())
    assert len(verdicts) == 4 and "Fine-tune-CoT" in verdicts[0] and "vanilla fine-tuning" in verdicts[0]
    for task, verdict in zip(TASKS, verdicts[2:]):
        assert verdict.startswith(f"**{task}: ") and "Distilled X" in verdict and "vanilla fine-tuning" in verdict
    assert "**coin_flip: Distilled X beats vanilla fine-tuning by +" in verdicts[2]  # 70% against 35%

    sweep = make_sweep(tmp_path / "sweep", methods)
    report = build_sweep_report(sweep).read_text()
    assert "| X − vanilla |" in report and "| Fine-tune-CoT − vanilla |" in report
    assert "**coin_flip: Distilled X beats vanilla fine-tuning beyond the noise at " in report
    assert "(X − vanilla, mean over seeds, 95% interval resampling seeds and questions)" in report
    points = json.loads((sweep / "points.json").read_text())
    assert all(difference_key("distill_x", "vanilla", t) in p for p in points for t in TASKS)


def test_the_configured_pair_comes_first_and_no_pair_twice():
    from fcot.report import compared

    three = ["fine_tune_cot", "step_by_step", "vanilla"]
    assert compared(three, "fine_tune_cot", "vanilla") == [("fine_tune_cot", "vanilla"), ("step_by_step", "vanilla")]
    assert compared(three, "step_by_step", "fine_tune_cot") == [
        ("step_by_step", "fine_tune_cot"), ("fine_tune_cot", "vanilla"), ("step_by_step", "vanilla")]
    assert compared(["vanilla", "fine_tune_cot"], "vanilla", "fine_tune_cot") == [("vanilla", "fine_tune_cot")]
    assert compared(["vanilla", "zero_shot"], "vanilla", "vanilla") == [] and compared(["step_by_step"]) == []


def test_a_run_with_the_reference_first_reads_its_config_pair_once(tmp_path):
    from fcot.report import build_report

    run = make_run(tmp_path / "run", ("vanilla", "fine_tune_cot"), baselines=(),
                   config={"primary_method": "vanilla", "reference_method": "fine_tune_cot"})
    verdicts = _verdicts(build_report(run).read_text())
    assert [v.split(":")[0] for v in verdicts] == ["**coin_flip", "**multiarith"]
    assert all("vanilla fine-tuning is worse than Fine-tune-CoT by -" in v for v in verdicts)


def test_the_default_sweep_keeps_its_wording(tmp_path):
    from fcot.report import build_sweep_report

    report = build_sweep_report(make_sweep(tmp_path / "sweep")).read_text()
    assert report.splitlines()[2].startswith(
        "**coin_flip: Fine-tune-CoT beats vanilla fine-tuning beyond the noise at 2 of 2 grid points (")
    assert ("| curate.train_questions | dev accuracy | fine_tune_cot test | vanilla test | Fine-tune-CoT − vanilla | "
            "kept | seeds | stopped |") in report
    assert "Stopped early by the scheduler: curate.train_questions=105, train.seed=9" in report
    assert "Failed trials: lost a node" in report and "**Best by dev accuracy**: `curate.train_questions=105`" in report


def test_every_reference_names_another_method():
    for name, m in METHODS.items():
        assert m.reference is None or (m.reference in METHODS and m.reference != name), name
    assert METHODS["fine_tune_cot"].reference == METHODS["step_by_step"].reference == "vanilla"
    assert METHODS["vanilla"].reference is None


def test_stage_names_parse_into_kind_and_subject():
    from fcot.report import stage_name

    assert stage_name("eval-fine_tune_cot") == ("eval", "fine_tune_cot")
    assert stage_name("teacher") == ("teacher", "") and stage_name("teacher-big-one") == ("teacher", "big-one")


def test_not_a_run_directory_names_the_folder(tmp_path):
    from fcot.errors import FcotError
    from fcot.report import build_report

    with pytest.raises(FcotError, match="not a run directory"):
        build_report(tmp_path)


@pytest.mark.parametrize("module", ["report", "sweep"])
def test_no_function_is_longer_than_80_lines(module):
    path = Path(__file__).parents[1] / "fcot" / f"{module}.py"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"


def test_a_sweep_with_three_or_more_sizes_reports_fitted_laws_and_their_check(tmp_path):
    """Along a numeric axis with at least three values, every (task, method) curve gets a law in report.md (form,
    parameters with intervals, the extrapolation check) and laws.json, its band drawn; two values give none."""
    from fcot.report import build_sweep_report

    sweep = make_sweep(tmp_path / "four", values=(35, 105, 315, 945), n=60)
    report = build_sweep_report(sweep).read_text()
    assert "### Fitted laws: test accuracy against curate.train_questions" in report
    rows = [line for line in report.splitlines() if line.startswith(("| coin_flip | ", "| multiarith | "))
            and ("log_linear" in line or "power" in line)]
    assert len(rows) == 4, rows  # 2 tasks x 2 methods
    fitted = json.loads((sweep / "laws.json").read_text())["curate.train_questions"]
    assert {(f["task"], f["method"]) for f in fitted} == {(t, m) for t in TASKS for m in ("fine_tune_cot", "vanilla")}
    for law in fitted:
        assert law["points"] == 4 and law["check"]["x"] == 945 and law["check"]["extrapolated"]
        assert all(lo <= law["check"]["measured"] <= hi for lo, hi in [law["check"]["measured_ci"]])
    two = build_sweep_report(make_sweep(tmp_path / "two")).read_text()
    assert "Fitted laws" not in two


def test_two_numeric_axes_get_a_joint_law_with_its_check(tmp_path):
    from fcot.report import build_sweep_report

    sweep = make_sweep(tmp_path / "grid", values=(35, 105, 315), samples=(1, 4), n=60)
    report = build_sweep_report(sweep).read_text()
    assert "### Fitted joint laws: test accuracy against curate.train_questions and curate.num_samples" in report
    assert "acc = a + b ln(curate.train_questions) + c ln(curate.num_samples)" in report
    joint = json.loads((sweep / "laws.json").read_text())["curate.train_questions x curate.num_samples"]
    assert {(f["task"], f["method"]) for f in joint} == {(t, m) for t in TASKS for m in ("fine_tune_cot", "vanilla")}
    assert all(f["points"] == 6 and f["check"]["x"] == [315, 4] for f in joint)
    # Drawn, dotted, on each axis' plot: along the questions at D = 1 and 4, along D at each question count.
    assert all(set(f["curves"]["x"]) == {"1", "4"} and set(f["curves"]["y"]) == {"35", "105", "315"} for f in joint)
    band = joint[0]["curves"]["x"]["4"]
    assert all(lo <= y <= hi for y, lo, hi in zip(band["y"], band["lo"], band["hi"]))
    assert (sweep / "sweep_curate_num_samples.png").stat().st_size > 1000
    one = build_sweep_report(make_sweep(tmp_path / "one", values=(35, 105, 315))).read_text()
    assert "Fitted joint laws" not in one
