"""A two-trial sweep on CPU: one shared teacher run, a results table, report plots, and a restore."""

import json

import pyarrow.parquet as pq

from fcot.config import load_config
from fcot.sweep import SweepConfig, sweep
from fcot.teacher.store import RecordStore


def test_two_trial_sweep_shares_one_teacher_run(tmp_path, tiny_llama, ray_local):
    run = {
        "tasks": ["multiarith"], "methods": ["fine_tune_cot"], "baselines": [],
        "teacher": {"subset": 4, "progress": False,
                    "engine": {"kind": "hf", "model": str(tiny_llama), "dtype": "float32", "samples_per_batch": 8},
                    "sampling": {"num_samples": 2, "max_new_tokens": 12, "answer_max_new_tokens": 6}},
        # The tiny random teacher is never right: keep every sample so that students have data to train on.
        "curate": {"max_length": 128},
        "train": {"model": str(tiny_llama), "epochs": 1, "batch_size": 2, "num_workers": 1, "max_steps": 2,
                  "wandb": {"mode": "disabled"}},
        "eval": {"subset": 4, "max_new_tokens": 8},
        "wandb_mode": "disabled",
    }
    cfg = load_config(SweepConfig, base={"name": "t", "output_dir": str(tmp_path / "sweep"), "run": run,
                                         "param_space": {"curate.num_samples": [1, 2]}, "wandb_mode": "disabled"})
    # Every sample counts as correct for this test: the store's records are rewritten with correct=True.
    from fcot.sweep import base_run, max_samples, prepare_teachers

    sweep_dir = tmp_path / "sweep"
    base = base_run(cfg, sweep_dir)
    prepare_teachers(cfg, base, sweep_dir, max_samples(cfg, base))
    store = RecordStore(sweep_dir / "teacher" / "records")
    for shard in store.shards():
        table = pq.read_table(shard)
        pq.write_table(table.set_column(table.schema.get_field_index("correct"), "correct",
                                        [[True] * table.num_rows]), shard)
    generated_before = len(store.keys())
    assert generated_before == 8  # 4 questions x the largest D

    results = sweep(cfg, log=lambda m: None)
    assert len(results["trials"]) == 2 and all(t["status"] == "done" for t in results["trials"])
    assert sorted(t["curate.num_samples"] for t in results["trials"]) == [1, 2]
    assert sorted(t["fine_tune_cot_kept"] for t in results["trials"]) == [4, 8]  # D chosen at curation
    assert all(0 <= t["accuracy"] <= 1 for t in results["trials"])
    teachers = json.loads((sweep_dir / "teachers.json").read_text())
    assert len(teachers) == 1 and teachers[0]["generated"] == 0  # already generated above: the teacher ran once
    assert len(store.keys()) == generated_before
    assert not list(sweep_dir.glob("tune/*/run/teacher"))  # no trial has a teacher of its own
    report = (sweep_dir / "report.md").read_text()
    assert "| curate.num_samples |" in report and (sweep_dir / "sweep_curate_num_samples.png").exists()

    # Restoring a finished sweep reruns no trial.
    stamps = sorted(p.stat().st_mtime for p in sweep_dir.glob("tune/*/result.json"))
    again = sweep(cfg, log=lambda m: None)
    assert len(again["trials"]) == 2
    assert sorted(p.stat().st_mtime for p in sweep_dir.glob("tune/*/result.json")) == stamps
