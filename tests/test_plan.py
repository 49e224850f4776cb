"""`fcot plan` on a synthetic sweep drawn from a known law of dev accuracy and a known cost per trial: it picks the
known optimum within the budget, writes a sweep config that `fcot sweep` accepts, and refuses what it cannot price."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from fcot.errors import FcotError
from fcot.plan import parse_budget, plan
from tests.conftest import ROOT, run_fcot

DEV = 400  # dev questions
POOL, DEV_SPLIT = 400, 40  # the teacher's questions, less the dev split: a data-size axis grows to 360


def _law(x: float) -> float:
    return 0.2 + 0.08 * math.log(x)


def _write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def make_study(root: Path, values=(8, 16, 32, 64), seeds=(0, 1), cost_per_question: float = 5.0) -> Path:
    """A sweep along curate.train_questions: each trial's dev outcomes drawn from _law, its CPU-seconds
    cost_per_question x its questions; the teacher's store covers the pool."""
    rng = np.random.default_rng(0)
    rows = []
    for v in values:
        for seed in seeds:
            run_dir = root / "trials" / f"q={v},seed={seed}"
            outcomes = (rng.random(DEV) < _law(v)).astype(int).tolist()
            _write(run_dir / "stages" / "train-fine_tune_cot.json",
                   {"result": {"selected_epoch": 1, "dev": [{"epoch": 1, "outcomes": outcomes}]}})
            _write(run_dir / "stages" / "curate-fine_tune_cot.json", {"result": {"dev_questions": DEV_SPLIT}})
            rows.append({"curate.train_questions": v, "train.seed": seed, "status": "done", "run_dir": str(run_dir),
                         "dev_accuracy": sum(outcomes) / DEV, "cpu_s": cost_per_question * v, "gpu_s": 0.0})
    best = {"curate.train_questions": values[-1], "dev_accuracy": _law(values[-1]), "seeds": len(seeds)}
    _write(root / "results.json", {"name": "study", "metric": "dev_accuracy", "axes": ["curate.train_questions"],
                                   "seeds": list(seeds), "methods": ["fine_tune_cot"], "tasks": ["coin_flip"],
                                   "primary_method": "fine_tune_cot", "trials": rows, "best": best})
    _write(root / "teachers.json", [{"generated": 0, "cpu_s": 0.0, "records": POOL * 4,
                                     "tasks": {"coin_flip": {"questions": POOL}}}])
    _write(root / "sweep.json", {"name": "study", "base": str(ROOT / "experiments" / "quickstart.yaml"),
                                 "run": {"wandb_mode": "disabled"}, "seeds": list(seeds), "scheduler": "none",
                                 "metric": "dev_accuracy"})
    return root


def test_the_plan_picks_the_best_values_the_budget_affords(tmp_path):
    study = make_study(tmp_path / "study")
    # Candidates beyond 64: 128, 256 and the pool's 360 (512 is more than the split has). A trial costs 5 CPU-s per
    # question, twice (two seeds): 1,280 / 2,560 / 3,600 CPU-s. The law grows with x, so the best is the largest
    # the budget affords, then what is left.
    out = plan([study], "1 cpu-hours", tmp_path / "a.yaml")
    assert [round(c["x"]) for c in out["candidates"]] == [128, 256, 360]
    assert out["chosen"] == [360] and out["predicted_cost_s"] == pytest.approx(3600, rel=1e-6)
    out = plan([study], "0.8 cpu-hours", tmp_path / "b.yaml")  # 2,880 CPU-s: 256, and 128 no longer fits beside it
    assert out["chosen"] == [256]
    out = plan([study], "1.2 cpu-hours", tmp_path / "c.yaml")  # 4,320: 360 then nothing else; 256 + 128 = 3,840
    assert out["chosen"] == [360]
    assert out["cost_law"]["k"] == pytest.approx(1.0, abs=1e-6)  # cost proportional to the questions, as drawn
    # The law's prediction: close to the truth where it extrapolates, its interval around it.
    at = {round(c["x"]): c for c in out["candidates"]}
    for x, c in at.items():
        assert c["extrapolated"] and c["predicted_ci"][0] - 0.03 <= _law(x) <= c["predicted_ci"][1] + 0.03, (x, c)
    written = (tmp_path / "c.yaml").read_text()
    assert "curate.train_questions=360: dev " in written and ": chosen" in written
    assert yaml.safe_load(written)["param_space"] == {"curate.train_questions": [360]}


def test_fcot_plan_writes_a_sweep_config_that_fcot_sweep_accepts(tmp_path, shared_data):
    study = make_study(tmp_path / "study")
    proc = run_fcot("plan", study, "--budget", "0.8 cpu-hours", "--output", tmp_path / "plan.yaml", check=True)
    assert json.loads(proc.stdout.splitlines()[-1])["chosen"] == [256]
    assert "curate.train_questions=256" in proc.stderr
    dry = run_fcot("sweep", tmp_path / "plan.yaml", "--dry-run", f"output_dir={tmp_path / 'next'}", check=True)
    assert "2 trials (2 seed(s) each)" in dry.stderr


def test_a_budget_the_ledger_cannot_price_is_refused_naming_it(tmp_path):
    assert parse_budget("500 gpu-hours") == (1_800_000.0, "gpu_s")
    for bad in ("$300", "500 gpu hours", "many cpu-hours"):
        with pytest.raises(FcotError, match=f"--budget '{re.escape(bad)}': expected a number"):
            parse_budget(bad)
    study = make_study(tmp_path / "study")
    with pytest.raises(FcotError, match="measured no GPU-seconds; give the budget in cpu-hours"):
        plan([study], "10 gpu-hours", tmp_path / "p.yaml")
    with pytest.raises(FcotError, match="--axis train.lr: the plan grows one numeric swept axis"):
        plan([study], "1 cpu-hours", tmp_path / "p.yaml", axis="train.lr")
