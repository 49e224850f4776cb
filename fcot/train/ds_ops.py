"""DeepSpeed's JIT-built ops: one cache folder per torch build, and a pre-build step for scripts/setup.sh.

On CPU, `deepspeed.initialize` always loads the `shm_comm` op (its torch.distributed backend does), and
ZeRO-Offload needs `cpu_adam`. Each compiles on first use (1-2 min on 2 cores) and loads in seconds
afterwards, so setup builds them once:

    python -m fcot.train.ds_ops              # the default CPU path: shm_comm
    python -m fcot.train.ds_ops cpu_adam     # also ZeRO-Offload's optimizer
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

# fcot name -> DeepSpeed op builder class
BUILDERS = {"shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder", "fused_adam": "FusedAdamBuilder"}
DEFAULT_CPU_OPS = ("shm_comm",)


def torch_extensions_dir() -> Path:
    """Where JIT-built ops live: $FCOT_TORCH_EXTENSIONS_DIR, else the user cache, keyed by the torch build
    (an op built against another torch must not be loaded) and the environment."""
    if os.environ.get("FCOT_TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["FCOT_TORCH_EXTENSIONS_DIR"]).expanduser()
    import torch  # heavy: training processes only

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # Keyed by the environment too: two venvs compile with different include paths, and sharing one folder
    # makes each rebuild the op the other just built.
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache / "fcot" / "torch_extensions" / f"torch-{torch.__version__}-{python}-{env}"


def clear_stale_locks(root: Path) -> list[Path]:
    """Remove build locks left by a process killed while it built or loaded an op.

    torch waits forever while an op's `lock` file exists. With the op built, a live loader holds the lock
    for a second or two; while building, for minutes. Older locks than that have no owner left.
    """
    removed = []
    for lock in root.glob("*/lock"):
        built = any(lock.parent.glob("*.so"))
        if time.time() - lock.stat().st_mtime > (60 if built else 900):
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def configure(use_gpu: bool) -> None:
    """Set DeepSpeed's environment; call before `import deepspeed` in the process that trains."""
    os.environ["TORCH_EXTENSIONS_DIR"] = str(torch_extensions_dir())
    clear_stale_locks(torch_extensions_dir())
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA and warn


def prebuild(names=DEFAULT_CPU_OPS, use_gpu: bool = False, log=print) -> dict[str, float]:
    """Build (or load, when cached) each op; returns seconds per op."""
    configure(use_gpu)
    from deepspeed.accelerator import get_accelerator  # heavy, and only after configure()

    seconds = {}
    for name in names:
        builder = get_accelerator().create_op_builder(BUILDERS[name])
        if builder is None or not builder.is_compatible():
            log(f"deepspeed op {name}: not available on {get_accelerator().device_name()}, skipped")
            continue
        started = time.time()
        builder.load(verbose=False)
        seconds[name] = round(time.time() - started, 1)
        log(f"deepspeed op {name}: ready in {os.environ['TORCH_EXTENSIONS_DIR']} ({seconds[name]} s)")
    return seconds


if __name__ == "__main__":
    unknown = [n for n in sys.argv[1:] if n not in BUILDERS]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}; known: {', '.join(BUILDERS)}")
    prebuild(tuple(dict.fromkeys([*DEFAULT_CPU_OPS, *sys.argv[1:]])))
