"""`fcot sweep`: Ray Tune over any run-config keys (D, learning rate, batch size, student, data fraction, teacher).

The teacher is shared: before Tune starts, the driver runs each distinct teacher config once at the largest D
of the sweep. Sample k of a question has the same cache key whatever D is, so every trial's curation simply
reads the first D samples from that one store: no trial generates. Each trial then curates, fine-tunes (a
Tune function that runs a TorchTrainer, the Ray 2.60 way) and evaluates, and reports test accuracy.
An interrupted sweep resumes with `Tuner.restore` without rerunning finished trials.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from fcot.config import Config, apply_override, load_config, redacted
from fcot.errors import FcotError
from fcot.io import atomic_write_json, read_json


class SweepConfig(Config):
    name: str = "sweep"
    output_dir: str | None = None  # default runs/sweeps/{name}
    base: str | None = None  # a run config (YAML) the trials start from
    run: dict = {}  # or inline run config keys (applied over `base`)
    param_space: dict[str, list]  # dotted run-config key -> values (a grid over all of them)
    metric: str = "accuracy"  # test accuracy of the Fine-tune-CoT student, averaged over tasks
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: as many as the cluster's CPUs/GPUs fit
    scheduler: Literal["none", "asha"] = "none"  # ASHA stops weak trials early (on dev accuracy per epoch)
    grace_period: int = Field(1, ge=1)
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    ray_address: str | None = None

    @field_validator("param_space")
    @classmethod
    def _nonempty(cls, v):
        for key, values in v.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"param_space.{key}: expected a non-empty list of values")
        return v


def _trial_dict(base: dict, params: dict, max_d: int | None = None) -> dict:
    """The run config of one trial. D is chosen at curation time: the teacher is set to the sweep's largest
    D (so its sampling temperature and cache keys are those of the shared run) and curation to the trial's D."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    teacher_d = ((data.get("teacher") or {}).get("sampling") or {}).get("num_samples", 1)
    d = (data.get("curate") or {}).get("num_samples") or teacher_d
    data.setdefault("curate", {})["num_samples"] = d
    if max_d is not None:
        data.setdefault("teacher", {}).setdefault("sampling", {})["num_samples"] = max_d
    return data


def max_samples(cfg: SweepConfig, base: dict) -> int:
    return max(_trial_dict(base, p)["curate"]["num_samples"] for p in _grid(cfg.param_space))


def _run_config(data: dict):
    from fcot.run import RunConfig

    return load_config(RunConfig, base=data)


def _merge(base: dict, over: dict) -> dict:
    """`over` applied key by key into `base` (nested sections merge: `run.train.epochs` keeps the base's
    other train keys)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def base_run(cfg: SweepConfig, sweep_dir: Path) -> dict:
    from fcot.config import _read_yaml

    data = _merge(_read_yaml(Path(cfg.base)) if cfg.base else {}, cfg.run)
    data.setdefault("name", cfg.name)
    data["output_dir"] = str(sweep_dir / "base")
    if cfg.ray_address:
        data["ray_address"] = cfg.ray_address
    return data


def prepare_teachers(cfg: SweepConfig, base: dict, sweep_dir: Path, max_d: int) -> list[dict]:
    """Run each distinct teacher of the grid once, at the sweep's largest D, into the shared store."""
    from fcot.run import _hash
    from fcot.teacher.pipeline import teach

    teachers = {}
    for params in _grid(cfg.param_space):
        run_cfg = _run_config(_trial_dict(base, params, max_d))
        teacher = run_cfg.teacher.model_copy(update={"output_dir": str(sweep_dir / "teacher")})
        teachers[_hash(teacher)] = teacher
    summaries = [teach(t) for t in teachers.values()]
    atomic_write_json(sweep_dir / "teachers.json", summaries)
    return summaries


def _grid(space: dict[str, list]) -> list[dict]:
    grid = [{}]
    for key, values in space.items():
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


def trial_name(params: dict) -> str:
    """A trial's folder under SWEEP_DIR/trials: its swept values, readable and stable across restores."""
    import hashlib
    import re

    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(params.items()))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.=,-]', '_', text)[:80]}-{digest}"


def trial(params: dict) -> None:
    """One Tune trial: curate -> train (a TorchTrainer) -> evaluate; reports accuracy.

    Its run folder is named by its swept values and keeps fcot run's stage markers, so a trial that Tune
    starts again (a restored sweep, a retried trial) skips the stages it already finished.
    """
    import ray.tune

    from fcot.curate import curate
    from fcot.evaluate import evaluate
    from fcot.run import Ledger, curate_config, eval_config, train_config
    from fcot.train.trainer import train

    base, sweep_dir = params["__base"], Path(params["__sweep_dir"])
    swept = {k: v for k, v in params.items() if not k.startswith("__")}
    data = _trial_dict(base, swept, params["__max_d"])
    data["output_dir"] = str(sweep_dir / "trials" / trial_name(swept))
    data.setdefault("teacher", {})["output_dir"] = str(sweep_dir / "teacher")  # the shared store
    data.setdefault("curate", {})["teacher_dir"] = str(sweep_dir / "teacher")
    cfg = _run_config(data)
    ledger = Ledger(cfg.run_dir)

    def stage(name: str, configs: tuple, fn) -> dict:
        return ledger.run(name, configs, fn, cpus=0)[0]["result"]

    started = time.time()
    result = {"tasks": {}}
    for method in cfg.methods:
        c, t, ev = curate_config(cfg, method), train_config(cfg, method), eval_config(cfg, method)
        upstream = (cfg.teacher, c) if method == "fine_tune_cot" else (c,)
        curated = stage(f"curate-{method}", upstream, lambda: curate(c))
        trained = stage(f"train-{method}", (*upstream, t), lambda: train(t))
        metrics = stage(f"eval-{method}", (*upstream, t, ev), lambda: evaluate(ev))
        acc = {task: m["accuracy"] for task, m in metrics["tasks"].items()}
        result[f"{method}_accuracy"] = sum(acc.values()) / len(acc)
        result[f"{method}_kept"] = curated["kept"]
        result[f"{method}_final_loss"] = trained["final_loss"]
        if trained.get("best_dev_accuracy") is not None:
            result[f"{method}_best_dev_accuracy"] = trained["best_dev_accuracy"]
        for task, a in acc.items():
            result["tasks"][f"{method}/{task}"] = a
    result["accuracy"] = result.get("fine_tune_cot_accuracy", result.get(f"{cfg.methods[0]}_accuracy"))
    result["trial_s"] = round(time.time() - started, 1)
    result["run_dir"] = str(cfg.run_dir)
    tasks = result.pop("tasks")
    ray.tune.report({**result, **{f"acc/{k}": v for k, v in tasks.items()}})


def dry_run_sweep(cfg: SweepConfig) -> list[str]:
    """Validate every trial's run config (tasks, models, resources, paths) without running anything."""
    from fcot.run import dry_run

    sweep_dir = Path(cfg.output_dir or f"runs/sweeps/{cfg.name}").resolve()
    base = base_run(cfg, sweep_dir)
    max_d = max_samples(cfg, base)
    notes = []
    for params in _grid(cfg.param_space):
        notes = dry_run(_run_config(_trial_dict(base, params, max_d)))
    return [f"{len(_grid(cfg.param_space))} trials, teacher at D = {max_d}"] + notes


def sweep(cfg: SweepConfig, log=print) -> dict:
    """Run (or resume) a sweep; writes results.json and returns it."""
    import ray
    from ray import tune

    from fcot.ray_utils import init_ray

    sweep_dir = Path(cfg.output_dir or f"runs/sweeps/{cfg.name}").resolve()
    base = base_run(cfg, sweep_dir)
    dry_run_sweep(cfg)  # every trial's config is valid before anything runs
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep.json", redacted(cfg.model_dump()))
    init_ray(cfg.ray_address)
    max_d = max_samples(cfg, base)
    log(f"[sweep] teacher: generating once, at the largest D ({max_d})")
    teachers = prepare_teachers(cfg, base, sweep_dir, max_d)

    one = _run_config(_trial_dict(base, _grid(cfg.param_space)[0], max_d))
    # + 1: a trial's Ray Data curation needs a CPU for its read tasks beside its actor; without it two trials
    # that each hold their actor's CPU wait on each other forever.
    per_trial_cpus = max(one.train.num_workers * one.train.cpus_per_worker, one.eval.replicas * one.eval.cpus_per_replica) + 1
    max_concurrent = cfg.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial_cpus))
    param_space = {"__base": base, "__sweep_dir": str(sweep_dir), "__max_d": max_d,
                   **{k: tune.grid_search(v) for k, v in cfg.param_space.items()}}
    callbacks = []
    mode = cfg.wandb_mode if cfg.wandb_mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode != "disabled":
        from ray.air.integrations.wandb import WandbLoggerCallback

        os.environ["WANDB_MODE"] = mode
        callbacks.append(WandbLoggerCallback(project="fcot", group=cfg.name, excludes=["__base", "__sweep_dir", "__max_d"], mode=mode,
                                             dir=str(sweep_dir)))
    scheduler = None
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(grace_period=cfg.grace_period)
    # The trial function holds no CPU itself: its Ray Data, TorchTrainer and evaluation actors ask for their own
    # (outside the trial's placement group). Even 0.01 CPU would leave 1.99 of 2 free, where a 1-CPU read task
    # beside curation's 1-CPU actor never fits and the trial waits forever; a bundle must not be empty, so it
    # holds a token amount of memory instead.
    trainable = tune.with_resources(trial, {"memory": 2**20})
    path = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(path)):
        log(f"[sweep] resuming from {path}")
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", max_concurrent_trials=max_concurrent,
                                                       scheduler=scheduler),
                           run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), callbacks=callbacks,
                                                     verbose=0))
    grid = tuner.fit()
    rows = []
    for r in grid:
        row = {k: r.config[k] for k in cfg.param_space}
        row.update({k: v for k, v in (r.metrics or {}).items() if k.endswith(("accuracy", "_kept", "_loss", "trial_s"))
                    or k.startswith("acc/") or k == "run_dir"})
        row["status"] = "error" if r.error else "done"
        rows.append(row)
    done_rows = [r for r in rows if r.get(cfg.metric) is not None]
    best = max(done_rows, key=lambda r: r[cfg.metric]) if done_rows else None
    results = {"name": cfg.name, "sweep_dir": str(sweep_dir), "metric": cfg.metric, "axes": list(cfg.param_space),
               "trials": rows, "best": best, "teacher_runs": len(teachers)}
    atomic_write_json(sweep_dir / "results.json", results)
    from fcot.report import build_sweep_report

    build_sweep_report(sweep_dir)
    return results
