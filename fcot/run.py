"""`fcot run`: the whole method as one Ray job — teacher -> curate -> train -> evaluate (+ baselines) -> report.

`stages(cfg)` is the one definition of the chain: each `Stage` names its config inputs (hashed into its marker),
its function and what it asks of the cluster. `fcot run`, sweep trials, `--dry-run`, `fcot submit`'s resource
check and the report all read it, so a new stage is one entry here plus its own module.

One run directory (fcot.layout.RunLayout) holds everything: the resolved config (secrets redacted), teacher
records, curated data, students and their checkpoints, evaluation predictions and metrics, the cost ledger and
report.md. Every stage resumes: the teacher skips cached samples, training restarts from its last checkpoint,
and a stage whose inputs and config are unchanged since it finished is not run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, Field, model_validator

from fcot.bundled import prepare_missing
from fcot.config import Config, PathStr, RayAddress, WandbMode, redacted, results_view, wandb_mode
from fcot.contracts.teacher import TeachConfig, teacher_tokenizer
from fcot.curate import CurateConfig, ShardStreamer, check_labels, curate, split_questions
from fcot.engines import EngineConfig
from fcot.errors import FcotError, user_error
from fcot.evaluate import EvalConfig, evaluate
from fcot.evaluate import questions as eval_questions
from fcot.io import atomic_write_json, read_json
from fcot.layout import RunLayout
from fcot.methods import METHODS, get_method, method_names
from fcot.models import ALIASES, models_dir, resolve_model, tokenizer_identity
from fcot.prices import Prices
from fcot.prompts import templates_sha256
from fcot.ray_utils import accelerator_types, cpu_seconds
from fcot.report import build_report
from fcot.resources import Demand, check_local, check_resources, largest
from fcot.rollout import RolloutConfig, rollout
from fcot.tasks import DataDir, TaskNames, UserTask, load_split, split_user_tasks
from fcot.teacher.pipeline import teach
from fcot.train.config import DevConfig, ObjectiveConfig, TrainConfig
from fcot.train.trainer import train


class OnPolicyConfig(Config):
    """The on_policy method (fcot.methods): from the student of the method `start`, `rounds` times: the student
    samples `samples_per_question` rationales of each training question at `temperature` (fcot.rollout, on the
    evaluation engine), the teacher grades every rationale token (`teacher`: by default the run's teacher engine,
    hf or vllm; its tokenizer must be the student's), and the student trains on them (train's settings, with this
    `lr` and `epochs` per round; objective on_policy: `divergence`, `beta`, the teacher's `top_k` for jsd)."""

    start: str = "fine_tune_cot"  # a method of `methods` before on_policy
    rounds: int = Field(1, ge=1)
    samples_per_question: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(128, ge=1)
    divergence: Literal["reverse_kl", "jsd"] = "reverse_kl"
    beta: float = Field(0.5, ge=0, le=1)
    top_k: int = Field(0, ge=0)
    teacher: EngineConfig | None = None
    lr: float | None = Field(None, gt=0)  # default: train.lr
    epochs: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _top_k(self):
        if self.divergence == "jsd" and not self.top_k:
            raise ValueError("divergence jsd learns the teacher's top-k: set on_policy.top_k (e.g. 20)")
        return self


class RunConfig(Config):
    name: str = "fcot"
    output_dir: PathStr  # default runs/{name}
    tasks: TaskNames
    user_tasks: list[UserTask] = []
    data_dir: DataDir = Field(None, validate_default=True)
    ray_address: RayAddress = None
    methods: Annotated[list[str], AfterValidator(method_names)] = ["fine_tune_cot", "vanilla"]  # fcot.methods
    # The report's first line: the primary method against the reference method (default: the first method, and
    # vanilla if trained, else the last); its tables compare every pair of methods.
    primary_method: str | None = None
    reference_method: str | None = None
    baselines: list[Literal["zero_shot", "zero_shot_cot", "few_shot_cot"]] = ["zero_shot"]  # on the untrained student
    teacher: TeachConfig
    # More teachers, run into the same store and reported beside `teacher` (the students learn from `teacher`
    # only): what another model would give you, at the cost of its own stage.
    extra_teachers: dict[str, TeachConfig] = {}
    curate: CurateConfig
    train: TrainConfig
    eval: EvalConfig
    wandb_mode: WandbMode = "auto"
    prices: Prices = Prices()  # what CPU- and GPU-hours and API tokens cost: the report and sweeps show money
    on_policy: OnPolicyConfig = OnPolicyConfig()  # the on_policy method's rounds (when in `methods`)
    # Curation formats each teacher shard as it lands (in the driver, beside the teacher's replicas), so the
    # curation stage is left with selection only. Training starts when the teacher is done: a student's
    # epochs run over the whole curated set.
    stream: bool = True

    @model_validator(mode="before")
    @classmethod
    def _fill_stages(cls, data: Any):
        """Each stage's config gets the run's tasks, folders and student, so a run config stays short."""
        if not isinstance(data, dict):
            return data
        data = split_user_tasks(cls, dict(data))
        run_dir = data.get("output_dir") or f"runs/{data.get('name', 'fcot')}"
        data["output_dir"] = run_dir
        layout = RunLayout(Path(run_dir))
        common = {k: data[k] for k in ("tasks", "user_tasks", "data_dir", "ray_address") if data.get(k) is not None}
        methods = data.get("methods") or cls.model_fields["methods"].default
        data["primary_method"] = data.get("primary_method") or methods[0]
        others = [m for m in methods if m != data["primary_method"]]
        ref = METHODS[data["primary_method"]].reference if data["primary_method"] in METHODS else None
        data["reference_method"] = data.get("reference_method") or (
            ref if ref in others else others[-1] if others else data["primary_method"])
        train = dict(data.get("train") or {})
        student = train.get("model", TrainConfig.model_fields["model"].default)
        curate = data.get("curate") or {}
        curated_max = (curate.max_length if isinstance(curate, CurateConfig) else
                       curate.get("max_length", CurateConfig.model_fields["max_length"].default))
        if train.get("max_length") is not None and train["max_length"] != curated_max:
            raise FcotError(f"key 'train.max_length' ({train['max_length']}) differs from 'curate.max_length' "
                            f"({curated_max}): training follows curation's limit; set curate.max_length only")
        train["max_length"] = curated_max  # one length rule: curation keeps what training reads whole
        teacher = {"output_dir": str(layout.teacher), **common, **(data.get("teacher") or {})}
        data["teacher"] = teacher
        data["extra_teachers"] = {name: {"output_dir": str(layout.teacher), **common, **(t or {})}
                                  for name, t in (data.get("extra_teachers") or {}).items()}
        chat = {"chat_template": train["chat_template"]} if "chat_template" in train else {}  # one prompting
        data["curate"] = {"teacher": teacher, "student": student, "output_dir": str(layout.root / "curated"),
                          **common, **chat, **(data.get("curate") or {})}
        data["train"] = {"data": str(layout.root / "curated"), "output_dir": str(layout.root / "students"),
                         "model": student, **{k: v for k, v in common.items() if k in ("user_tasks", "ray_address")},
                         **train}
        ev = dict(data.get("eval") or {})
        ev["engine"] = {"model": student, **(ev.get("engine") or {})}
        data["eval"] = {"output_dir": str(layout.root / "eval"), **common, **chat, **ev}
        return data

    @model_validator(mode="after")
    def _compared(self):
        for key in ("primary_method", "reference_method"):
            if getattr(self, key) not in self.methods:
                raise ValueError(f"{key} {getattr(self, key)!r} is not one of methods ({', '.join(self.methods)})")
        return self

    @model_validator(mode="after")
    def _kd_teacher(self):
        """A KD student learns the teacher's logprobs, token ids of the teacher's tokenizer: they must be stored,
        and mean the same tokens to the student."""
        if self.train.objective.kind != "kd":
            return self
        if not self.teacher.sampling.logprobs:
            raise FcotError("key 'train.objective': kd learns from the teacher's top-k logprobs; set "
                            "teacher.sampling.logprobs (e.g. 20)")
        teacher = teacher_tokenizer(self.teacher)
        if tokenizer_identity(self.train.model) != tokenizer_identity(teacher):
            raise FcotError(f"key 'train.objective': kd needs the student's tokenizer to be the teacher's; the student "
                            f"{self.train.model} and the teacher {teacher} tokenize differently")
        return self

    @model_validator(mode="after")
    def _on_policy(self):
        """An on-policy method starts from a student trained before it, and its grader shares the student's
        tokenizer (the grades are of the student's token ids)."""
        if self.train.objective.kind == "on_policy":
            raise FcotError("key 'train.objective': on_policy is the method on_policy (add it to methods; its keys "
                            "are under on_policy)")
        learners = [m for m in self.methods if get_method(m).on_policy]
        if not learners:
            return self
        start = self.on_policy.start
        if start not in self.methods or self.methods.index(start) > self.methods.index(learners[0]) or \
                get_method(start).on_policy:
            raise FcotError(f"key 'on_policy.start': {start!r} is not a method trained before {learners[0]} "
                            f"(methods: {', '.join(self.methods)})")
        grader = self.grader
        if grader.kind not in ("hf", "vllm"):
            raise FcotError(f"key 'on_policy.teacher': the run's teacher ({grader.kind}) cannot grade tokens; set "
                            "on_policy.teacher to an hf or vllm engine of a model with the student's tokenizer")
        if tokenizer_identity(self.train.model) != tokenizer_identity(grader.model):
            raise FcotError(f"key 'on_policy.teacher': the student {self.train.model} and the teacher "
                            f"{grader.model} tokenize differently; on-policy grades the student's own tokens")
        return self

    @property
    def grader(self) -> EngineConfig:
        """The engine that grades an on-policy student's tokens."""
        return self.on_policy.teacher or self.teacher.engine

    @property
    def uses_teacher(self) -> bool:
        """Some method learns from the teacher's rationales (vanilla fine-tuning alone asks it nothing)."""
        return any(get_method(m).uses_rationales for m in self.methods)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.output_dir))

    def demands(self, prefix: str = "") -> list[Demand]:
        """What the run's stages ask of the cluster (each on its own: stages run one after another)."""
        return [d for s in stages(self) for d in s.demands]


# Per-method stage configs: each method gets its own folders.

def curate_config(cfg: RunConfig, method: str) -> CurateConfig:
    kd = cfg.train.objective.kind == "kd" and get_method(method).uses_rationales  # its students learn the top-k
    return cfg.curate.model_copy(update={"method": method, "output_dir": str(cfg.layout.curated(method)),
                                         "teacher_logprobs": kd})


def train_config(cfg: RunConfig, method: str) -> TrainConfig:
    """The student of `method`: trained on its curated pairs, selected on its curated dev split."""
    curated = cfg.layout.curated(method)
    dev = cfg.train.dev or DevConfig(path=str(curated / "dev.jsonl"), format=method)
    w = cfg.train.wandb
    wandb = w.model_copy(update={"group": w.group or cfg.name, "name": f"train-{method}",
                                 "mode": cfg.wandb_mode if w.mode == "auto" else w.mode})
    # KD: the students of rationales learn the teacher's distribution over them; vanilla fine-tuning has none.
    objective = cfg.train.objective if get_method(method).uses_rationales else ObjectiveConfig()
    return cfg.train.model_copy(update={
        "data": str(curated / "train"), "output_dir": str(cfg.layout.student(method)), "dev": dev, "wandb": wandb,
        "report_to_tune": cfg.train.report_to_tune and method == cfg.primary_method, "objective": objective})


def student_model(cfg: RunConfig, method: str) -> Path:
    """Where a method's trained student is (an on-policy method's: its last round's)."""
    if get_method(method).on_policy:
        return cfg.layout.round_student(method, cfg.on_policy.rounds) / "model"
    return cfg.layout.model(method)


def final_train(cfg: RunConfig, method: str) -> str:
    """The stage that trains a method's student (an on-policy method's: its last round)."""
    return f"train-{method}-{cfg.on_policy.rounds}" if get_method(method).on_policy else f"train-{method}"


def rollout_config(cfg: RunConfig, method: str, round_: int) -> RolloutConfig:
    """Round `round_`'s samples of the student from the round before (round 1: on_policy.start's student)."""
    op = cfg.on_policy
    student = student_model(cfg, op.start) if round_ == 1 else cfg.layout.round_student(method, round_ - 1) / "model"
    return RolloutConfig(
        questions=str(cfg.layout.curated(method) / "train_questions.jsonl"), method=method,
        student=cfg.eval.engine.model_copy(update={"model": str(student)}), teacher=cfg.grader,
        tasks=cfg.tasks, user_tasks=cfg.user_tasks, round=round_, samples_per_question=op.samples_per_question,
        temperature=op.temperature, max_new_tokens=op.max_new_tokens, top_k=op.top_k,
        max_length=cfg.curate.max_length, seed=cfg.train.seed, output_dir=str(cfg.layout.rollout(method, round_)),
        ray_address=cfg.ray_address)


def round_train_config(cfg: RunConfig, method: str, round_: int, ro: RolloutConfig) -> TrainConfig:
    """Round `round_`'s training: the round's student on its graded samples, selected on the method's dev split."""
    op, base = cfg.on_policy, train_config(cfg, method)
    return base.model_copy(update={
        "model": ro.student.model, "data": str(Path(ro.output_dir) / "train"),
        "output_dir": str(cfg.layout.round_student(method, round_)), "lr": op.lr or cfg.train.lr, "epochs": op.epochs,
        "objective": ObjectiveConfig(kind="on_policy", divergence=op.divergence, beta=op.beta),
        "wandb": base.wandb.model_copy(update={"name": f"train-{method}-{round_}"}), "report_to_tune": False})


def eval_config(cfg: RunConfig, method: str) -> EvalConfig:
    """A trained student (a method of cfg.methods) or a baseline on the untrained student."""
    update: dict = {"method": method, "output_dir": str(cfg.layout.eval(method))}
    if method in cfg.methods:
        update["engine"] = cfg.eval.engine.model_copy(update={"model": str(student_model(cfg, method))})
        update["curated"] = str(cfg.layout.curated(method) / "stats.json")
    return cfg.eval.model_copy(update=update)


@dataclass(frozen=True)
class Stage:
    """One step of the chain: `inputs` (configs) decide whether its marker is still valid, `fn` runs it."""

    name: str
    inputs: tuple
    fn: Callable[[], dict]
    demands: list[Demand]


def stages(cfg: RunConfig, log=print) -> list[Stage]:
    """The chain of `cfg`, in order: teacher (for the methods that learn from rationales), then curate -> train ->
    eval per student method, then the baselines on the untrained student."""
    out = []
    if cfg.uses_teacher:  # vanilla fine-tuning needs no teacher
        def run_teacher():
            streamers = [ShardStreamer(curate_config(cfg, m)) for m in cfg.methods
                         if get_method(m).uses_rationales] if cfg.stream else []

            def on_shard(shard):
                for streamer in streamers:
                    streamer(shard)

            summary = teach(cfg.teacher, on_shard=on_shard if streamers else None)
            for m, streamer in zip([m for m in cfg.methods if get_method(m).uses_rationales], streamers):
                if streamer.formatted:
                    log(f"[curate-{m}] {streamer.formatted} teacher shards formatted while the teacher ran")
            return summary

        out.append(Stage("teacher", (cfg.teacher,), run_teacher, cfg.teacher.demands("teacher.")))
    for name, t in cfg.extra_teachers.items():
        out.append(Stage(f"teacher-{name}", (t,), lambda t=t: teach(t), t.demands(f"extra_teachers.{name}.")))
    trained: dict[str, tuple] = {}  # method -> the inputs of its student
    for method in cfg.methods:
        c, t, ev = curate_config(cfg, method), train_config(cfg, method), eval_config(cfg, method)
        out.append(Stage(f"curate-{method}", (c,), lambda c=c: curate(c), c.demands("curate.")))
        if get_method(method).on_policy:  # rounds from the start method's student: rollout, then training
            t = trained[cfg.on_policy.start] + (c,)
            for r in range(1, cfg.on_policy.rounds + 1):
                ro = rollout_config(cfg, method, r)
                rt = round_train_config(cfg, method, r, ro)
                grader = "on_policy.teacher." if cfg.on_policy.teacher else "teacher.engine."
                out += [Stage(f"rollout-{method}-{r}", t + (ro,), lambda ro=ro: rollout(ro),
                              ro.demands("eval.engine.", grader)),
                        Stage(f"train-{method}-{r}", t + (ro, rt), lambda rt=rt: train(rt), rt.demands("train."))]
                t += (ro, rt)
            trained[method] = t
        else:
            out.append(Stage(f"train-{method}", (c, t), lambda t=t: train(t), t.demands("train.")))
            trained[method] = (c, t)
        out.append(Stage(f"eval-{method}", (*trained[method], ev), lambda ev=ev: evaluate(ev), ev.demands("eval.")))
    for baseline in cfg.baselines:
        ev = eval_config(cfg, baseline)
        out.append(Stage(f"eval-{baseline}", (ev,), lambda ev=ev: evaluate(ev), ev.demands("eval.")))
    return out


def config_hash(*configs) -> str:
    """The hash of what decides a stage's results (fcot.config.results_view) and of the prompt templates."""
    blob = json.dumps([templates_sha256(), *[results_view(c) for c in configs]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Ledger:
    """Stage markers: a stage whose config hash matches a finished marker is skipped (resume). A marker keeps
    the stage's result and its measured cost: wall time, CPU-seconds of every process that worked for it (the
    driver, Ray actors, training workers) and GPU-seconds of the GPUs it held."""

    def __init__(self, layout: RunLayout):
        self.layout = layout

    def done(self, stage: str, h: str) -> dict | None:
        path = self.layout.marker(stage)
        if path.exists():
            marker = read_json(path)
            if marker.get("config_hash") == h:
                return marker
        return None

    def run(self, stage: Stage, log=print) -> tuple[dict, bool]:
        """(marker, ran): the stage's finished marker, running it first unless it is done for these inputs."""
        h = config_hash(*stage.inputs)
        marker = self.done(stage.name, h)
        if marker:
            return marker, False
        log(f"[{stage.name}] running")
        started, cpu_started = time.time(), cpu_seconds(children=False)
        result = stage.fn()
        marker = {"stage": stage.name, "config_hash": h, "wall_s": round(time.time() - started, 2),
                  # measured by the stage's own processes where it reports them, else the driver's own time
                  "cpu_s": round(result.get("cpu_s", cpu_seconds(children=False) - cpu_started), 1),
                  "gpu_s": round(result.get("gpu_s", 0.0), 1),
                  "reserved": {r: largest(stage.demands, r) for r in ("CPU", "GPU")},
                  "result": result, "finished_at": time.time()}
        if marker["gpu_s"]:  # what its GPUs were, for prices by type (fcot.prices)
            marker["accelerators"] = accelerator_types()
        atomic_write_json(self.layout.marker(stage.name), marker)
        return marker, True


def _wandb_log(cfg: RunConfig, job_type: str, metrics: dict) -> None:
    """One W&B group per run, each stage a job type; offline where no key exists."""
    mode = wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return
    import wandb  # heavy: only when logging

    flat = {}
    for task, m in (metrics.get("tasks") or {}).items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and v is not None:
                flat[f"{task}/{k}"] = v
    run = wandb.init(project="fcot", group=cfg.name, job_type=job_type, name=f"{cfg.name}-{job_type}", mode=mode,
                     dir=cfg.output_dir, config=redacted(cfg.model_dump()), reinit="create_new",
                     # metrics only: no history tables on the console, no copy of the driver's console in the run
                     settings=wandb.Settings(silent=True, console="off"))
    run.log(flat)
    run.finish()


def dry_run(cfg: RunConfig) -> list[str]:
    """Check a run without running it: tasks and their data, models, resources, paths. Returns notes."""
    notes = []
    t = cfg.teacher
    for task in cfg.tasks:  # reads each task's records: a bad record stops the run here, naming file and key
        try:
            n = len(load_split(task, t.split, t.split_kind, cfg.data_dir))
            notes.append(f"task {task}: {n} {t.split} questions")
        except FcotError as e:
            if "fcot data download" not in str(e):
                raise
            notes.append(f"task {task}: data not here ({e}); `fcot data download` before running")
    try:  # a question without gold where gold is needed (a user task's record) stops the run here, named
        for method in cfg.methods:
            c = curate_config(cfg, method)
            check_labels(c, *split_questions(c)[::2])
        eval_questions(cfg.eval)
    except FcotError as e:
        if "fcot data download" not in str(e):
            raise
    for key, model in (("teacher.engine.model", cfg.teacher.engine.model), ("train.model", cfg.train.model)):
        if key.startswith("teacher") and (cfg.teacher.engine.kind in ("openai", "recorded") or not cfg.uses_teacher):
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
    demands = cfg.demands()
    if cfg.ray_address:
        notes += check_resources(demands, cfg.ray_address)
    else:
        if any(d.unit.get("GPU", 0) > 0 for d in demands):
            notes.append("sized for a GPU cluster: resources are checked against the cluster by `fcot submit`")
        check_local(demands, os.cpu_count() or 1)
    parent = Path(cfg.output_dir).parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise FcotError(f"key 'output_dir': {parent} is not writable")
    return notes


def _prepare_models(cfg: RunConfig, log) -> None:
    """Bundled models named by alias are fetched and converted once, before the first stage needs them."""
    names = {cfg.train.model, cfg.eval.engine.model}
    if cfg.teacher.engine.kind in ("hf", "vllm") and cfg.uses_teacher:
        names.add(cfg.teacher.engine.model)
    names |= {t.engine.model for t in cfg.extra_teachers.values() if t.engine.kind in ("hf", "vllm")}
    if any(get_method(m).on_policy for m in cfg.methods):
        names.add(cfg.grader.model)
    prepare_missing(names, log=log)


def run_stages(cfg: RunConfig, log=print, on_stage=None) -> dict[str, dict]:
    """Run (or skip, where done) every stage of `cfg` in order; returns the markers by stage name. A stage that
    fails stops the run with what it finished kept: running the same command again resumes."""
    ledger = Ledger(cfg.layout)
    markers: dict[str, dict] = {}
    for stage in stages(cfg, log):
        try:
            marker, ran = ledger.run(stage, log)
        except Exception as e:
            done = ", ".join(markers) or "none"
            found = user_error(e)
            why = str(found) if found is not None else f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            raise FcotError(f"stage {stage.name} failed: {why} (finished stages kept in {cfg.layout.stages}: {done}; "
                            f"run the same command again to resume)") from (None if found is not None else e)
        if not ran:
            log(f"[{stage.name}] done before, skipped")
        elif on_stage is not None:
            on_stage(stage.name, marker)
        markers[stage.name] = marker
    return markers


def run(cfg: RunConfig, log=print, checked: bool = False) -> dict:
    """Run (or resume) every stage; returns the run summary (also RUN_DIR/summary.json) and writes report.md.
    `checked`: the caller ran `dry_run(cfg)` already (and showed its notes)."""
    for note in [] if checked else dry_run(cfg):  # config errors stop here, before any work
        log(note)
    _prepare_models(cfg, log)
    layout = cfg.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.config, redacted(cfg.model_dump()))
    markers = run_stages(cfg, log, on_stage=lambda name, marker: _wandb_log(cfg, name, marker["result"]))
    summary = {"name": cfg.name, "run_dir": cfg.output_dir, "order": list(markers), "stages": markers}
    atomic_write_json(layout.summary, summary)
    build_report(layout.root)
    return summary
