"""What the machine computes natively, and the precision and threads each stage uses because of it.

Precision rule (teacher and evaluation engines, hf and vLLM; training): `auto` is bf16 where the device computes it
natively — a CUDA GPU with bf16, a CPU whose oneDNN reports bf16 (AVX-512-BF16 or AMX) — else fp16 on a CUDA GPU
and fp32 on a CPU. An explicit choice is kept, with one warning line when it is the slow one here: bf16 on a CPU
without native bf16 (a matrix product ~77x slower than fp32 on an AVX2 EPYC), fp16 on any CPU. The choice is made
by the driver, for the device the stage's workers use (CPU, or CUDA when they hold GPUs): it is part of the teacher's
identity, and the report says which dtype ran and why. A driver without a GPU cannot look at a cluster's GPUs:
there auto means bf16 (every GPU from Ampere on), and a replica on an older GPU stops naming the key.

Thread rule: a Ray actor or training worker uses as many intra-op threads as the CPUs it reserved (torch, OpenMP,
the tokenizers' Rayon pool, vLLM's CPU worker), and no more: `use_cpus(n)` in the worker, before it loads a model.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal

from fcot.errors import FcotError

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["cpu", "cuda"]
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # training's names for the same dtypes
LONG = {v: k for k, v in SHORT.items()}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16")


@dataclass(frozen=True)
class Precision:
    dtype: str  # bfloat16 | float16 | float32
    why: str

    @property
    def short(self) -> str:
        return SHORT[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def cpu_bf16() -> bool:
    """This CPU computes bf16 natively, as oneDNN (torch's CPU matmuls) sees it."""
    import torch  # heavy: asked where a precision is chosen

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cuda_bf16() -> bool | None:
    """This process's GPU computes bf16 natively (None: no GPU visible here). Not torch's default answer, which
    counts emulation: a T4 or V100 says yes there, runs bf16 many times slower, and vLLM refuses it below 8.0."""
    import torch  # heavy: see cpu_bf16

    return bool(torch.cuda.is_bf16_supported(including_emulation=False)) if torch.cuda.is_available() else None


def cpu_info() -> tuple[str, list[str]]:
    """(model name, the CPU features that decide speed here), from /proc/cpuinfo (empty where there is none)."""
    model, have = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.partition(":")[2].strip()
                elif line.startswith(("flags", "Features")):
                    have = set(line.partition(":")[2].split())
                    break
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in have]


def threads_for(cpus: float) -> int:
    """The intra-op threads of a worker that reserved `cpus` CPUs (at least one)."""
    return max(1, math.floor(cpus))


_warned: set[tuple] = set()


def choose(requested: str, device: Device, key: str) -> Precision:
    """The dtype a stage runs in on `device`; `key` names the config key in the warning of a slow choice."""
    requested = LONG.get(requested, requested)
    if device == "cuda":
        native = cuda_bf16()
        if requested != "auto":
            return Precision(requested, f"{key}: {requested}, as configured")
        if native is None:
            return Precision("bfloat16", "auto: GPUs not visible from this process; bf16, which every GPU from "
                                         f"Ampere on computes (older GPUs: set {key}: float16)")
        if native:
            return Precision("bfloat16", "auto: this GPU computes bf16 natively")
        return Precision("float16", "auto: this GPU has no bf16, fp16 instead")
    native = cpu_bf16()
    if requested == "auto":
        if native:
            return Precision("bfloat16", "auto: this CPU computes bf16 natively (oneDNN: AVX-512-BF16 or AMX)")
        return Precision("float32", "auto: this CPU has no native bf16 (oneDNN: no AVX-512-BF16 or AMX); "
                                    "fp32 is its fast dtype")
    slow = (requested == "bfloat16" and not native) or requested == "float16"
    if slow and (requested, key) not in _warned:
        _warned.add((requested, key))
        print(f"fcot: warning: {key}: {requested} on this CPU is its slow dtype (no native support; fp32 runs many "
              f"times faster here): set {key}: auto", file=sys.stderr)
    return Precision(requested, f"{key}: {requested}, as configured" + (" (slow on this CPU)" if slow else ""))


def agree(choices: list[Precision]) -> Precision:
    """One dtype for workers that each chose on their own device: theirs when they agree; else the choice of the
    first without native bf16 (fp32 on a CPU, fp16 on a GPU), since a worker computing bf16 slowly, or not at
    all, would hold every other back (their gradients meet each step)."""
    if len({c.dtype for c in choices}) == 1:
        return choices[0]
    rank, c = next((r, c) for r, c in enumerate(choices) if c.dtype != "bfloat16")
    return Precision(c.dtype, f"{c.why} (worker {rank} of {len(choices)}; the others chose bf16)")


def check_gpu(dtype: str, key: str) -> None:
    """In a worker that holds a GPU: the driver's choice made without seeing it must be one this GPU computes."""
    if LONG.get(dtype, dtype) == "bfloat16" and cuda_bf16() is False:
        import torch  # heavy: a GPU worker's own

        raise FcotError(f"{key}: bfloat16 was chosen for GPUs the driver could not see, but "
                        f"{torch.cuda.get_device_name()} has no bf16: set {key}: float16")


def use_cpus(n: float) -> int:
    """Make this process use as many intra-op threads as the CPUs it reserved (at least one): torch, OpenMP and
    MKL, the tokenizers' Rayon pool, and vLLM's CPU worker (not bound to cores: Ray does not pin them, so vLLM's
    own binding to every core of the node would overlap other workers). Call it before loading a model."""
    threads = threads_for(n)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch  # heavy: workers only

    torch.set_num_threads(threads)
    return threads
