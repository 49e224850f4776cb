"""`fcot sweep`: Ray Tune over any run-config keys (D, data size, learning rate, student, teacher), with seeds.

The teacher is shared: before Tune starts, the driver runs each distinct teacher config once, at the largest D
of the sweep, into one store. Sample k of a question has the same key whatever D is and every record names its
teacher, so a trial's curation reads exactly its own teacher's first D samples of its own questions, and its
teacher stage finds everything generated. Each trial then runs the run's stage chain (`fcot.run.stages`:
curate -> train (a TorchTrainer inside the Tune function, the Ray 2.60 way) -> evaluate), in a folder named by
its values, so a restored sweep skips what it finished.

Model selection never reads the test split: the primary method's (the run config's `primary_method`, by default
the first) training reports its dev accuracy to Tune every epoch (ASHA and any Tune scheduler stop weak trials on
it), the trial's final `dev_accuracy` is the selected epoch's, and the sweep's best grid point is the best mean dev
accuracy over seeds; test accuracy (with its interval) is reported beside it, with each method against its
reference (fcot.report.compared). `seeds: [0, 1, 2]` repeats every grid point with those training seeds.

A sweep is a grid (`param_space`) or a search (`search`): Optuna's sampler through `ray.tune.search` (random,
quasi-random or TPE) draws `num_samples` points of a space of distributions, each run once per seed (Tune's
Repeater: a point's seeds share its values, and TPE learns from their mean). The driver plans a search from its
corners (every choice, each range's ends): the teachers it prepares, the largest D, the resources, the checks. A
range may not move the teacher (a trial would need samples no one prepared): teacher keys take `choice`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fcot.config import (
    Config,
    PathStr,
    RayAddress,
    WandbMode,
    apply_override,
    load_config,
    merge,
    read_yaml,
    redacted,
    wandb_mode,
)
from fcot.curate import split_questions
from fcot.errors import FcotError
from fcot.io import atomic_write_json
from fcot.prices import stage_cost
from fcot.ray_utils import init_ray
from fcot.report import build_sweep_report
from fcot.resources import Demand, largest
from fcot.run import RunConfig, config_hash, curate_config, dry_run, final_train, run_stages
from fcot.teacher.pipeline import teach

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")  # Tune's, with Tune's bounds (randint: high excluded)
SAMPLERS = {"random": "RandomSampler", "quasi_random": "QMCSampler", "tpe": "TPESampler"}  # Optuna's
MAX_CORNERS = 1024


class SearchConfig(Config):
    """Trials drawn by a search algorithm instead of a grid: `num_samples` points of `space`, each once per seed."""
    algorithm: Literal["random", "quasi_random", "tpe"] = "tpe"
    num_samples: int = Field(ge=1)
    seed: int = 0  # the sampler's: the same config draws the same points
    # dotted run-config key -> one distribution: {loguniform: [low, high]}, {uniform: [low, high]},
    # {randint: [low, high]} (high excluded) or {choice: [value, ...]}
    space: dict[str, dict]

    @field_validator("space")
    @classmethod
    def _distributions(cls, space):
        if not space:
            raise ValueError("expected at least one key")
        for key, dist in space.items():
            (kind, args), = dist.items() if isinstance(dist, dict) and len(dist) == 1 else [(None, None)]
            if kind not in DISTRIBUTIONS:
                raise ValueError(f"{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
            if key == "train.seed":
                raise ValueError("train.seed: use `seeds` (repeats of every point)")
            if kind == "choice":
                if not isinstance(args, list) or not args:
                    raise ValueError(f"{key}: choice takes a non-empty list of values")
                continue
            ok = isinstance(args, list) and len(args) == 2 and all(
                isinstance(a, int if kind == "randint" else (int, float)) and not isinstance(a, bool) for a in args)
            if not ok or not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
                raise ValueError(f"{key}: {kind} takes [low, high] with {'0 < ' * (kind == 'loguniform')}low < high"
                                 f"{' (integers)' * (kind == 'randint')}, got {args!r}")
        return space


class SweepConfig(Config):
    name: str = "sweep"
    output_dir: PathStr = Field(None)  # default runs/sweeps/{name}
    base: PathStr | None = None  # a run config (YAML) the trials start from
    run: dict = {}  # or inline run config keys (merged into `base`)
    param_space: dict[str, list] = {}  # dotted run-config key -> values (a grid over all of them)
    search: SearchConfig | None = None  # or a search over distributions (module doc)
    seeds: list[int] = [0]  # training seeds (train.seed): every grid point runs once per seed
    # dev_accuracy: the primary method's dev accuracy at its selected epoch (run.primary_method, default the first
    # method). Never test accuracy.
    metric: Literal["dev_accuracy"] = "dev_accuracy"
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: as many as the cluster's CPUs/GPUs fit
    # times a failed trial is started again (it resumes: finished stages and training checkpoints are kept)
    trial_retries: int = Field(1, ge=0)
    scheduler: Literal["none", "asha"] = "none"  # ASHA stops weak trials early, on dev accuracy per epoch
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(2, gt=1)
    wandb_mode: WandbMode = "auto"
    ray_address: RayAddress = None

    @model_validator(mode="before")
    @classmethod
    def _default_dir(cls, data):
        if isinstance(data, dict) and not data.get("output_dir"):
            data = {**data, "output_dir": f"runs/sweeps/{data.get('name', 'sweep')}"}
        return data

    @field_validator("param_space")
    @classmethod
    def _nonempty(cls, v):
        for key, values in v.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"param_space.{key}: expected a non-empty list of values")
            if key == "train.seed":
                raise ValueError("param_space.train.seed: use `seeds` (repeats of every grid point)")
        return v

    @field_validator("search")
    @classmethod
    def _grid_or_search(cls, search, info: ValidationInfo):
        grid = info.data.get("param_space")
        if search is None and not grid:
            raise ValueError("expected a `search`, or a grid of values in `param_space`")
        if search is not None and grid:
            # Optuna samples every key it is given; a grid beside it would be crossed by Tune's own generator.
            raise ValueError("a search samples every swept key: give param_space's keys in search.space as "
                             "{choice: [...]}, or sweep a grid without `search`")
        return search

    @property
    def axes(self) -> list[str]:
        """The swept keys (train.seed aside)."""
        return list(self.search.space if self.search else self.param_space)


    def demands(self, prefix: str = "") -> list[Demand]:
        """What the trials' stages ask of the cluster (each trial's stages run one after another)."""
        seen: dict = {}
        for _, run_cfg in trials(self)[2]:
            for d in run_cfg.demands():
                seen.setdefault((d.key, d.count, tuple(sorted(d.unit.items()))), d)
        return list(seen.values())


def _grid(cfg: SweepConfig) -> list[dict]:
    """Every trial's swept values: the grid over param_space, once per seed. A search: its corners (module doc),
    what the driver plans from; Tune draws the trials."""
    grid = [{}]
    space = {k: _ends(d) for k, d in cfg.search.space.items()} if cfg.search else cfg.param_space
    for key, values in space.items():
        grid = [{**g, key: v} for g in grid for v in values]
        if len(grid) > MAX_CORNERS:
            raise FcotError(f"search.space: over {MAX_CORNERS} combinations of its choices and ranges' ends to plan "
                            "from; fewer choices, or ranges")
    return [{**g, "train.seed": seed} for g in grid for seed in cfg.seeds]


def _ends(dist: dict) -> list:
    (kind, args), = dist.items()
    return args if kind == "choice" else [args[0], args[1] - 1] if kind == "randint" else list(args)


def base_run(cfg: SweepConfig) -> dict:
    data = merge(read_yaml(cfg.base) if cfg.base else {}, cfg.run)
    data.setdefault("name", cfg.name)
    data["output_dir"] = str(Path(cfg.output_dir) / "base")
    if cfg.ray_address:
        data["ray_address"] = cfg.ray_address
    if cfg.wandb_mode != "auto":  # the sweep's W&B mode reaches its trials' trainings (a logging key: no rerun)
        data["wandb_mode"] = cfg.wandb_mode
    return data


def _budget(data: dict) -> int:
    """The teacher samples a trial's config asks for (adaptive: max_samples; else curation's D or the teacher's)."""
    sampling = (data.get("teacher") or {}).get("sampling") or {}
    if sampling.get("adaptive"):
        return int(sampling["adaptive"]["max_samples"])
    return int((data.get("curate") or {}).get("num_samples") or sampling.get("num_samples") or 1)


def trial_dict(base: dict, params: dict, max_d: int, sweep_dir: Path | None = None) -> dict:
    """The run config of one trial. D is chosen at curation: the teacher is set to the sweep's largest D (so its
    sampling temperature is that of the shared run) and curation to the trial's D."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    sampling = data.setdefault("teacher", {}).setdefault("sampling", {})
    if not sampling.get("adaptive"):
        data.setdefault("curate", {})["num_samples"] = _budget(data)
        sampling["num_samples"] = max_d
    data.setdefault("train", {})["report_to_tune"] = True
    if sweep_dir is not None:
        data["output_dir"] = str(sweep_dir / "trials" / trial_name(params))
        data["teacher"]["output_dir"] = str(sweep_dir / "teacher")  # the shared store
    return data


def trial_name(params: dict) -> str:
    """A trial's folder under SWEEP_DIR/trials: its swept values, readable and stable across restores."""
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(params.items()))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.=,-]', '_', text)[:80]}-{digest}"


def max_budget(cfg: SweepConfig, base: dict) -> int:
    return max(_budget(trial_dict(base, p, 1)) for p in _grid(cfg))


def _trial_config(base: dict, params: dict, max_d: int, sweep_dir: Path) -> RunConfig:
    return load_config(RunConfig, base=trial_dict(base, params, max_d, sweep_dir))


def trials(cfg: SweepConfig) -> tuple[dict, int, list[tuple[dict, RunConfig]]]:
    """The base run, the teacher's largest D, and every trial's (swept values, validated run config): a search's
    corners."""
    base = base_run(cfg)
    max_d = max_budget(cfg, base)
    runs = [(p, _trial_config(base, p, max_d, Path(cfg.output_dir))) for p in _grid(cfg)]
    for key, dist in (cfg.search.space if cfg.search else {}).items():
        if "choice" in dist:
            continue
        asked: dict[str, set] = {}  # the teacher and D of the corners that differ only in `key`
        for params, run_cfg in runs:
            rest = json.dumps({k: v for k, v in params.items() if k != key}, sort_keys=True, default=str)
            teacher = config_hash(run_cfg.teacher) if run_cfg.uses_teacher else None
            asked.setdefault(rest, set()).add((teacher, _budget(trial_dict(base, params, 1))))
        if any(len(a) > 1 for a in asked.values()):
            raise FcotError(f"search.space.{key}: its range changes the teacher or D, which the driver prepares "
                            "before the trials; a key the teacher depends on takes {choice: [...]}")
    return base, max_d, runs


def prepare_teachers(cfg: SweepConfig, planned: list[tuple[dict, RunConfig]], log=print) -> list[dict]:
    """Run each distinct teacher of the grid once, at the sweep's largest D, into the shared store."""
    sweep_dir = Path(cfg.output_dir)
    teachers = {}
    for _, trial_cfg in planned:
        if trial_cfg.uses_teacher:  # vanilla fine-tuning asks the teacher nothing
            teachers.setdefault(config_hash(trial_cfg.teacher), trial_cfg.teacher)
    # The largest adaptive budgets first: smaller ones then find their samples in the store.
    ordered = sorted(teachers.values(), key=lambda t: -t.sampling.budget)
    summaries = []
    for t in ordered:
        log(f"[sweep] teacher {len(summaries) + 1} of {len(ordered)}: {t.engine.kind} {t.engine.model}, "
            f"{t.sampling.budget} samples per question")
        summaries.append(teach(t))
    atomic_write_json(sweep_dir / "teachers.json", summaries)
    return summaries


def trial(params: dict) -> None:
    """One Tune trial: the run's stage chain in the trial's own folder; reports dev and test metrics."""
    import ray.tune  # heavy: inside the Tune trial only

    base, sweep_dir, max_d = params["__base"], Path(params["__sweep_dir"]), params["__max_d"]
    swept = swept_values(params)
    cfg = _trial_config(base, swept, max_d, sweep_dir)
    started = time.time()
    markers = run_stages(cfg, log=lambda m: None)
    # "finished": the whole chain ran (Tune's own `done` is also set on trials a scheduler stopped)
    ray.tune.report({**trial_result(cfg, markers), "trial_s": round(time.time() - started, 1), "finished": True})


def swept_values(config: dict) -> dict:
    """A Tune trial's swept values from its config: a grid's and a search's choices are JSON-encoded (lists and
    mappings are values too, which Tune would read as spaces of their own), a range's value is itself; a search's
    seed is its repeat's (Tune's Repeater numbers them)."""
    swept = {k: json.loads(v) if isinstance(v, str) else v for k, v in config.items() if not k.startswith("__")}
    if "__trial_index__" in config:
        swept["train.seed"] = config["__seeds"][config["__trial_index__"]]
    return swept


def trial_result(cfg: RunConfig, markers: dict) -> dict:
    """A trial's row: the primary method's selected dev accuracy (the sweep's metric) and, per method and task,
    test accuracy with its interval, the majority rate, collapse, data kept; and the trial's measured cost."""
    trained = markers[final_train(cfg, cfg.primary_method)]["result"]
    out = {"dev_accuracy": trained.get("selected_dev_accuracy"), "selected_epoch": trained.get("selected_epoch"),
           "epochs": trained.get("epochs"), "run_dir": cfg.output_dir,
           "parameters": trained.get("parameters"),
           "cpu_s": round(sum(m["cpu_s"] for m in markers.values()), 1),
           "gpu_s": round(sum(m["gpu_s"] for m in markers.values()), 1)}
    if cfg.prices.set:
        out["cost"] = round(sum(stage_cost(m, cfg.prices) for m in markers.values()), 6)
    for method in cfg.methods:
        metrics = markers[f"eval-{method}"]["result"]["tasks"]
        out[f"{method}/kept"] = markers[f"curate-{method}"]["result"]["kept"]
        out[f"{method}/dev_accuracy"] = markers[final_train(cfg, method)]["result"].get("selected_dev_accuracy")
        for task, m in metrics.items():
            for k in ("accuracy", "accuracy_ci", "majority", "random", "collapsed"):
                out[f"{method}/{task}/{k}"] = m[k]
        out[f"{method}/test_accuracy"] = sum(m["accuracy"] for m in metrics.values()) / len(metrics)
    if "teacher" in markers:
        out["teacher_tokens"] = sum(t["completion_tokens"] + t["prompt_tokens"]
                                    for t in markers["teacher"]["result"]["tasks"].values())
    return out


def dry_run_sweep(cfg: SweepConfig, planned: tuple | None = None) -> list[str]:
    """Validate every trial's run config (tasks, models, resources, paths) without running anything; `planned`:
    what `trials(cfg)` returned, where the caller has it."""
    _, max_d, runs = planned or trials(cfg)
    notes, seen = [], set()
    for _, run_cfg in runs:
        if run_cfg.train.dev is None and run_cfg.curate.dev_fraction == "auto" and Path(run_cfg.data_dir).exists():
            qs, dev, _ = split_questions(curate_config(run_cfg, run_cfg.primary_method))  # curation's own rule
            if not dev:
                raise FcotError(f"metric dev_accuracy needs a dev split: {len(qs)} questions are too few for "
                                f"curate.dev_fraction auto; set curate.dev_fraction")
        if run_cfg.curate.dev_fraction == 0 and run_cfg.train.dev is None:
            raise FcotError("metric dev_accuracy needs a dev split: curate.dev_fraction is 0")
        if run_cfg.train.dev is not None and run_cfg.train.dev.every != 1:
            raise FcotError("a sweep reports dev accuracy to Tune every epoch: set train.dev.every to 1")
        key = config_hash(run_cfg.teacher, run_cfg.train)
        if key not in seen:  # the same checks for trials that differ only in curation or seed
            seen.add(key)
            notes = dry_run(run_cfg)
    if cfg.search:
        s = cfg.search
        head = (f"{s.num_samples * len(cfg.seeds)} trials: {s.num_samples} points drawn by {s.algorithm} "
                f"(seed {s.seed}), {len(cfg.seeds)} seed(s) each; planned from {len(runs)} corners")
    else:
        head = f"{len(runs)} trials ({len(cfg.seeds)} seed(s) each)"
    return [f"{head}, teacher at D = {max_d}"] + notes


def trials_at_once(demands: list[Demand], cluster: dict[str, float]) -> int:
    """How many trials the cluster runs at once: the fewest that its CPUs or its GPUs fit, the largest trial's
    demand setting each (resources may be swept). + 1 CPU: a trial's Ray Data curation needs a CPU for its read
    tasks beside its actor; without it two trials that each hold their actor's CPU wait on each other forever."""
    fits = [cluster.get("CPU", 1) // (largest(demands, "CPU") + 1)]
    if largest(demands, "GPU") > 0:
        fits.append(cluster.get("GPU", 0) // largest(demands, "GPU"))
    return max(1, int(min(fits)))


def sweep(cfg: SweepConfig, log=print, checked: bool = False) -> dict:
    """Run (or resume) a sweep; writes results.json and report.md, and returns the results. `checked`: the caller
    ran `dry_run_sweep(cfg)` already (and showed its notes)."""
    import ray  # heavy: only where Ray work starts
    from ray import tune  # heavy, as ray

    sweep_dir = Path(cfg.output_dir)
    planned = trials(cfg)
    base, max_d, runs = planned
    for note in [] if checked else dry_run_sweep(cfg, planned):  # every trial's config is valid before anything runs
        log(note)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / "sweep.json", redacted(cfg.model_dump()))
    init_ray(cfg.ray_address)
    teachers = prepare_teachers(cfg, runs, log)

    one = runs[0][1]
    demands = [d for _, c in runs for d in c.demands()]
    max_concurrent = cfg.max_concurrent_trials or trials_at_once(demands, ray.cluster_resources())
    param_space = {"__base": base, "__sweep_dir": str(sweep_dir), "__max_d": max_d, "__seeds": cfg.seeds,
                   **_tune_space(cfg, [params for params, _ in runs])}
    callbacks = _wandb_callbacks(cfg, sweep_dir)
    scheduler = None
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler  # heavy, as ray above

        # One result per epoch, then the trial's final one: a trial that reached max_t must go on to its evaluation.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(2, *(c.train.epochs for _, c in runs)),
                                  grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor,
                                  stop_last_trials=False)
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
                           tune_config=tune.TuneConfig(metric=cfg.metric, mode="max", scheduler=scheduler,
                                                       max_concurrent_trials=max_concurrent,
                                                       **_searcher(cfg)),
                           run_config=tune.RunConfig(
                               name="tune", storage_path=str(sweep_dir), callbacks=callbacks, verbose=0,
                               # a trial that fails (a lost node) runs again and resumes from its run dir's markers
                               failure_config=tune.FailureConfig(max_failures=cfg.trial_retries)))
    rows = _trial_rows(tuner.fit(), lambda params: _trial_config(base, params, max_d, sweep_dir).train.epochs)
    results_doc = {"name": cfg.name, "sweep_dir": str(sweep_dir), "metric": cfg.metric, "axes": cfg.axes,
                   "search": cfg.search.model_dump() if cfg.search else None,
                   "seeds": cfg.seeds, "methods": one.methods, "primary_method": one.primary_method,
                   "reference_method": one.reference_method, "tasks": one.tasks, "trials": rows,
                   "best": best_point(rows, cfg.axes, cfg.metric), "teacher_runs": len(teachers),
                   "teacher_tokens": sum(t["tasks"][k]["completion_tokens"] + t["tasks"][k]["prompt_tokens"]
                                         for t in teachers for k in t["tasks"])}
    atomic_write_json(sweep_dir / "results.json", results_doc)
    build_sweep_report(sweep_dir)
    return results_doc


def _tune_space(cfg: SweepConfig, grid: list[dict]) -> dict:
    """Tune's space of the swept keys. Choices JSON-encoded (swept_values); a grid per key, crossed by Tune into
    exactly fcot's grid (the seed one of its keys); a search's distributions as Tune's."""
    from ray import tune  # heavy: where Ray work starts

    if cfg.search is None:
        return {k: tune.grid_search(list(dict.fromkeys(json.dumps(p[k]) for p in grid))) for k in grid[0]}
    space = {}
    for key, dist in cfg.search.space.items():
        (kind, args), = dist.items()
        space[key] = tune.choice([json.dumps(v) for v in args]) if kind == "choice" else getattr(tune, kind)(*args)
    return space


def _searcher(cfg: SweepConfig) -> dict:
    """A search's TuneConfig keys: Optuna's sampler, seeded, each point repeated once per seed."""
    if cfg.search is None:
        return {}
    import optuna  # heavy, and a search's only
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    scrambled = {"scramble": True} if s.algorithm == "quasi_random" else {}  # Sobol points shifted by the seed
    sampler = getattr(optuna.samplers, SAMPLERS[s.algorithm])(seed=s.seed, **scrambled)
    return {"search_alg": Repeater(OptunaSearch(sampler=sampler), repeat=len(cfg.seeds), set_index=True),
            "num_samples": s.num_samples * len(cfg.seeds)}


def _wandb_callbacks(cfg: SweepConfig, sweep_dir: Path) -> list:
    """Tune's W&B logger, one run per trial in the sweep's group, unless W&B is disabled."""
    mode = wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback  # heavy: with W&B only

    if mode == "offline":  # Ray's callback asks for an API key unless the *variable* says offline
        os.environ["WANDB_MODE"] = mode
    return [WandbLoggerCallback(project="fcot", group=cfg.name, mode=mode, dir=str(sweep_dir),
                                excludes=["__base", "__sweep_dir", "__max_d", "__seeds"])]


def _trial_rows(results, epochs) -> list[dict]:
    """results.json's rows: each trial's swept values, its status (done, stopped at an epoch by the scheduler,
    error with the first line of its error) and the metrics it reported last. `epochs(params)`: a trial's."""
    rows = []
    for r in results:
        params = swept_values(r.config)
        metrics = dict(r.metrics or {})
        status = "error" if r.error else "done" if metrics.get("finished") else (
            f"stopped at epoch {metrics.get('epoch', '?')} of {epochs(params)}")
        row = {**params, "status": status, **{k: v for k, v in metrics.items() if _kept_metric(k)}}
        if r.error:
            row["error"] = str(r.error).splitlines()[0][:300]
        rows.append(row)
    return rows


def _kept_metric(key: str) -> bool:
    return key != "done" and not key.startswith((
        "config", "time_", "timestamp", "date", "hostname", "node_ip", "pid", "checkpoint", "iterations_since_restore",
        "experiment_tag"))


def best_point(rows: list[dict], axes: list[str], metric: str) -> dict | None:
    """The grid point with the best mean `metric` over its seeds (finished trials only); its test accuracies
    are carried beside it, never used to choose."""
    points: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "done" and r.get(metric) is not None:
            points.setdefault(json.dumps([r[a] for a in axes]), []).append(r)
    if not points:
        return None
    key, chosen = max(points.items(), key=lambda kv: sum(r[metric] for r in kv[1]) / len(kv[1]))
    best = {a: v for a, v in zip(axes, json.loads(key))}
    best[metric] = sum(r[metric] for r in chosen) / len(chosen)
    best["seeds"] = len(chosen)
    for k in {k for r in chosen for k in r if k.endswith("/test_accuracy")}:
        best[k] = sum(r[k] for r in chosen) / len(chosen)
    return best
