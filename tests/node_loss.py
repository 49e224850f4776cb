"""A worker node lost mid-stage, on one multi-node Ray cluster of this machine for the whole test session: `python -m
tests.node_loss`, from the repo root (conftest's `lose_a_node` fixture starts it, once).

A ray.cluster_utils.Cluster, as Ray's own fault-tolerance tests use: a head without CPUs (where this driver runs, as on
a real cluster), started once. Each request (a JSON line on stdin: stage, config, optional reference config, result
path) adds two fresh worker nodes for its stage. With a reference config the stage first runs undisturbed on it. Then
the stage runs on its config in a thread; once its work is under way (the stage's trigger below), a worker node holding
one of its processes is removed without grace, as a preempted spot node is, and 2 s later a fresh node joins, as an
autoscaler adds one (unless the request says `"replace": false`: an autoscaler out of capacity, a drained spot pool; the
stage must finish on the node left), and with the request's `env` set in this driver meanwhile. The request's worker
nodes are then removed and its result written (atomically) as JSON: {"result", "reference", "error", "at_loss"}. Closing
stdin shuts the cluster down. The only processes it kills are those of the nodes it added and removed
(Cluster.remove_node), all started here."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from fcot.config import load_config
from fcot.io import atomic_write_text
from tests.conftest import epoch_committed


def _teach():
    from fcot.contracts.teacher import TeachConfig
    from fcot.teacher.pipeline import teach

    def started(cfg):
        return lambda: bool(list((Path(cfg.output_dir) / "records").glob("*.parquet")))

    return TeachConfig, teach, "TeacherWorker", started, {"num_cpus": 1}


def _train():
    from fcot.train.config import TrainConfig
    from fcot.train.trainer import train

    def started(cfg):
        return lambda: epoch_committed(cfg.output_dir)

    return TrainConfig, train, "RayTrainWorker", started, {"num_cpus": 1}


def _curate():
    from fcot.curate import CurateConfig, curate

    return CurateConfig, curate, "MapBatches(format_", lambda cfg: lambda: True, {"num_cpus": 1}  # a formatter's node


def _evaluate():
    from fcot.evaluate import EvalConfig, evaluate

    def started(cfg):
        first = time.time()
        return lambda: time.time() - first > 1.0  # replicas load their model, then answer batches: mid-stage

    return EvalConfig, evaluate, "EvalWorker", started, {"num_cpus": 1}


def _rollout():
    from fcot.rollout import RolloutConfig, rollout

    def started(cfg):
        return lambda: bool(list((Path(cfg.output_dir) / "samples").glob("*.parquet")))  # a batch sampled

    return RolloutConfig, rollout, "StudentSampler", started, {"num_cpus": 1}


def _sweep():
    from fcot.sweep import SweepConfig, sweep, trials

    def started(cfg):
        # Every trial has committed an epoch, so whichever trial the victim node trains can resume.
        n = len(trials(cfg)[2])
        return lambda: sum(map(epoch_committed, Path(cfg.output_dir).glob("trials/*/students/*"))) == n

    return SweepConfig, sweep, "RayTrainWorker", started, {"num_cpus": 2}


def _run():
    from fcot.run import RunConfig, run

    return RunConfig, run, "", lambda cfg: lambda: True, {"num_cpus": 1}


STAGES = {"teach": _teach, "curate": _curate, "train": _train, "evaluate": _evaluate, "rollout": _rollout,
          "sweep": _sweep, "run": _run}
# Chaos over a whole `fcot run`: in each stage in turn, once a process of it runs on a worker node (and, in
# training, an epoch is committed), that node is removed without grace and a fresh one added.
CHAOS = [("teacher", "TeacherWorker"), ("curate", "MapBatches(format_shards)"), ("train", "RayTrainWorker"),
         ("eval", "EvalWorker")]


def _holding(nodes, title: str):
    """The worker node one of whose processes (a descendant of its raylet) has `title` in its command line."""
    for node in nodes:
        raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        for p in raylet.children(recursive=True):
            try:
                if title in " ".join(p.cmdline()):
                    return node
            except psutil.Error:  # ended meanwhile
                pass
    return None


def scenario(cluster: Cluster, stage: str, config: str, reference: str | None = None, replace: bool = True,
             env: dict | None = None) -> dict:
    config_cls, fn, title, started, node_args = STAGES[stage]()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # this request's: Ray Train passes the driver's RAY_TRAIN_* on to its controller
    nodes = [cluster.add_node(**node_args) for _ in range(2)]
    try:
        cluster.wait_for_nodes()
        at = [f"ray_address={cluster.address}"]
        out = {"reference": fn(load_config(config_cls, reference, at)) if reference else None, "error": None}
        cfg = load_config(config_cls, config, at)
        result, errors = {}, []

        def run():
            try:
                result.update(fn(cfg))
            except BaseException as e:  # reported, and the test fails on it
                errors.append(f"{type(e).__name__}: {e}"[:3000])

        runner = threading.Thread(target=run)
        runner.start()
        under_way, victim, deadline = started(cfg), None, time.time() + 600
        while runner.is_alive() and time.time() < deadline and not (under_way() and (victim := _holding(nodes, title))):
            time.sleep(0.1)
        out["at_loss"] = {"running": runner.is_alive(), "victim_found": victim is not None}
        if victim is not None:
            cluster.remove_node(victim, allow_graceful=False)  # a spot node gone: no drain, no goodbye
            nodes.remove(victim)
            if replace:
                time.sleep(2)
                nodes.append(cluster.add_node(**node_args))
        runner.join(timeout=900)
        out.update(result=result, error=errors[0] if errors else None)
        return out
    finally:
        for k, v in saved.items():  # the driver's environment as it was before this request
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for node in nodes:  # this request's nodes: the next one starts on fresh ones
            cluster.remove_node(node)


def chaos(cluster: Cluster, config: str, reference: str, workers: int = 3) -> dict:
    """`fcot run` of `config` undisturbed (on `reference`), then again under chaos (CHAOS) on `workers` one-CPU worker
    nodes; the removals are reported as {stage, at (s from the start)}."""
    from fcot.run import RunConfig, run

    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    try:
        cluster.wait_for_nodes()
        at = [f"ray_address={cluster.address}"]
        out = {"reference": run(load_config(RunConfig, reference, at), log=lambda m: None), "error": None}
        cfg = load_config(RunConfig, config, at)
        result, errors, started = {}, [], time.time()

        def go():
            try:
                result.update(run(cfg, log=lambda m: None))
            except BaseException as e:  # reported, and the test fails on it
                errors.append(f"{type(e).__name__}: {e}"[:3000])

        runner = threading.Thread(target=go)
        runner.start()
        removals = []
        for stage, title in CHAOS:
            student = Path(cfg.output_dir) / "students" / "fine_tune_cot"
            victim, deadline = None, time.time() + 600
            while runner.is_alive() and time.time() < deadline and victim is None:
                if stage != "train" or epoch_committed(student):
                    victim = _holding(nodes, title)
                time.sleep(0.05)
            if victim is None:
                continue
            cluster.remove_node(victim, allow_graceful=False)
            nodes.remove(victim)
            removals.append({"stage": stage, "at": round(time.time() - started, 1)})
            time.sleep(1)
            nodes.append(cluster.add_node(num_cpus=1))
        runner.join(timeout=900)
        out.update(result=result, error=errors[0] if errors else None, removals=removals,
                   at_loss={"running": True, "victim_found": len(removals) == len(CHAOS)})
        return out
    finally:
        for node in nodes:
            cluster.remove_node(node)


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                if request.get("chaos"):
                    out = chaos(cluster, request["config"], request["reference"])
                else:
                    out = scenario(cluster, request["stage"], request["config"], request.get("reference"),
                                   request.get("replace", True), request.get("env"))
            except Exception as e:  # noqa: BLE001 - the test reports it; the next request still runs
                out = {"error": f"{type(e).__name__}: {e}"[:3000], "at_loss": None, "result": None}
            atomic_write_text(request["result"], json.dumps(out, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
