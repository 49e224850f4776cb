"""Precision and threads chosen from the hardware (fcot.hardware), and `fcot env`.

A CPU without native bf16 runs a bf16 matrix product ~77x slower than fp32: no CPU stage of the quickstart may run
in bf16 there, whatever CPU this suite runs on (oneDNN's answer is patched both ways)."""

import json

import pytest

from fcot import hardware
from fcot.config import load_config
from fcot.contracts.teacher import TeachConfig, teacher_id
from fcot.curate import CurateConfig
from fcot.engines import EngineConfig, build_engine
from fcot.environment import stage_settings
from fcot.evaluate import EvalConfig
from fcot.hardware import Precision
from fcot.run import RunConfig, stages
from fcot.train.config import TrainConfig
from tests.conftest import ROOT, run_fcot


def _precisions(cfg: RunConfig) -> dict[str, str]:
    """The dtype each stage with a model would run in, read from the stage configs the chain runs."""
    out = {}
    for stage in stages(cfg):
        c = stage.inputs[-1]
        if isinstance(c, (TeachConfig, EvalConfig)) and c.engine.precision() is not None:
            out[stage.name] = c.engine.precision().dtype
        elif isinstance(c, TrainConfig):
            out[stage.name] = c.precision_choice().dtype
        else:
            assert isinstance(c, (CurateConfig, TeachConfig)), stage.name  # no model of its own (recorded teacher)
    return out


@pytest.mark.parametrize("native", [False, True])
def test_no_cpu_stage_of_the_quickstart_runs_bf16_without_native_bf16(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: native)
    cfg = load_config(RunConfig, ROOT / "experiments" / "quickstart.yaml")
    chosen = _precisions(cfg)
    assert {"teacher-smollm2-135m", "train-fine_tune_cot", "train-vanilla", "eval-fine_tune_cot",
            "eval-vanilla"} <= set(chosen)
    assert set(chosen.values()) == {"bfloat16" if native else "float32"}, chosen


def test_explicit_dtype_is_kept_and_a_slow_one_warned_once(monkeypatch, capsys):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: False)
    monkeypatch.setattr(hardware, "_warned", set())
    engine = EngineConfig(kind="hf", dtype="bfloat16")
    assert engine.precision().dtype == "bfloat16" and "slow" in engine.precision().why
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fcot: warning: engine.dtype: bfloat16 on this CPU is its slow dtype")
    assert EngineConfig(kind="hf", dtype="float32").precision().dtype == "float32"
    assert capsys.readouterr().err == ""
    train = TrainConfig(data="x", precision="auto")
    assert train.resolved_precision == "fp32"
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: True)
    assert train.resolved_precision == "bf16" and EngineConfig(kind="hf").precision().dtype == "bfloat16"
    # GPUs the driver cannot see: bf16 (Ampere and later), a stated assumption
    gpu = EngineConfig(kind="vllm", gpus_per_replica=1, tensor_parallel_size=1).precision()
    assert gpu.dtype == "bfloat16" and "not visible" in gpu.why


def test_the_dtype_that_runs_is_part_of_the_teacher_identity(monkeypatch, tiny_llama):
    cfg = {"tasks": "coin_flip", "subset": 2, "engine": {"kind": "hf", "model": str(tiny_llama)}}
    ids = {}
    for native in (False, True):
        monkeypatch.setattr(hardware, "cpu_bf16", lambda native=native: native)
        ids[native] = teacher_id(load_config(TeachConfig, base=cfg))
    assert ids[False] != ids[True]  # bf16 and fp32 samples differ: two teachers, two caches
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: False)
    assert ids[False] == teacher_id(load_config(TeachConfig, base={**cfg, "engine": {**cfg["engine"],
                                                                                     "dtype": "float32"}}))


def test_a_replica_loads_the_dtype_the_driver_chose(monkeypatch, tiny_llama):
    import torch

    monkeypatch.setattr(hardware, "cpu_bf16", lambda: False)
    sent = EngineConfig(kind="hf", model=str(tiny_llama)).resolved()  # what the driver sends to its replicas
    assert sent.dtype == "float32"
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: True)  # a replica's own CPU does not change it
    assert next(build_engine(sent).model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_replicas_use_as_many_threads_as_the_cpus_they_reserved(tiny_llama, ray_local):
    import ray

    from fcot.teacher.pipeline import TeacherWorker

    for cpus in (1, 2):
        cfg = load_config(TeachConfig, base={"tasks": "coin_flip", "output_dir": "/tmp/unused-fcot-teacher",
                                             "engine": {"kind": "hf", "model": str(tiny_llama),
                                                        "cpus_per_replica": cpus}})
        actor = ray.remote(TeacherWorker).options(num_cpus=cpus).remote(cfg.model_dump(), "/tmp/unused", ("t", "{}"))

        def threads(_self):
            import os

            import torch

            return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ["RAYON_NUM_THREADS"]

        assert ray.get(actor.__ray_call__.remote(threads)) == (cpus, str(cpus), str(cpus))
        ray.kill(actor)


def test_fcot_env_prints_what_it_sees_and_chooses():
    out = run_fcot("env", "--json", check=True)
    info = json.loads(out.stdout)
    assert info["cpu"]["cores"] >= 1 and isinstance(info["cpu"]["onednn_bf16"], bool)
    assert info["builds"]["torch"] and info["builds"]["ray"] and info["builds"]["transformers"]
    assert info["ray"]["joins"] and info["precision_auto"]["cpu"]["dtype"] in ("bfloat16", "float32")
    by_stage = {s["stage"]: s for s in info["stages"]}  # the quickstart's, by default
    assert by_stage["teacher-smollm2-135m"]["threads"] == 2
    assert by_stage["train-vanilla"]["dtype"] == info["precision_auto"]["cpu"]["dtype"]
    text = run_fcot("env", check=True).stdout
    assert "oneDNN bf16" in text and "train-fine_tune_cot" in text and "Ray:" in text


def test_fcot_env_with_an_address_lists_the_clusters_nodes_or_says_it_could_not_connect(ray_local):
    import socket

    info = json.loads(run_fcot("env", "--json", check=True, cluster=ray_local).stdout)["ray"]
    assert info["address"] == ray_local and "error" not in info
    assert [(n["cpus"], n["gpus"]) for n in info["nodes"]] == [(2, 0)]
    assert info["nodes"][0]["memory_gib"] > 0
    assert "1 nodes alive: 2 CPUs, 0 GPUs" in run_fcot("env", check=True, cluster=ray_local).stdout
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
        info = json.loads(run_fcot("env", "--json", check=True, cluster=closed).stdout)["ray"]
    assert "nodes" not in info and info["error"].startswith(f"could not connect: nothing answers at {closed}")


def test_stage_settings_follow_the_config(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: False)
    cfg = load_config(RunConfig, ROOT / "experiments" / "quickstart.yaml",
                      ["train.precision=bf16", "eval.engine.cpus_per_replica=1"])
    by_stage = {s["stage"]: s for s in stage_settings(cfg)}
    assert by_stage["train-vanilla"]["dtype"] == "bfloat16" and "slow" in by_stage["train-vanilla"]["why"]
    assert by_stage["eval-vanilla"]["threads"] == 1 and by_stage["eval-vanilla"]["dtype"] == "float32"


@pytest.mark.parametrize("gpu, capability, native", [("Tesla T4", (7, 5), False), ("NVIDIA A100", (8, 0), True)])
def test_auto_picks_bf16_only_on_a_gpu_that_computes_it_natively(monkeypatch, gpu, capability, native):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 (it counts emulation); fcot asks for native support:
    auto is fp16 there, and a bf16 chosen by a driver that saw no GPU is refused by the worker, naming the key."""
    import torch

    from fcot.errors import FcotError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    hardware.cuda_bf16.cache_clear()
    try:
        assert hardware.choose("auto", "cuda", "eval.engine.dtype").dtype == ("bfloat16" if native else "float16")
        if native:
            hardware.check_gpu("bfloat16", "train.precision")
        else:
            with pytest.raises(FcotError, match=f"train.precision: bfloat16 .* {gpu} has no bf16"):
                hardware.check_gpu("bfloat16", "train.precision")
    finally:
        hardware.cuda_bf16.cache_clear()


def test_workers_that_disagree_train_in_the_dtype_every_one_computes_natively():
    bf16, fp32 = Precision("bfloat16", "auto: native"), Precision("float32", "auto: no native bf16")
    assert hardware.agree([bf16, bf16]) == bf16 and hardware.agree([fp32, fp32]) == fp32
    mixed = hardware.agree([bf16, fp32, bf16])
    assert mixed.dtype == "float32" and "worker 1 of 3" in mixed.why
    assert hardware.agree([bf16, Precision("float16", "auto: this GPU has no bf16")]).dtype == "float16"
