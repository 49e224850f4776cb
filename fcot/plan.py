"""`fcot plan`: the next sweep within a budget, from the laws and the ledgers of sweeps already run.

Rule: what a configuration is predicted to reach is the primary method's *dev* accuracy (the test split never
chooses), its law along one numeric axis (fcot.laws, fitted to the done trials' dev outcomes, seeds x dev
questions, with its bootstrap interval) at the best measured values of the other axes (by dev accuracy). What it
is predicted to cost is the budget's unit (CPU- or GPU-seconds) of one trial, a power law in the axis fitted to the
measured trials (ln cost = c + k ln x, least squares), plus, where the axis asks the teacher for more samples (D),
the teacher's measured cost per generated sample times the samples beyond its store. A budget in money ('$300')
prices both at the trials' prices (fcot.prices).
Candidates are the values beyond the largest measured one (x2, x4, x8; integers rounded; no more training
questions than the split has); the plan takes them best predicted accuracy first while every seed of each fits the
budget, and writes the sweep config that runs them (`fcot sweep PLAN`), its predictions in its first lines.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import yaml

from fcot import laws
from fcot.errors import FcotError
from fcot.io import atomic_write_text, read_json
from fcot.layout import RunLayout
from fcot.prices import Prices, stage_cost
from fcot.report import trial_dev_outcomes

UNITS = {"gpu-hours": "gpu_s", "cpu-hours": "cpu_s"}
BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(" + "|".join(UNITS) + r")\s*$")
MONEY = re.compile(r"^\s*\$\s*([0-9]*\.?[0-9]+)\s*$")
GROWTH = (2, 4, 8)  # candidates: the largest measured value times these
# The axis whose growth asks the teacher for more samples: a data-size axis grows within the questions the teacher
# already ran on (the candidates stop at the pool), so only D does.
SAMPLES_AXIS = "curate.num_samples"


def parse_budget(text: str) -> tuple[float, str]:
    """'500 gpu-hours' -> (1_800_000.0, 'gpu_s'): the budget in seconds of the ledger's key; '$300' -> (300.0,
    'cost'): money, at the trials' prices (fcot.prices)."""
    if m := MONEY.match(text):
        return float(m.group(1)), "cost"
    m = BUDGET.match(text)
    if not m:
        raise FcotError(f"--budget {text!r}: expected a number and one of {', '.join(UNITS)}, e.g. '500 gpu-hours', "
                        "or money, e.g. '$300'")
    return float(m.group(1)) * 3600, UNITS[m.group(2)]


def _axis(results: dict, axis: str | None) -> str:
    """The numeric axis the plan grows: `axis`, or the sweep's only numeric axis with enough values for a law."""
    numeric = [a for a in results["axes"] if len({t.get(a) for t in results["trials"] if _number(t.get(a))})
               >= laws.MIN_POINTS]
    if axis is None and len(numeric) == 1:
        return numeric[0]
    if axis is None or axis not in numeric:
        raise FcotError(f"--axis{' ' + axis if axis else ''}: the plan grows one numeric swept axis with at least "
                        f"{laws.MIN_POINTS} values; this sweep has {', '.join(numeric) or 'none'}")
    return axis


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _best_others(results: dict, axis: str) -> dict:
    """The other axes' values of the best measured point (dev accuracy), where the law is fitted."""
    best = results.get("best") or {}
    return {a: best[a] for a in results["axes"] if a != axis and a in best}


def _curve(results: dict, axis: str, others: dict) -> list[tuple[float, list]]:
    """(x, seeds x dev questions) of the primary method's done trials along `axis`, the other axes at `others`."""
    by_x: dict[float, list] = {}
    for t in results["trials"]:
        if t["status"] != "done" or not _number(t.get(axis)) or any(t.get(a) != v for a, v in others.items()):
            continue
        outcomes = trial_dev_outcomes(t, results["primary_method"])
        if outcomes:
            by_x.setdefault(t[axis], []).append([float(o) for o in outcomes])
    return [(x, vs) for x, vs in sorted(by_x.items()) if len({len(v) for v in vs}) == 1]


def _cost_law(results: dict, axis: str, key: str) -> tuple[float, float]:
    """(c, k) of ln cost = c + k ln x over the measured trials (k = 1, proportional, where x never varied)."""
    measured = [(t[axis], t[key]) for t in results["trials"] if _number(t.get(axis)) and t.get(key)]
    if not measured and key == "cost":
        raise FcotError("--budget: the sweep's trials have no cost: set prices in its run config (key 'prices', "
                        "fcot.prices) and run `fcot sweep` again (it redoes nothing), or give the budget in hours")
    if not measured:
        unit = "GPU" if key == "gpu_s" else "CPU"
        raise FcotError(f"--budget: the sweep's trials measured no {unit}-seconds; give the budget in "
                        f"{'cpu-hours' if key == 'gpu_s' else 'gpu-hours'}")
    xs, costs = zip(*measured)
    lx, lc = np.log(np.asarray(xs, float)), np.log(np.asarray(costs, float))
    if len(set(xs)) < 2:
        return float(np.mean(lc - lx)), 1.0
    k, c = np.polyfit(lx, lc, 1)
    return float(c), float(k)


def _teacher(sweep_dir: Path, key: str, prices: Prices) -> tuple[float, int]:
    """The teacher's measured cost per generated sample (the budget's unit), and the samples its store holds."""
    runs = _teachers(sweep_dir)
    generated = sum(r.get("generated", 0) for r in runs)
    # in money: what its replicas' GPUs held and an API's tokens (its reserved CPUs are not in its summary)
    spent = sum(stage_cost({"gpu_s": r.get("gpu_s"), "result": r}, prices) if key == "cost" else r.get(key, 0.0)
                for r in runs)
    return (spent / generated if generated else 0.0), sum(r.get("records", 0) for r in runs)


def _prices(results: dict) -> Prices:
    """The prices the trials ran at (a done trial's run config)."""
    done = next((t for t in results["trials"] if t["status"] == "done" and t.get("run_dir")), None)
    path = RunLayout(Path(done["run_dir"])).config if done else None
    return Prices(**(read_json(path).get("prices") or {})) if path and path.exists() else Prices()


def _teachers(sweep_dir: Path) -> list[dict]:
    """The summaries of the sweep's teacher runs (none for a sweep of vanilla fine-tuning)."""
    path = sweep_dir / "teachers.json"
    return read_json(path) if path.exists() else []


def _candidates(measured: list[float], limit: float | None) -> list[float]:
    """The values beyond the largest measured one (module doc), within `limit`."""
    top = max(measured)
    integer = all(float(x).is_integer() for x in measured)
    xs = [round(top * g) if integer else top * g for g in GROWTH] + ([limit] if limit and limit > top else [])
    return [x for x in dict.fromkeys(xs) if x not in measured and (limit is None or x <= limit)]  # ascending


def _read(sweep_dirs: list[Path]) -> tuple[dict, dict]:
    """The sweeps' results as one (their trials together: a study and the sweeps that extended it), and the first
    one's config. They must sweep the same axes with the same primary method."""
    from fcot.sweep import best_point  # the sweep's own rule of the best point (heavy: it imports every stage)

    results = [read_json(d / "results.json") for d in sweep_dirs]
    first = results[0]
    for d, r in zip(sweep_dirs[1:], results[1:]):
        if sorted(r["axes"]) != sorted(first["axes"]) or r["primary_method"] != first["primary_method"]:
            raise FcotError(f"{d}: sweeps {', '.join(r['axes'])} with {r['primary_method']}; {sweep_dirs[0]} sweeps "
                            f"{', '.join(first['axes'])} with {first['primary_method']}: plan them apart")
    trials = [t for r in results for t in r["trials"]]
    merged = {**first, "trials": trials, "best": best_point(trials, first["axes"], first["metric"])}
    return merged, read_json(sweep_dirs[0] / "sweep.json")


def plan(sweep_dirs: list[str | Path], budget: str, output: str | Path, axis: str | None = None) -> dict:
    """Plan the next sweep of `sweep_dirs` within `budget`; writes the sweep config to `output`, returns the plan."""
    dirs = [Path(d) for d in sweep_dirs]
    seconds, key = parse_budget(budget)
    results, spec = _read(dirs)
    sweep_dir = dirs[0]
    axis = _axis(results, axis)
    others = _best_others(results, axis)
    points = _curve(results, axis, others)
    law = laws.fit(points)
    if law is None:
        raise FcotError(f"{sweep_dir}: fewer than {laws.MIN_POINTS} values of {axis} with dev outcomes at "
                        f"{others or 'the sweep'}: no law to plan from")
    c, k = _cost_law(results, axis, key)
    per_sample, stored = _teacher(sweep_dir, key, _prices(results))
    seeds = len(results.get("seeds") or [0])
    measured = [x for x, _ in points]
    limit = _question_limit(sweep_dir, results, measured) if axis == "curate.train_questions" else None
    rows = []
    candidates = _candidates(measured, limit)
    for x, f in zip(candidates, laws.forecast(points, law, candidates)):
        trial = math.exp(c + k * math.log(x))
        extra = _extra_samples(axis, x, max(measured), stored)
        rows.append({**f, "x": x, "cost_per_trial": trial, "teacher_cost": per_sample * extra, "teacher_samples": extra,
                     "cost": seeds * trial + per_sample * extra})
    chosen, spent = [], 0.0
    for r in sorted(rows, key=lambda r: -r["predicted"]):
        if spent + r["cost"] <= seconds:
            chosen.append(r)
            spent += r["cost"]
    out = {"axis": axis, "others": others, "budget": budget, "unit": key, "law": {k_: law[k_] for k_ in
           ("form", "parameters", "x_range", "rmse")}, "cost_law": {"c": c, "k": k}, "seeds": seeds,
           "candidates": rows, "chosen": sorted(r["x"] for r in chosen), "predicted_cost_s": spent}
    _write(Path(output), spec, out)
    return out


def _question_limit(sweep_dir: Path, results: dict, measured: list[float]) -> float | None:
    """How far a data-size axis may grow: a fraction to 1; a count to the questions the teacher ran on less the
    dev split (a trial's curation marker); None where the sweep does not say."""
    if all(x < 1 for x in measured):
        return 1.0
    asked = sum(t.get("questions", 0) for r in _teachers(sweep_dir) for t in (r.get("tasks") or {}).values())
    done = next((t for t in results["trials"] if t["status"] == "done" and t.get("run_dir")), None)
    if not asked or done is None:
        return None
    marker = RunLayout(Path(done["run_dir"])).marker(f"curate-{results['primary_method']}")
    return asked - read_json(marker)["result"].get("dev_questions", 0) if marker.exists() else None


def _extra_samples(axis: str, x: float, largest: float, stored: int) -> float:
    """Teacher samples a candidate needs beyond the store (which holds `stored` at the largest measured value)."""
    if axis != SAMPLES_AXIS or not stored:
        return 0.0
    return max(0.0, stored * (x / largest - 1))


def _amount(value: float, key: str) -> str:
    """An amount of the budget's unit as the plan writes it."""
    return f"${value:,.2f}" if key == "cost" else f"{value / 3600:.3g} {'GPU' if key == 'gpu_s' else 'CPU'}-hours"


def _write(output: Path, spec: dict, out: dict) -> None:
    """The sweep config that runs the chosen values (the other axes at the law's), its predictions above it."""
    lo, hi = out["law"]["x_range"]
    measure = {"gpu_s": "GPU-s", "cpu_s": "CPU-s", "cost": "$"}[out["unit"]]
    lines = [f"# fcot plan: {out['axis']} within {out['budget']}, seeds {out['seeds']}; the law of dev accuracy "
             f"({out['law']['form']}, fitted on {out['axis']} from {lo:g} to {hi:g}) and the measured cost per trial "
             f"(ln {measure} = {out['cost_law']['c']:.2f} + {out['cost_law']['k']:.2f} ln x)."]
    for r in sorted(out["candidates"], key=lambda r: r["x"]):
        mark = "chosen" if r["x"] in out["chosen"] else "not chosen: more than the budget had left"
        lo, hi = r["predicted_ci"]
        lines.append(f"#   {out['axis']}={r['x']:g}: dev {100 * r['predicted']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
                     f"{'(extrapolated)' * r['extrapolated']}, {_amount(r['cost'], out['unit'])} "
                     f"({r['teacher_samples']:.0f} new teacher samples): {mark}")
    if not out["chosen"]:
        lines.append("# nothing fits the budget: the config below is not runnable until a value is added")
    doc = {k: spec[k] for k in ("base", "run", "seeds", "scheduler", "grace_period", "reduction_factor", "metric",
                                "wandb_mode") if spec.get(k) is not None}
    doc = {"name": f"{spec['name']}-plan", **doc,
           "param_space": {out["axis"]: out["chosen"], **{a: [v] for a, v in out["others"].items()}}}
    atomic_write_text(output, "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False))
