"""A two-trial sweep on CPU: one shared teacher run, a results table and report plots; killed after its first
trial and restored, it finishes the second without redoing the first."""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import yaml

from fcot.config import load_config
from fcot.sweep import SweepConfig, base_run, max_samples, prepare_teachers, trial_name
from fcot.teacher.store import RecordStore
from tests.conftest import ROOT, run_fcot
from tests.test_run import _kill_tree


def test_two_trial_sweep_shares_one_teacher_run_and_resumes(tmp_path, tiny_llama, ray_local):
    run = {
        "tasks": ["multiarith"], "methods": ["fine_tune_cot"], "baselines": [],
        "teacher": {"subset": 4, "progress": False,
                    "engine": {"kind": "hf", "model": str(tiny_llama), "dtype": "float32", "samples_per_batch": 8},
                    "sampling": {"num_samples": 2, "max_new_tokens": 12, "answer_max_new_tokens": 6}},
        "curate": {"max_length": 128},
        "train": {"model": str(tiny_llama), "epochs": 1, "batch_size": 2, "num_workers": 1, "max_steps": 2,
                  "wandb": {"mode": "disabled"}},
        "eval": {"subset": 4, "max_new_tokens": 8},
        "wandb_mode": "disabled",
    }
    sweep_dir = tmp_path / "sweep"
    spec = {"name": "t", "output_dir": str(sweep_dir), "run": run, "param_space": {"curate.num_samples": [1, 2]},
            "wandb_mode": "disabled", "max_concurrent_trials": 1}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))

    # The teacher, run here first: the tiny random teacher is never right, so its records are rewritten
    # with correct=True to give the students data. The sweep must then generate nothing.
    cfg = load_config(SweepConfig, base=spec)
    base = base_run(cfg, sweep_dir)
    prepare_teachers(cfg, base, sweep_dir, max_samples(cfg, base))
    store = RecordStore(sweep_dir / "teacher" / "records")
    for shard in store.shards():
        table = pq.read_table(shard)
        pq.write_table(table.set_column(table.schema.get_field_index("correct"), "correct",
                                        [[True] * table.num_rows]), shard)
    assert len(store.keys()) == 8  # 4 questions x the largest D

    # Kill the sweep (its whole process tree) once the first trial has finished.
    first = sweep_dir / "trials" / trial_name({"curate.num_samples": 1}) / "stages"
    proc = subprocess.Popen([sys.executable, "-m", "fcot.cli", "sweep", str(config)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while not (first / "eval-fine_tune_cot.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    assert (first / "eval-fine_tune_cot.json").exists(), "the first trial did not finish"
    _kill_tree(proc)
    first_markers = {p.name: p.read_text() for p in first.glob("*.json")}
    assert len(first_markers) == 3

    out = run_fcot("sweep", config, check=True)
    assert "resuming" in out.stderr
    results = json.loads((sweep_dir / "results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 2 and all(t["status"] == "done" for t in trials)
    assert sorted(t["curate.num_samples"] for t in trials) == [1, 2]
    assert sorted(t["fine_tune_cot_kept"] for t in trials) == [4, 8]  # D chosen at curation
    assert all(0 <= t["accuracy"] <= 1 for t in trials)
    # The finished trial was not redone: its stage markers (with their finish times) are untouched.
    assert {p.name: p.read_text() for p in first.glob("*.json")} == first_markers
    teachers = json.loads((sweep_dir / "teachers.json").read_text())
    assert len(teachers) == 1 and teachers[0]["generated"] == 0  # the teacher ran once, before the sweep
    assert len(store.keys()) == 8
    assert not list(sweep_dir.glob("trials/*/teacher"))  # no trial has a teacher of its own
    report = (sweep_dir / "report.md").read_text()
    assert "| curate.num_samples |" in report and (sweep_dir / "sweep_curate_num_samples.png").stat().st_size > 1000
