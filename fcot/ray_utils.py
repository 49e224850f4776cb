"""Start or join Ray: a local cluster started by the program itself, or RAY_ADDRESS / a configured address."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, runtime_env={"env_vars": quiet})
        if address:
            ray.init(address=address, **kwargs)
        else:
            # A private local cluster; the dashboard would bind a port and start extra processes.
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # fcot prints its own progress with samples/s and tokens/s
    ctx.print_on_execution_start = False
