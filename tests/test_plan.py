"""`fcot plan` on a synthetic sweep drawn from a known law of dev accuracy and a known cost per trial: it picks the
known optimum within the budget (hours or money), writes a sweep config that `fcot sweep` accepts, and refuses what
it cannot price. Prices: a stage's money from what it held, and the report's cost column."""

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


def make_study(root: Path, values=(8, 16, 32, 64), seeds=(0, 1), cost_per_question: float = 5.0,
               money_per_question: float | None = None) -> Path:
    """A sweep along curate.train_questions: each trial's dev outcomes drawn from _law, its CPU-seconds
    cost_per_question x its questions (and its money money_per_question x its questions, at prices in its run
    config); the teacher's store covers the pool."""
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
            if money_per_question is not None:
                rows[-1]["cost"] = money_per_question * v
                _write(run_dir / "config.json", {"prices": {"cpu_hour": 0.5}})
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


def test_a_budget_in_money_plans_at_the_trials_prices(tmp_path):
    # $0.002 per question per trial, two seeds: 128 costs $0.512, 256 $1.024, 360 $1.44. With $1: 128 only.
    study = make_study(tmp_path / "study", money_per_question=0.002)
    out = plan([study], "$1", tmp_path / "p.yaml")
    assert out["unit"] == "cost" and out["chosen"] == [128] and out["predicted_cost_s"] == pytest.approx(0.512)
    assert "curate.train_questions=128: dev " in (tmp_path / "p.yaml").read_text() and "$0.51" in (
        tmp_path / "p.yaml").read_text()
    unpriced = make_study(tmp_path / "unpriced")
    with pytest.raises(FcotError, match="the sweep's trials have no cost: set prices in its run config"):
        plan([unpriced], "$1", tmp_path / "p.yaml")


def test_a_stage_pays_for_what_it_held_at_the_config_prices():
    from fcot.prices import Prices, stage_cost

    cpu = {"wall_s": 1800.0, "gpu_s": 0.0, "reserved": {"CPU": 4, "GPU": 0}, "result": {}}
    assert stage_cost(cpu, Prices(cpu_hour=0.1)) == pytest.approx(0.2)  # 4 CPUs for half an hour
    gpu = {"wall_s": 100.0, "gpu_s": 7200.0, "reserved": {"CPU": 0, "GPU": 2}, "accelerators": ["H100", "L40S"],
           "result": {}}
    assert stage_cost(gpu, Prices(gpu_hour=2.0)) == pytest.approx(4.0)
    assert stage_cost(gpu, Prices(gpu_hour={"h100": 3.0, "L40S": 1.0})) == pytest.approx(6.0)  # mixed: the highest
    with pytest.raises(FcotError, match="key 'prices.gpu_hour': no price for the GPUs this stage held"):
        stage_cost(gpu, Prices(gpu_hour={"A100": 1.5}))
    tasks = {"t": {"prompt_tokens": 2_000_000, "completion_tokens": 500_000}}
    api = {"wall_s": 60.0, "gpu_s": 0.0, "reserved": {}, "result": {"teacher": {"engine": "openai"}, "tasks": tasks}}
    prices = Prices(input_tokens_per_million=0.5, output_tokens_per_million=2.0)
    assert stage_cost(api, prices) == pytest.approx(2.0)
    own = {**api, "result": {"teacher": {"engine": "vllm"}, "tasks": tasks}}  # its GPUs are its cost, not tokens
    assert stage_cost(own, prices) == 0.0 and not Prices().set


def test_the_report_prices_every_stage_where_the_run_config_has_prices(tmp_path):
    from fcot.report import build_report
    from tests.test_report import make_run

    run = make_run(tmp_path / "run", config={"prices": {"cpu_hour": 3.6}})  # 1 CPU reserved: $0.001 a second
    report = build_report(run).read_text()
    assert "| stage | wall s | CPU s | GPU s | reserved | precision | cost |" in report
    assert "| train-fine_tune_cot | 10.0 | 20 | 0 | 1 CPU | float32 (CPU) | $0.0100 |" in report
    assert "The run cost $" in report
    plain = build_report(make_run(tmp_path / "plain")).read_text()
    assert "| reserved | precision |\n" in plain and "The run cost" not in plain


def test_a_budget_the_ledger_cannot_price_is_refused_naming_it(tmp_path):
    assert parse_budget("500 gpu-hours") == (1_800_000.0, "gpu_s") and parse_budget("$300") == (300.0, "cost")
    for bad in ("300 dollars", "500 gpu hours", "many cpu-hours"):
        with pytest.raises(FcotError, match=f"--budget '{re.escape(bad)}': expected a number"):
            parse_budget(bad)
    study = make_study(tmp_path / "study")
    with pytest.raises(FcotError, match="measured no GPU-seconds; give the budget in cpu-hours"):
        plan([study], "10 gpu-hours", tmp_path / "p.yaml")
    with pytest.raises(FcotError, match="--axis train.lr: the plan grows one numeric swept axis"):
        plan([study], "1 cpu-hours", tmp_path / "p.yaml", axis="train.lr")
