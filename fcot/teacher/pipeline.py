"""The teacher stage on Ray: plan samples, skip cached ones, generate the rest on a pool of engine replicas.

    driver: questions -> the samples each still needs (a fixed D, or adaptive rounds) minus those in the store
      -> batches to a pool of Ray actors, each an engine replica (hf, vLLM, or an OpenAI-compatible server),
         two batches in flight per replica so none waits between batches; a replica that dies (its node lost)
         is replaced and its batch rerun on the replicas that are up: a replacement takes work once it is placed
         and has loaded its model, so when the cluster has no room for it the survivors finish the stage
      -> each replica writes its batch as one parquet shard, atomically, before returning its records
      -> as batches land: a question's next adaptive round is queued once its round is in (other questions keep
         the replicas busy meanwhile), `on_shard` gets each new shard (`fcot run` formats it for curation)
      -> summary per task from the store.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from fcot.contracts.records import RecordStore, record
from fcot.contracts.teacher import (
    TeachConfig,
    model_name,
    questions,
    rationale_digest,
    samples_used,
    sampling_params,
    teacher_id,
    teacher_identity,
)
from fcot.engines import Request, replica_options, start_replica
from fcot.errors import FcotError
from fcot.io import atomic_write_json
from fcot.progress import Progress
from fcot.prompts import FEW_SHOT_ANSWER_PREFIX, zero_shot_cot_step2, zero_shot_cot_step2_messages
from fcot.ray_utils import Usage, cpu_seconds, init_ray
from fcot.scoring import format_prediction, score
from fcot.tasks import get_task
from fcot.teacher.plan import item, prompt_repr, step1_prompt
from fcot.teacher.recorded import import_recorded

IN_FLIGHT = 2  # batches queued at each replica: the next one starts the moment the last one ends
PLACEMENT_TIMEOUT_S = 600  # how long a run with every replica lost waits for a replacement to be placed
LANDED = ["task", "index", "sample_index", "correct", "rationale", "completion_tokens", "answer_completion_tokens"]
SUMMED = ["task", "index", "sample_index", "correct", "temperature", "prompt_tokens", "answer_prompt_tokens",
          "completion_tokens", "answer_completion_tokens"]  # the summary's columns (adaptive: and the rationale)


def generate_records(cfg: TeachConfig, engine, items: list[dict], teacher: tuple[str, str]) -> list[dict]:
    """Both zero-shot-CoT steps for a batch of work items; returns finished records of `teacher` (its id and
    identity as JSON, computed once by the driver)."""
    s = cfg.sampling
    params = sampling_params(cfg)  # the values the teacher's identity states
    temperature, top_p = params["temperature"], params["top_p"]
    step1 = []
    for it in items:
        prompt, messages = step1_prompt(cfg, it["task"], it["question"])
        step1.append(Request(prompt=prompt, messages=messages, max_new_tokens=s.max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=int(it["seed"]), logprobs=s.logprobs,
                             stop=tuple(s.stop) or (("\nQ:",) if cfg.prompt == "few_shot_cot" else ())))
    first = engine.generate(step1)
    if cfg.prompt == "few_shot_cot":  # the answer is in the completion, after "The answer is"
        second = [None] * len(items)
    else:
        n = s.answer_max_new_tokens
        second = engine.generate([
            Request(prompt=zero_shot_cot_step2(req.prompt, out.text), max_new_tokens=n) if req.messages is None
            else Request(messages=zero_shot_cot_step2_messages(req.messages, out.text), max_new_tokens=n)
            for req, out in zip(step1, first)])
    now = time.time()
    tid, identity = teacher
    records = []
    for it, out, ans in zip(items, first, second):
        spec = get_task(it["task"])
        if ans is None:
            result = score(spec, out.text, it["gold"], prefix=FEW_SHOT_ANSWER_PREFIX)
        else:
            result = score(spec, ans.text, it["gold"], prefix=None)  # the paper: first candidate of step 2
        answer = {"answer_text": ans.text, "answer_prompt_tokens": ans.prompt_tokens,
                  "answer_completion_tokens": ans.completion_tokens} if ans else {}
        records.append(record(
            task=it["task"], index=int(it["index"]), sample_index=int(it["sample_index"]), key=it["key"],
            teacher_id=tid, teacher=identity, question=it["question"], gold=it["gold"], prompt=it["prompt"],
            rationale=out.text, prediction=format_prediction(result.prediction), correct=result.correct,
            finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            engine=cfg.engine.kind, model=model_name(cfg), prompt_style=cfg.prompt_style, temperature=temperature,
            top_p=top_p, max_new_tokens=s.max_new_tokens, seed=int(it["seed"]), created_at=now,
            logprobs=out.logprobs, **answer))
    return records


class TeacherWorker:
    """One engine replica (a Ray actor): generates a batch, writes it as a shard, returns what the driver needs."""

    def __init__(self, cfg: dict, records_dir: str, teacher: tuple[str, str]):
        self.cfg = TeachConfig.model_validate(cfg)  # registers the config's user tasks in this worker
        self.usage = Usage()
        self.teacher = teacher
        self.store = RecordStore(records_dir)
        self.engine = start_replica(self.cfg.engine, self.cfg.output_dir)

    def run(self, items: list[dict]) -> dict:
        shard = self.store.shard_path(self.teacher[0], [it["key"] for it in items])
        if shard.exists():  # this batch finished before (a retried task)
            records, generated = self.store.read(shards=[shard], columns=LANDED).to_pylist(), 0
        else:
            records, generated = generate_records(self.cfg, self.engine, items, self.teacher), len(items)
            self.store.write(records)
        landed = [{"task": r["task"], "index": r["index"], "sample_index": r["sample_index"],
                   "tokens": r["completion_tokens"] + r["answer_completion_tokens"],
                   "rule": stopping_fields(r, self.cfg.sampling.adaptive)} for r in records]
        return {"shard": str(shard), "generated": generated, "records": landed, **self.usage.take()}


def stopping_fields(record: dict, adaptive) -> dict | None:
    """What the driver keeps of a sample: the adaptive stopping rule's fields (fcot.teacher.plan.samples_used; the
    rationale as its digest), nothing for a fixed D, so the driver's memory stays small at a million samples."""
    if adaptive is None:
        return None
    return {"correct": record["correct"], "rationale": rationale_digest(record["rationale"])}


def teach(cfg: TeachConfig, on_shard=None) -> dict:
    """Run the teacher stage; returns the summary (also written to OUTPUT_DIR/summary.json).

    on_shard(path), if given, is called in this process with each new shard as soon as it is written
    (`fcot run` formats it for curation while the teacher goes on)."""
    out_dir = Path(cfg.output_dir)
    store = RecordStore(out_dir / "records")
    started, cpu_started = time.time(), cpu_seconds(children=False)
    qs = questions(cfg)
    tid = teacher_id(cfg)
    cost = {"generated": 0, "cpu_s": 0.0, "gpu_s": 0.0}
    if cfg.engine.kind == "recorded":
        import_recorded(cfg, store, qs)
    else:
        columns = ["task", "index", "sample_index", "correct"] + (["rationale"] if cfg.sampling.adaptive else [])
        cost = _run_pool(cfg, qs, store.read(teacher_id=tid, columns=columns), store, on_shard)
    cost["cpu_s"] += cpu_seconds(children=False) - cpu_started
    summary = summarize(cfg, store, qs, time.time() - started, cost)
    atomic_write_json(out_dir / "summary.json", summary)  # the last run; each teacher's own in teachers/
    atomic_write_json(out_dir / "teachers" / f"{tid}.json", summary)
    return summary


class _Schedule:
    """What the questions still need, as the driver keeps it: the samples in the store (`known`, with their
    stopping-rule fields), those sent to a replica (`flying`), and the queue of those not sent yet."""

    def __init__(self, cfg: TeachConfig, qs: list, have: pa.Table):
        self.cfg, self.tid = cfg, teacher_id(cfg)
        self.known: dict[tuple, dict[int, dict | None]] = defaultdict(dict)  # samples in the store, by question
        for r in have.to_pylist():
            self.known[(r["task"], r["index"])][r["sample_index"]] = stopping_fields(r, cfg.sampling.adaptive)
        self.by_q = {(q.task, q.index): q for q in qs}
        self.prompts = {key: prompt_repr(cfg, q) for key, q in self.by_q.items()}
        self.flying: dict[tuple, set[int]] = defaultdict(set)
        self.queue: deque = deque()  # (question, sample index): a work item is made when its batch is sent
        self.total = sum(self.schedule(key) for key in self.by_q)

    def schedule(self, key) -> int:
        """Queue the samples question `key` needs now (its current round's missing ones); returns how many."""
        s = self.cfg.sampling
        want = samples_used(self.known[key], s.adaptive, s.budget)
        todo = [k for k in range(want) if k not in self.known[key] and k not in self.flying[key]]
        self.flying[key].update(todo)
        self.queue.extend((key, k) for k in todo)
        return len(todo)

    def batch(self, size: int) -> list[dict]:
        """The next `size` queued samples (all that are queued, where fewer) as work items."""
        return [item(self.cfg, self.tid, self.by_q[key], k, self.prompts[key])
                for key, k in (self.queue.popleft() for _ in range(min(size, len(self.queue))))]

    def land(self, records: list[dict]) -> int:
        """Note a batch's records as known; a question whose round is all in gets its next adaptive round queued
        (none for a fixed D). Returns how many samples that queued."""
        landed = set()
        for r in records:
            key = (r["task"], r["index"])
            self.known[key][r["sample_index"]] = r["rule"]
            self.flying[key].discard(r["sample_index"])
            landed.add(key)
        return sum(self.schedule(key) for key in landed if not self.flying[key])


class _Pool:
    """The engine replicas, one Ray actor per slot: a replica joins once placed and ready (its model loaded), and
    the slots that are up take batches, IN_FLIGHT at most each; a lost replica's slot gets a fresh actor, which
    joins the same way, and its batches are sent again. (A batch never waits on a replica that is not up: one lost
    while loading, with no room to restart it, would hold its batches forever while the others sit idle.)"""

    def __init__(self, cfg: TeachConfig, store: RecordStore, tid: str):
        import ray  # heavy: only when there is something to generate

        self.ray = ray
        init_ray(cfg.ray_address)
        self.e = e = cfg.engine
        self.replica = ray.remote(TeacherWorker).options(**replica_options(e))
        # The model resolved and the dtype chosen here (a user error stops the driver, not a replica), the teacher's
        # identity computed once: replicas run elsewhere (another directory, another node's environment).
        self.resolved = cfg.model_copy(update={"engine": e.resolved()})
        self.teacher = (tid, json.dumps(teacher_identity(cfg), sort_keys=True))
        self.store = store
        self.actors = [self.start() for _ in range(e.replicas)]
        self.up: set[int] = set()  # the slots that take batches
        self.placing = {actor.__ray_ready__.remote(): (a, actor) for a, actor in enumerate(self.actors)}
        self.replaced, self.retry, self.alone_since = 0, deque(), None
        self.load = [0] * len(self.actors)
        self.inflight: dict = {}  # a batch's result -> (slot, actor, batch)

    def start(self):
        """A fresh replica (Ray places it when the cluster has room)."""
        return self.replica.remote(self.resolved.model_dump(), str(self.store.root.resolve()), self.teacher)

    def send(self, schedule: _Schedule) -> None:
        """Hand batches to the slots that are up, least loaded first, until each has IN_FLIGHT."""
        for a in sorted(self.up, key=self.load.__getitem__):
            # A lost batch again as it was (its shard name is its keys), else a full batch, or whatever is
            # queued when the replica has nothing else to do.
            while self.load[a] < IN_FLIGHT and (self.retry or schedule.queue and (
                    len(schedule.queue) >= self.e.batch_size or self.load[a] == 0)):
                batch = self.retry.popleft() if self.retry else schedule.batch(self.e.batch_size)
                self.inflight[self.actors[a].run.remote(batch)] = (a, self.actors[a], batch)
                self.load[a] += 1

    def check_placement(self) -> None:
        """Stop the run (FcotError) once no replica has been up for PLACEMENT_TIMEOUT_S after one was lost (the
        first replicas take what they take: a large model loads for long)."""
        # With no replica up, the replacements have a bounded time to be placed: an autoscaler out of capacity
        # or a drained spot pool must stop the run with a message, not leave it waiting.
        self.alone_since = (self.alone_since or time.time()) if not self.up and self.replaced else None
        if self.alone_since and time.time() - self.alone_since > PLACEMENT_TIMEOUT_S:
            e = self.e
            raise FcotError(f"no teacher replica could be placed for {PLACEMENT_TIMEOUT_S} s after its node "
                            f"was lost: the cluster has no room for engine.cpus_per_replica="
                            f"{e.cpus_per_replica}, engine.gpus_per_replica={e.gpus_per_replica}; samples "
                            "written so far are kept, and the same command resumes")

    def wait(self) -> list:
        """What is ready of the batches in flight and the replacements being placed: one at most, within 10 s."""
        ready, _ = self.ray.wait([*self.inflight, *self.placing], num_returns=1, timeout=10.0)
        return ready

    def placed(self, ref) -> None:
        """A replica is ready: its slot is up (or, lost before, it is replaced)."""
        a, actor = self.placing.pop(ref)
        try:
            self.ray.get(ref)
            self.up.add(a)
        except self.ray.exceptions.RayActorError:
            self.replace(a, actor)

    def result(self, ref) -> dict | None:
        """A batch's result, or None where its replica was lost (the batch waits in `retry`)."""
        a, actor, batch = self.inflight.pop(ref)
        self.load[a] -= 1
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            # Its node was lost (or its process, past Ray's restarts): the batch is sent again, whole, to
            # the replicas that are up, and a fresh replica takes the slot when the cluster has room.
            self.retry.append(batch)
            self.replace(a, actor)
            return None

    def replace(self, a: int, actor) -> None:
        """Slot `a`'s lost `actor` gives way to a fresh one, which takes batches once placed; more losses than 3 per
        slot, all slots together, stop the run."""
        if self.actors[a] is not actor:  # replaced already (another of its batches failed first)
            return
        self.replaced += 1
        if self.replaced > 3 * len(self.actors):
            raise RuntimeError(f"teacher replicas died {self.replaced} times; see the Ray logs (engine: {self.e.kind})")
        self.ray.kill(actor, no_restart=True)
        self.up.discard(a)
        self.actors[a] = self.start()
        self.placing[self.actors[a].__ray_ready__.remote()] = (a, self.actors[a])

    def close(self) -> None:
        """End every replica."""
        for actor in self.actors:  # replacements still waiting for room included
            self.ray.kill(actor)


def _run_pool(cfg: TeachConfig, qs: list, have: pa.Table, store: RecordStore, on_shard=None) -> dict:
    """Generate what the questions still need on a pool of replicas; returns generated count and usage."""
    schedule = _Schedule(cfg, qs, have)
    cost = {"generated": 0, "cpu_s": 0.0, "gpu_s": 0.0}
    if not schedule.queue:
        return cost
    pool = _Pool(cfg, store, schedule.tid)
    tokens, started = 0, time.time()
    with Progress("teacher", schedule.total, "samples", cfg.progress) as bar:
        while schedule.queue or pool.retry or pool.inflight:
            pool.send(schedule)
            pool.check_placement()
            for ref in pool.wait():
                if ref in pool.placing:
                    pool.placed(ref)
                    continue
                result = pool.result(ref)
                if result is None:  # its replica was lost: the batch is sent again
                    continue
                for k in cost:
                    cost[k] += result[k]
                tokens += sum(r["tokens"] for r in result["records"])
                bar.total += schedule.land(result["records"])
                bar.update(len(result["records"]), tok_s=f"{tokens / max(time.time() - started, 1e-9):.0f}")
                if on_shard is not None:
                    on_shard(Path(result["shard"]))
    pool.close()
    return cost


def spent(cfg: TeachConfig, table: pa.Table, qs: list) -> pa.Table:
    """The records the teacher spent on its questions `qs`: the first D of each, or its adaptive rounds."""
    mask = None
    for task in cfg.tasks:  # the questions' records, read as columns
        of_task = pc.and_(pc.equal(table["task"], task),
                          pc.is_in(table["index"], pa.array([q.index for q in qs if q.task == task], pa.int64())))
        mask = of_task if mask is None else pc.or_(mask, of_task)
    table = table.filter(mask)
    if cfg.sampling.adaptive is None:
        return table.filter(pc.less(table["sample_index"], cfg.sampling.budget))
    by_q: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for i, r in enumerate(table.select(["task", "index", "sample_index", "correct", "rationale"]).to_pylist()):
        by_q[(r["task"], r["index"])][r["sample_index"]] = {**r, "row": i}
    rows = []
    for recs in by_q.values():
        n = samples_used(recs, cfg.sampling.adaptive, cfg.sampling.budget)
        rows += [recs[k]["row"] for k in sorted(recs) if k < n]
    return table.take(pa.array(sorted(rows), pa.int64()))


def summarize(cfg: TeachConfig, store: RecordStore, qs: list, wall_s: float, cost: dict) -> dict:
    columns = SUMMED + (["rationale"] if cfg.sampling.adaptive else [])  # not prompts, not questions
    table = spent(cfg, store.read(teacher_id=teacher_id(cfg), columns=columns), qs)
    tasks = {}
    for task in cfg.tasks:
        rs = table.filter(pc.equal(table["task"], task))
        greedy = rs.filter(pc.equal(rs["temperature"], 0))["correct"]
        per_q = rs.group_by("index").aggregate([("index", "count")])["index_count"]
        spread = per_q.value_counts().to_pylist()  # samples -> questions
        tasks[task] = {
            "questions": len(per_q), "samples": len(rs),
            "accuracy_greedy": pc.mean(greedy.cast(pa.float64())).as_py() if len(greedy) else None,
            "accuracy_all_samples": pc.mean(rs["correct"].cast(pa.float64())).as_py() if len(rs) else None,
            "questions_with_a_correct_sample": pc.count_distinct(rs.filter(rs["correct"])["index"]).as_py(),
            "prompt_tokens": sum(pc.sum(rs[c]).as_py() or 0 for c in ("prompt_tokens", "answer_prompt_tokens")),
            "completion_tokens": sum(pc.sum(rs[c]).as_py() or 0
                                     for c in ("completion_tokens", "answer_completion_tokens")),
            "samples_per_question": {s["values"]: s["counts"] for s in sorted(spread, key=lambda s: s["values"])},
        }
    precision = cfg.engine.precision()
    return {"output_dir": cfg.output_dir, "records_dir": str(store.root), "teacher_id": teacher_id(cfg),
            "teacher": teacher_identity(cfg), "precision": precision.to_dict() if precision else None,
            "planned": sum(t["samples"] for t in tasks.values()),
            "records": len(table), "store": store.footprint(teacher_id(cfg)), "generated": cost["generated"],
            "wall_s": round(wall_s, 2),
            "cpu_s": round(cost["cpu_s"], 1), "gpu_s": round(cost["gpu_s"], 1), "tasks": tasks}
