"""What a stage cost in money: what it held and asked for, at the config's prices (`prices:` in a run config).

Rule: a stage pays for what it held, as a cluster bills it: the CPUs it reserved for its wall time at `cpu_hour`;
the GPU-seconds its workers held at `gpu_hour` (one price, or a price per GPU type: the key found in the type's
name, e.g. `{H100: 2.5, L40S: 1.0}`; where the cluster had several priced types, the highest, an upper bound); and,
for a teacher behind an OpenAI-compatible API, its prompt and completion tokens at the per-million prices (a
teacher on fcot's own replicas pays for its GPUs instead). Prices change no result: set or changed after a run,
`fcot report` prices it again. Unset prices cost nothing and nothing shows money.
"""

from __future__ import annotations

from fcot.config import Config
from fcot.errors import FcotError

API_ENGINES = ("openai",)  # teachers billed by the token


class Prices(Config):
    cpu_hour: float | None = None
    gpu_hour: float | dict[str, float] | None = None
    input_tokens_per_million: float | None = None
    output_tokens_per_million: float | None = None

    @property
    def set(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


def _gpu_price(prices: Prices, types: list[str]) -> float:
    if prices.gpu_hour is None or isinstance(prices.gpu_hour, (int, float)):
        return float(prices.gpu_hour or 0.0)
    priced = [p for name, p in prices.gpu_hour.items() for t in types if name.lower() in t.lower()]
    if not priced:
        held = ", ".join(types) or "their type unknown"
        raise FcotError(f"key 'prices.gpu_hour': no price for the GPUs this stage held ({held}); name a key found "
                        "in their type, or give one price")
    return max(priced)


def stage_cost(marker: dict, prices: Prices) -> float:
    """The money of one stage marker (fcot.run.Ledger) at `prices`."""
    reserved = marker.get("reserved") or {}
    cost = (prices.cpu_hour or 0.0) * reserved.get("CPU", 0) * marker.get("wall_s", 0.0) / 3600
    if marker.get("gpu_s"):
        cost += _gpu_price(prices, marker.get("accelerators") or []) * marker["gpu_s"] / 3600
    result = marker.get("result") or {}
    if (result.get("teacher") or {}).get("engine") in API_ENGINES:
        for task in (result.get("tasks") or {}).values():
            cost += (prices.input_tokens_per_million or 0.0) * task.get("prompt_tokens", 0) / 1e6
            cost += (prices.output_tokens_per_million or 0.0) * task.get("completion_tokens", 0) / 1e6
    return cost
