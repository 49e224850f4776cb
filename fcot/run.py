"""`fcot run`: the whole method as one Ray job — teacher -> curate -> train -> evaluate (+ baselines) -> report.

One run directory holds everything: the resolved config (secrets redacted), teacher records, curated data,
students and their checkpoints, evaluation predictions and metrics, the cost ledger and report.md.
Every stage resumes: the teacher skips cached samples, training restarts from its last checkpoint, and a
stage whose inputs and config are unchanged since it finished is not run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fcot.config import Config, redacted
from fcot.curate import CurateConfig
from fcot.errors import FcotError
from fcot.evaluate import EvalConfig
from fcot.io import atomic_write_json, read_json
from fcot.teacher.config import TeachConfig
from fcot.train.config import TrainConfig

STUDENT_METHODS = ("fine_tune_cot", "vanilla")
BASELINES = ("zero_shot", "zero_shot_cot", "few_shot_cot")


class RunConfig(Config):
    name: str = "fcot"
    output_dir: str | None = None  # default runs/{name}
    tasks: list[str]
    data_dir: str | None = None
    ray_address: str | None = None
    methods: list[Literal["fine_tune_cot", "vanilla"]] = ["fine_tune_cot", "vanilla"]  # students trained
    baselines: list[Literal["zero_shot", "zero_shot_cot", "few_shot_cot"]] = ["zero_shot"]  # on the untrained student
    teacher: TeachConfig
    curate: CurateConfig
    train: TrainConfig
    eval: EvalConfig
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # Curation formats each teacher shard as it lands (in the driver, beside the teacher's replicas), so the
    # curation stage is left with selection only. Training starts when the teacher is done: a student's
    # epochs run over the whole curated set.
    stream: bool = True

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _fill_stages(cls, data: Any):
        """Each stage's config gets the run's tasks, folders and student, so a run config stays short."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("name", "fcot")
        run_dir = data.get("output_dir") or f"runs/{name}"
        data["output_dir"] = run_dir
        tasks = data.get("tasks")
        common = {k: data[k] for k in ("data_dir", "ray_address") if data.get(k) is not None}
        train = dict(data.get("train") or {})
        student = train.get("model", TrainConfig.model_fields["model"].default)
        data["teacher"] = {"tasks": tasks, "output_dir": f"{run_dir}/teacher", **common, **(data.get("teacher") or {})}
        data["curate"] = {"tasks": tasks, "teacher_dir": f"{run_dir}/teacher", "student": student,
                          "output_dir": f"{run_dir}/curated", **common, **(data.get("curate") or {})}
        data["train"] = {"data": f"{run_dir}/curated", "output_dir": f"{run_dir}/students", "model": student,
                         **common, **train}
        data["eval"] = {"model": student, "tasks": tasks, "output_dir": f"{run_dir}/eval", **common,
                        **(data.get("eval") or {})}
        return data

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


# Per-method stage configs: each method gets its own folders.

def curate_config(cfg: RunConfig, method: str) -> CurateConfig:
    from fcot.teacher.pipeline import sampling_params

    update = {"method": method, "output_dir": str(cfg.run_dir / "curated" / method)}
    if cfg.curate.teacher_temperature is None and cfg.teacher.engine.kind != "recorded":
        update["teacher_temperature"] = sampling_params(cfg.teacher)["temperature"]  # greedy when D = 1
    return cfg.curate.model_copy(update=update)


def train_config(cfg: RunConfig, method: str) -> TrainConfig:
    dev = cfg.train.dev
    if dev is None and cfg.curate.dev_fraction > 0:
        from fcot.train.config import DevConfig

        dev = DevConfig(path=str(cfg.run_dir / "curated" / method / "dev.jsonl"), format=method)
    wandb = cfg.train.wandb.model_copy(update={"group": cfg.train.wandb.group or cfg.name, "name": f"train-{method}",
                                              "mode": cfg.wandb_mode if cfg.train.wandb.mode == "auto" else cfg.train.wandb.mode})
    return cfg.train.model_copy(update={"data": str(cfg.run_dir / "curated" / method / "train"),
                                        "output_dir": str(cfg.run_dir / "students" / method), "dev": dev, "wandb": wandb})


def eval_config(cfg: RunConfig, method: str) -> EvalConfig:
    """A trained student (fine_tune_cot, vanilla) or a baseline on the untrained student."""
    model = str(cfg.run_dir / "students" / method / "model") if method in STUDENT_METHODS else cfg.eval.model
    return cfg.eval.model_copy(update={"model": model, "method": method, "output_dir": str(cfg.run_dir / "eval" / method)})


def _hash(*configs) -> str:
    blob = json.dumps([c.model_dump() for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Ledger:
    """Stage markers: a stage whose config hash matches a finished marker is skipped (resume)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "stages"

    def done(self, stage: str, config_hash: str) -> dict | None:
        path = self.dir / f"{stage}.json"
        if path.exists():
            marker = read_json(path)
            if marker.get("config_hash") == config_hash:
                return marker
        return None

    def finish(self, stage: str, config_hash: str, result: dict, wall_s: float, cpus: float, gpus: float = 0.0) -> dict:
        marker = {"stage": stage, "config_hash": config_hash, "wall_s": round(wall_s, 2),
                  "cpu_s": round(wall_s * cpus, 1), "gpu_s": round(wall_s * gpus, 1), "result": result,
                  "finished_at": time.time()}
        atomic_write_json(self.dir / f"{stage}.json", marker)
        return marker

    def run(self, stage: str, configs: tuple, fn, cpus: float, gpus: float = 0.0) -> tuple[dict, bool]:
        """(marker, ran): the stage's finished marker, running fn() first unless it is done for these configs."""
        h = _hash(*configs)
        marker = self.done(stage, h)
        if marker:
            return marker, False
        started = time.time()
        result = fn()
        return self.finish(stage, h, result, time.time() - started, cpus, gpus), True


def _wandb_log(cfg: RunConfig, job_type: str, metrics: dict) -> None:
    """One W&B group per run, each stage a job type; offline where no key exists."""
    mode = cfg.wandb_mode
    if mode == "disabled":
        return
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    flat = {}
    for task, m in (metrics.get("tasks") or {}).items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and v is not None:
                flat[f"{task}/{k}"] = v
    run = wandb.init(project="fcot", group=cfg.name, job_type=job_type, name=f"{cfg.name}-{job_type}", mode=mode,
                     dir=str(cfg.run_dir), config=redacted(cfg.model_dump()), reinit="create_new")
    run.log(flat)
    run.finish()


def dry_run(cfg: RunConfig) -> list[str]:
    """Check a run without running it: tasks and their data, models, resources, paths. Returns notes."""
    from fcot.models import ALIASES, models_dir, resolve_model
    from fcot.tasks import get_task, load_split

    notes = []
    for task in cfg.tasks:
        get_task(task)
        try:
            n = len(load_split(task, cfg.teacher.split, cfg.teacher.split_kind, cfg.data_dir))
            notes.append(f"task {task}: {n} {cfg.teacher.split} questions")
        except FcotError as e:
            notes.append(f"task {task}: data not here ({e}); `fcot data download` before running")
    for key, model in (("teacher.engine.model", cfg.teacher.engine.model), ("train.model", cfg.train.model)):
        if key.startswith("teacher") and cfg.teacher.engine.kind in ("openai", "recorded"):
            continue
        if model in ALIASES and not (models_dir() / model / "config.json").exists():
            notes.append(f"{key}: {model} not prepared yet (`fcot models prepare {model}`)")
            continue
        try:
            notes.append(f"{key}: {resolve_model(model)}")
        except FcotError as e:
            raise FcotError(f"key {key!r}: {e}") from None
    if cfg.teacher.engine.kind == "recorded" and not Path(cfg.teacher.engine.path).exists():
        raise FcotError(f"key 'teacher.engine.path': {cfg.teacher.engine.path} does not exist")
    try:
        from fcot.submit import check_resources  # cluster-aware check where available
    except ImportError:
        check_resources = None
    if check_resources is not None and cfg.ray_address:
        check_resources(cfg.model_dump(), cfg.ray_address)
    elif not cfg.ray_address:
        cpus = os.cpu_count() or 1
        e = cfg.teacher.engine
        if e.gpus_per_replica or cfg.train.use_gpu or cfg.eval.gpus_per_replica:
            notes.append("sized for a GPU cluster: resources are checked against the cluster by `fcot submit`")
        elif e.kind in ("hf", "vllm") and e.cpus_per_replica > cpus:
            raise FcotError(f"key 'teacher.engine.cpus_per_replica': {e.cpus_per_replica} > {cpus} CPUs on this machine")
        elif cfg.train.num_workers * cfg.train.cpus_per_worker > cpus:
            raise FcotError(f"key 'train.num_workers': {cfg.train.num_workers} workers x {cfg.train.cpus_per_worker} CPUs "
                            f"> {cpus} CPUs on this machine")
    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(cfg.run_dir.parent, os.W_OK):
        raise FcotError(f"key 'output_dir': {cfg.run_dir.parent} is not writable")
    return notes


def _prepare_models(cfg: RunConfig, log) -> None:
    """Bundled models named by alias are fetched and converted once, before the first stage needs them."""
    from fcot.models import ALIASES, models_dir, prepare

    names = {cfg.train.model, cfg.eval.model}
    if cfg.teacher.engine.kind in ("hf", "vllm") and "fine_tune_cot" in cfg.methods:
        names.add(cfg.teacher.engine.model)
    for name in sorted(n for n in names if n in ALIASES and not (models_dir() / n / "config.json").exists()):
        prepare(name, log=log)


def run(cfg: RunConfig, log=print) -> dict:
    """Run (or resume) every stage; returns the run summary (also run_dir/summary.json)."""
    from fcot.curate import curate
    from fcot.evaluate import evaluate
    from fcot.teacher.pipeline import teach
    from fcot.train.trainer import train

    for note in dry_run(cfg):  # config errors stop here, before any work
        log(note)
    _prepare_models(cfg, log)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", redacted(cfg.model_dump()))
    ledger = Ledger(run_dir)
    stages: dict[str, dict] = {}

    def stage(name: str, configs: tuple, fn, cpus: float, gpus: float = 0.0) -> dict:
        def logged():
            log(f"[{name}] running")
            return fn()

        marker, ran = ledger.run(name, configs, logged, cpus, gpus)
        if ran:
            _wandb_log(cfg, name, marker["result"])
        else:
            log(f"[{name}] done before, skipped")
        stages[name] = marker
        return marker["result"]

    e = cfg.teacher.engine
    if "fine_tune_cot" in cfg.methods:  # vanilla fine-tuning needs no teacher
        streamer = None
        if cfg.stream:
            from fcot.curate import ShardStreamer

            streamer = ShardStreamer(curate_config(cfg, "fine_tune_cot"))
        stage("teacher", (cfg.teacher,), lambda: teach(cfg.teacher, on_shard=streamer), e.replicas * e.cpus_per_replica,
              e.replicas * e.gpus_per_replica)
        if streamer is not None and streamer.formatted:
            log(f"[curate-fine_tune_cot] {streamer.formatted} teacher shards formatted while the teacher ran")
    for method in cfg.methods:
        c = curate_config(cfg, method)
        upstream = (cfg.teacher, c) if method == "fine_tune_cot" else (c,)
        stage(f"curate-{method}", upstream, lambda: curate(c), 1)
        t = train_config(cfg, method)
        gpus = t.num_workers if t.use_gpu else 0
        stage(f"train-{method}", (*upstream, t), lambda: train(t), t.num_workers * t.cpus_per_worker, gpus)
        ev = eval_config(cfg, method)
        stage(f"eval-{method}", (*upstream, t, ev), lambda: evaluate(ev), ev.replicas * ev.cpus_per_replica)
    for baseline in cfg.baselines:
        ev = eval_config(cfg, baseline)
        stage(f"eval-{baseline}", (ev,), lambda: evaluate(ev), ev.replicas * ev.cpus_per_replica)

    summary = {"name": cfg.name, "run_dir": str(run_dir), "stages": stages}
    atomic_write_json(run_dir / "summary.json", summary)
    from fcot.report import build_report

    build_report(run_dir)
    return summary
