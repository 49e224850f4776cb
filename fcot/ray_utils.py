"""Start or join Ray, Ray's token auth, and what a Ray process measures of itself.

`init_ray`: a local cluster started by the program itself, or RAY_ADDRESS / a configured address.
`auth_token`: Ray 2.60's token authentication (on by default) wants `Authorization: Bearer TOKEN` on the
dashboard; Ray's own client adds it only with RAY_AUTH_MODE=token, fcot sends it whenever a token is found.
`Usage`: the CPU-seconds of this process and its children (a vLLM replica's engine process included) and the
GPU-seconds of the GPUs Ray gave it, measured by the process that did the work and reported with its results.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import psutil


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray  # heavy (~1 s): only where Ray work starts
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "TOKENIZERS_PARALLELISM": "false"}
        kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, runtime_env={"env_vars": quiet})
        if address:
            ray.init(address=address, **kwargs)
        else:
            # A private local cluster, its dashboard on loopback only: Ray Train V2 watches its controller through
            # the State API, which the dashboard serves (without it, a warning every second of every training).
            # address "local": a plain ray.init() joins the cluster another process started on this machine (Ray
            # records the last one in /tmp/ray), and then refuses num_cpus.
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                     dashboard_host="127.0.0.1", **kwargs)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # fcot prints its own progress with samples/s and tokens/s
    ctx.print_on_execution_start = False
    # Rows keep their order through fcot's pipelines (and into training's ingest, which copies this option): the
    # same inputs write the same curated file, which training's seeded shuffle starts from. Without it, blocks
    # arrive as they finish, and on a multi-node cluster that order changes from run to run.
    ctx.execution_options.preserve_order = True
    # Ray 2.60's new parquet reader (DataSourceV2) reads file footers in actors spread over the cluster that Ray
    # never restarts: a node lost while a read lists its files fails the whole read (ActorDiedError: FooterReader).
    # The V1 reader runs plain read tasks, which Ray retries on another node. tests/test_curate_eval.py shows it.
    ctx.use_datasource_v2 = False
    # Group-bys sort (Ray's default is a hash shuffle), so groups come out in key order, as curation's own sort by
    # question does. Set here, before any Dataset is made: a Dataset keeps a copy of the context.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def auth_token() -> str | None:
    """The Ray auth token the way Ray finds it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def cpu_seconds(children: bool = True) -> float:
    """CPU time of this process (user + system) and, for a worker, of its live children (a vLLM replica's engine
    process). A driver counts itself only: the local Ray cluster it started is its children too."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True) if children else ():
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def accelerator_types() -> list[str]:
    """The GPU types of the connected Ray cluster (its nodes' `accelerator_type:*` resources), for prices."""
    import ray  # heavy: where Ray work runs

    if not ray.is_initialized():
        return []
    return sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))


def gpus_held() -> int:
    """GPUs Ray assigned to this worker (0 outside Ray or on CPU)."""
    try:
        import ray  # heavy, and already imported in any Ray worker

        return len(ray.get_gpu_ids()) if ray.is_initialized() else 0
    except Exception:  # noqa: BLE001 - a driver without a GPU resource
        return 0


class Usage:
    """Measures a worker from its creation: `take()` returns the CPU-s and GPU-s spent since the last take.
    `children`: count its child processes too (a vLLM engine's; listing them reads /proc, ~4 ms)."""

    def __init__(self, children: bool = True):
        self.children = children
        self.cpu, self.wall, self.gpus = cpu_seconds(children), time.time(), gpus_held()

    def take(self) -> dict[str, float]:
        cpu, wall = cpu_seconds(self.children), time.time()
        out = {"cpu_s": cpu - self.cpu, "gpu_s": self.gpus * (wall - self.wall)}
        self.cpu, self.wall = cpu, wall
        return out
