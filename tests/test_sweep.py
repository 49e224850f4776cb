"""Sweeps on CPU with the real 175B teacher's records: two data sizes in one store (each trial trains on exactly
its own questions), killed after its first trial and restored; ASHA stopping a trial whose learning rate is
absurd; a search drawn by TPE, killed and resumed; model selection that never reads the test split."""

import json
import os
import re
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from fcot.config import load_config
from fcot.sweep import SweepConfig, best_point, trial_name
from tests.conftest import ROOT, run_fcot
from tests.test_run import _kill_tree


def _recorded(shared_data, task, log, subset):
    return {"subset": subset, "progress": False,
            "engine": {"kind": "recorded", "model": "text-davinci-002", "format": "zero_shot_cot_log",
                       "path": str(shared_data / "teacher_logs" / f"{log}_zero_shot_cot.log")}}


def _run(shared_data, train: dict) -> dict:
    """A small run of the recorded teacher on 40 multiarith questions (10 dev, 30 to train on)."""
    return {"tasks": ["multiarith"], "methods": ["fine_tune_cot"], "baselines": [],
            "teacher": _recorded(shared_data, "multiarith", "multiarith", 40), "curate": {"max_length": 256},
            "train": {"batch_size": 2, "num_workers": 1, "wandb": {"mode": "disabled"}, **train},
            "eval": {"subset": 4, "max_new_tokens": 8}, "wandb_mode": "disabled"}


def _train_indices(run_dir, method):
    folder = run_dir / "curated" / method / "train"
    return {r["index"] for f in folder.glob("*.parquet") for r in pq.read_table(f).to_pylist()}


def test_data_size_sweep_in_one_store_trains_each_trial_on_its_own_questions_and_resumes(tmp_path, tiny_llama,
                                                                                          shared_data, ray_local):
    run = _run(shared_data, {"model": str(tiny_llama), "epochs": 1, "max_steps": 2})
    sweep_dir = tmp_path / "sweep"
    spec = {"name": "t", "output_dir": str(sweep_dir), "run": run, "param_space": {"curate.train_questions": [6, 12]},
            "wandb_mode": "disabled", "max_concurrent_trials": 1}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))

    # Kill the sweep (its whole process tree) once the first trial has finished.
    first = sweep_dir / "trials" / trial_name({"curate.train_questions": 6, "train.seed": 0})
    proc = subprocess.Popen([sys.executable, "-m", "fcot.cli", "sweep", str(config)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    finished = first / "stages" / "eval-fine_tune_cot.json"
    while not finished.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    assert (first / "stages" / "eval-fine_tune_cot.json").exists(), "the first trial did not finish"
    _kill_tree(proc)
    first_markers = {p.name: p.read_text() for p in (first / "stages").glob("*.json")}
    assert len(first_markers) == 4  # teacher (found in the shared store), curate, train, eval

    out = run_fcot("sweep", config, check=True, cluster=ray_local)
    assert "resuming" in out.stderr
    results = json.loads((sweep_dir / "results.json").read_text())
    trials = {t["curate.train_questions"]: t for t in results["trials"]}
    assert set(trials) == {6, 12} and all(t["status"] == "done" for t in trials.values())
    # Each trial trained on its own questions, a nested subset of the larger one's, and never on a dev question.
    small = _train_indices(first, "fine_tune_cot")
    large = _train_indices(sweep_dir / "trials" / trial_name({"curate.train_questions": 12, "train.seed": 0}),
                           "fine_tune_cot")
    assert len(small) <= 6 and len(large) <= 12 and small < large
    assert trials[6]["fine_tune_cot/kept"] == len(small) < trials[12]["fine_tune_cot/kept"]
    dev = {json.loads(line)["index"] for line in (first / "curated" / "fine_tune_cot" / "dev.jsonl").open()}
    assert len(dev) == 10 and not dev & large
    # The finished trial was not redone: its stage markers (with their finish times) are untouched.
    assert {p.name: p.read_text() for p in (first / "stages").glob("*.json")} == first_markers
    assert results["teacher_runs"] == 1 and not list(sweep_dir.glob("trials/*/teacher"))
    for t in trials.values():
        assert 0 <= t["fine_tune_cot/multiarith/accuracy"] <= 1 and len(t["fine_tune_cot/multiarith/accuracy_ci"]) == 2
        assert t["cpu_s"] > 0 and t["dev_accuracy"] is not None
    report = (sweep_dir / "report.md").read_text()
    assert "| curate.train_questions |" in report and "%" in report and "[" in report  # accuracies with intervals
    assert (sweep_dir / "sweep_curate_train_questions.png").stat().st_size > 1000
    # Several sweeps (here the same one twice) drawn in one study figure.
    run_fcot("report", sweep_dir, sweep_dir, "--output", tmp_path / "study", check=True)
    assert (tmp_path / "study" / "study.png").stat().st_size > 1000
    assert "`t`" in (tmp_path / "study" / "report.md").read_text()


def test_asha_stops_the_trial_whose_learning_rate_is_absurd(tmp_path, tiny_llama, shared_data, ray_local):
    run = {
        "tasks": ["coin_flip"], "methods": ["vanilla"], "baselines": [],  # vanilla: answers in a few steps
        "teacher": {"subset": 60},  # the questions (60: 10 dev, 50 to train on); vanilla reads no records
        "train": {"model": str(tiny_llama), "epochs": 4, "batch_size": 5, "num_workers": 1,
                  "wandb": {"mode": "disabled"}},
        "eval": {"subset": 20},
        "wandb_mode": "disabled",
    }
    spec = {"name": "asha", "output_dir": str(tmp_path / "sweep"), "run": run, "scheduler": "asha",
            "grace_period": 1, "param_space": {"train.lr": [0.003, 1.0e5]}, "wandb_mode": "disabled",
            "max_concurrent_trials": 1}
    config = tmp_path / "asha.yaml"
    config.write_text(yaml.safe_dump(spec))
    swept = run_fcot("sweep", config, check=True, cluster=ray_local)
    assert "invalid value" not in swept.stderr  # Tune's loggers get the epochs' scalars only
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    trials = {t["train.lr"]: t for t in results["trials"]}
    assert trials[0.003]["status"] == "done", trials[0.003]
    assert trials[1.0e5]["status"].startswith("stopped at epoch ") and trials[1.0e5]["epoch"] < 4, trials[1.0e5]
    assert "Stopped early by the scheduler" in (tmp_path / "sweep" / "report.md").read_text()
    assert results["best"]["train.lr"] == 0.003


def test_a_searched_sweep_draws_its_points_with_tpe_under_asha_and_resumes_after_a_kill(tmp_path, tiny_llama,
                                                                                       shared_data, ray_local):
    """Optuna's TPE draws 2 points of a log-uniform learning rate and a batch size, each run with 2 seeds (4 trials,
    ASHA over them), the sweep killed once its first trial has finished: the same command resumes with Tune's
    searcher where it was, redoing no trial and drawing no other point."""
    run = {"tasks": ["coin_flip"], "methods": ["vanilla"], "baselines": [], "teacher": {"subset": 30},
           "train": {"model": str(tiny_llama), "epochs": 2, "max_steps": 4, "num_workers": 1},
           "eval": {"subset": 4, "max_new_tokens": 8}, "wandb_mode": "disabled", "prices": {"cpu_hour": 0.5}}
    sweep_dir = tmp_path / "sweep"
    spec = {"name": "searched", "output_dir": str(sweep_dir), "run": run, "seeds": [0, 1], "scheduler": "asha",
            "search": {"algorithm": "tpe", "num_samples": 2, "seed": 3,
                       "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.batch_size": {"choice": [4, 5]}}},
            "wandb_mode": "disabled", "max_concurrent_trials": 1}
    config = tmp_path / "searched.yaml"
    config.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "fcot.cli", "sweep", str(config)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900

    def finished() -> list:
        return list(sweep_dir.glob("trials/*/stages/eval-vanilla.json"))

    while not finished() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    assert finished(), "the first trial did not finish"
    _kill_tree(proc)
    first = finished()[0].parent
    first_markers = {p.name: p.read_text() for p in first.glob("*.json")}

    out = run_fcot("sweep", config, check=True, cluster=ray_local)
    assert "resuming" in out.stderr and "4 trials: 2 points drawn by tpe (seed 3), 2 seed(s) each" in out.stderr
    results = json.loads((sweep_dir / "results.json").read_text())
    rows = results["trials"]
    assert len(rows) == 4 and all(r["status"] == "done" or r["status"].startswith("stopped") for r in rows), rows
    points = {}
    for r in rows:  # each drawn point once per seed, its values inside the space
        assert 1e-4 <= r["train.lr"] <= 1e-2 and r["train.batch_size"] in (4, 5), r
        points.setdefault((r["train.lr"], r["train.batch_size"]), set()).add(r["train.seed"])
    assert len(points) == 2 and all(seeds == {0, 1} for seeds in points.values()), points
    assert all(r["cost"] > 0 for r in rows if r["status"] == "done")  # priced: what its stages held, at $0.5/CPU-h
    assert len(list(sweep_dir.glob("trials/*"))) == 4  # no trial redone under other values
    assert {p.name: p.read_text() for p in first.glob("*.json")} == first_markers
    assert sorted(results["axes"]) == ["train.batch_size", "train.lr"] and results["search"]["algorithm"] == "tpe"
    assert results["best"] is None or results["best"]["seeds"] == 2
    assert "points drawn by tpe (seed 3)" in (sweep_dir / "report.md").read_text()


def test_a_search_refuses_what_it_cannot_draw_or_plan_naming_the_key(shared_data, tmp_path, monkeypatch):
    from fcot.errors import FcotError
    from fcot.sweep import trials

    monkeypatch.chdir(ROOT)
    base = {"name": "s", "output_dir": str(tmp_path), "base": "experiments/quickstart.yaml"}

    def search(space, **more):
        return load_config(SweepConfig, base={**base, **more, "search": {"num_samples": 4, "space": space}})

    for space, says in [({"train.lr": {"loguniform": [0, 1]}}, "train.lr: loguniform takes [low, high] with 0 < low"),
                        ({"train.lr": {"normal": [0, 1]}}, "train.lr: expected one of {loguniform, uniform, randint"),
                        ({"train.epochs": {"randint": [1.5, 4]}}, "train.epochs: randint takes [low, high]"),
                        ({"train.seed": {"choice": [0, 1]}}, "train.seed: use `seeds`")]:
        with pytest.raises(FcotError, match=re.escape(f"key 'search.space': {says}")):
            search(space)
    with pytest.raises(FcotError, match="key 'search': a search samples every swept key"):
        search({"train.lr": {"choice": [1e-3]}}, param_space={"train.epochs": [1, 2]})
    with pytest.raises(FcotError, match="key 'search': expected a `search`, or a grid"):
        load_config(SweepConfig, base=base)
    # A range the teacher depends on: trials in between would need samples the driver never prepared.
    with pytest.raises(FcotError, match=r"search.space.teacher.sampling.temperature: its range changes the teacher"):
        trials(search({"teacher.sampling.temperature": {"uniform": [0.5, 1.0]}}))
    cfg = search({"train.lr": {"loguniform": [1e-5, 1e-3]}, "curate.num_samples": {"choice": [1, 4]}}, seeds=[0, 1])
    _, max_d, corners = trials(cfg)  # planned from every choice and each range's ends, per seed
    assert max_d == 4 and len(corners) == 8
    assert {(p["train.lr"], p["curate.num_samples"]) for p, _ in corners} == {(1e-5, 1), (1e-5, 4), (1e-3, 1),
                                                                                (1e-3, 4)}


def test_the_best_grid_point_is_chosen_on_dev_never_on_test():
    rows = [  # dev and test disagree: the choice follows dev, averaged over seeds
        {"train.lr": 0.1, "train.seed": 0, "status": "done", "dev_accuracy": 0.6, "fine_tune_cot/test_accuracy": 0.2},
        {"train.lr": 0.1, "train.seed": 1, "status": "done", "dev_accuracy": 0.4, "fine_tune_cot/test_accuracy": 0.2},
        {"train.lr": 0.2, "train.seed": 0, "status": "done", "dev_accuracy": 0.45, "fine_tune_cot/test_accuracy": 0.9},
        {"train.lr": 0.2, "train.seed": 1, "status": "done", "dev_accuracy": 0.5, "fine_tune_cot/test_accuracy": 0.9},
        {"train.lr": 0.3, "train.seed": 0, "status": "stopped at epoch 1 of 4", "dev_accuracy": 0.99},
    ]
    best = best_point(rows, ["train.lr"], "dev_accuracy")
    assert best["train.lr"] == 0.1 and best["dev_accuracy"] == 0.5 and best["seeds"] == 2
    assert best["fine_tune_cot/test_accuracy"] == 0.2  # reported beside the choice, not used for it
    assert load_config(SweepConfig, base={"param_space": {"train.lr": [1]}}).metric == "dev_accuracy"


def test_trials_at_once_counts_gpus_as_well_as_cpus(shared_data):
    """The GPU sweep's trials each hold GPUs: on 8 GPUs and 64 CPUs, the GPUs decide how many run at once."""
    from fcot.resources import largest
    from fcot.sweep import trials, trials_at_once

    cfg = load_config(SweepConfig, ROOT / "experiments" / "sweeps" / "gpu.yaml", [f"run.data_dir={shared_data}"])
    demands = [d for _, c in trials(cfg)[2] for d in c.demands()]
    gpus, cpus = largest(demands, "GPU"), largest(demands, "CPU")
    assert gpus >= 1
    assert trials_at_once(demands, {"CPU": 64, "GPU": 8}) == min(64 // (cpus + 1), 8 // gpus)
    assert trials_at_once(demands, {"CPU": 64, "GPU": gpus}) == 1  # CPUs alone would have started many
    assert trials_at_once(demands, {"CPU": 1000, "GPU": 0}) == 1  # never 0: the check at submit refuses it
    cpu_only = [d for d in demands if not d.total("GPU")]
    assert trials_at_once(cpu_only, {"CPU": 64}) == 64 // (largest(cpu_only, "CPU") + 1)


def test_a_worker_node_lost_mid_sweep_retries_its_trial_which_resumes(tmp_path, tiny_llama, shared_data, lose_a_node):
    """Two trials at once on a ray.cluster_utils.Cluster (a head without CPUs, two 2-CPU worker nodes): the node
    training one of them removed without grace once both trials have committed an epoch (of 8, so that
    neither has finished), a fresh node added.
    Training is told not to restart itself (train.max_failures 0), so the trial fails; Tune starts it again
    (sweep.trial_retries) and it resumes from its checkpoint. The sweep ends with every trial done."""
    run = _run(shared_data, {"model": str(tiny_llama), "epochs": 8, "max_failures": 0})
    sweep_dir = tmp_path / "sweep"
    spec = {"name": "lost", "output_dir": str(sweep_dir), "run": run, "param_space": {"train.lr": [1e-3, 3e-3]},
            "wandb_mode": "disabled", "trial_retries": 1}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    results = lose_a_node("sweep", config)["result"]
    assert [t["status"] for t in results["trials"]] == ["done", "done"], results["trials"]
    trained = [json.loads(p.read_text())["result"] for p in sweep_dir.glob("trials/*/stages/train-fine_tune_cot.json")]
    assert len(trained) == 2
    resumed = [t for t in trained if t["restarts"]]
    assert len(resumed) >= 1 and all(t["resumed_from_step"] > 0 for t in resumed), trained
    assert all(t["steps"] == t["planned_steps"] for t in trained)


def test_the_sweeps_wandb_mode_reaches_every_trial_and_changes_no_stage(shared_data):
    """`wandb_mode: disabled` on the sweep turns W&B off in each trial's training, as on a run; it is a logging key,
    so the trials' stage markers are those of the sweep without it."""
    from fcot.run import config_hash, stages, train_config
    from fcot.sweep import trials

    def planned(*overrides):
        return trials(load_config(SweepConfig, ROOT / "experiments" / "sweeps" / "cpu.yaml",
                                  [f"run.data_dir={shared_data}", *overrides]))[2]

    for mode in ("disabled", "offline"):
        for _, run in planned(f"wandb_mode={mode}"):
            assert run.wandb_mode == mode
            assert {train_config(run, m).wandb.mode for m in run.methods} == {mode}
    markers = [{s.name: config_hash(*s.inputs) for s in stages(run)} for _, run in planned("wandb_mode=disabled")]
    assert markers == [{s.name: config_hash(*s.inputs) for s in stages(run)} for _, run in planned()]
