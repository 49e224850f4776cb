"""What a stage asks of a cluster, and whether a cluster can ever give it.

Each stage config states its own demand (`demands(prefix)`: one `Demand` per group of actors that must run at
once, naming the config keys that set it). `fcot run --dry-run`, `fcot submit`, the run's ledger and the sweep
all read those; `check_demands` compares them with a cluster's nodes and names the key of what can never fit.
Stages run one after another, so each demand is checked on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from fcot.errors import FcotError
from fcot.ray_utils import auth_headers

AUTH_HELP = ("the cluster uses Ray token authentication: put the head's token (`ray get-auth-token` on the head) "
             "in ~/.ray/auth_token or $RAY_AUTH_TOKEN")


@dataclass(frozen=True)
class Demand:
    """`count` units of `unit` resources ({"CPU": 1, "GPU": 2}) that must all be placed at once."""

    key: str  # the config key that sets the count
    what: str  # e.g. "teacher engine replicas"
    count: int
    unit: dict[str, float]
    unit_keys: dict[str, str] = field(default_factory=dict)  # resource -> the config key that sets it

    def total(self, resource: str) -> float:
        return self.count * self.unit.get(resource, 0.0)


def largest(demands: list[Demand], resource: str) -> float:
    """The most of `resource` any one stage holds at once (stages run one after another)."""
    return max((d.total(resource) for d in demands), default=0.0)


def cluster_nodes(address: str, headers: dict | None = None) -> list[dict[str, float]]:
    """Total resources of each alive node: from the dashboard's state API (http address) or a short-lived
    Ray connection (a GCS address such as `auto` or `HOST:6379`)."""
    if address.startswith(("http://", "https://")):
        import requests  # only the dashboard path needs it

        url = address.rstrip("/") + "/api/v0/nodes"
        deadline = time.time() + 20  # a head that just started may not have registered its own node yet
        while True:
            try:
                r = requests.get(url, params={"detail": "1", "limit": "10000"}, headers=headers or {}, timeout=30)
            except requests.RequestException as e:
                raise FcotError(f"cannot reach the Ray dashboard at {address} ({type(e).__name__})") from None
            if r.status_code in (401, 403):
                raise FcotError(f"{address}: {r.status_code} {r.text.strip()[:80]}; {AUTH_HELP}")
            if r.status_code != 200:
                raise FcotError(f"{address}: listing nodes failed ({r.status_code} {r.text.strip()[:200]})")
            rows = r.json()["data"]["result"]["result"]
            nodes = [dict(n.get("resources_total") or {}) for n in rows if n.get("state") == "ALIVE"]
            if nodes or time.time() > deadline:
                return nodes
            time.sleep(1)
    import ray  # heavy: only where a cluster is asked

    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    finally:
        if connected_here:
            ray.shutdown()


def _fit(unit: dict[str, float], node: dict[str, float]) -> float:
    """How many units fit on one node."""
    counts = [math.floor(node.get(r, 0.0) / need + 1e-9) for r, need in unit.items() if need > 0]
    return min(counts) if counts else math.inf


def _fmt(unit: dict[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {v:g}" for r, v in unit.items() if v > 0) + "}" if any(unit.values()) else "{}"


def check_demands(demands: list[Demand], nodes: list[dict[str, float]], where: str = "the cluster",
                  hint: str = "") -> list[str]:
    """Raise FcotError (naming the config key) for a demand no placement on these nodes can satisfy."""
    totals: dict[str, float] = {}
    for n in nodes:
        for r, v in n.items():
            totals[r] = totals.get(r, 0.0) + v
    notes = []
    for d in demands:
        if d.count <= 0:
            continue
        for r, need in d.unit.items():
            if need <= 0:
                continue
            most = max((n.get(r, 0.0) for n in nodes), default=0.0)
            if most < need:
                key = d.unit_keys.get(r, d.key)
                raise FcotError(f"key {key!r}: each of the {d.what} asks for {need:g} {r}, but no node of {where} has "
                                f"that many (largest: {most:g} {r}; {totals.get(r, 0.0):g} {r} over {len(nodes)} "
                                f"node(s)){hint}")
        fits = sum(min(_fit(d.unit, n), d.count) for n in nodes)
        if fits < d.count:
            asked = ", ".join(f"{d.count * v:g} {r}" for r, v in d.unit.items() if v > 0)
            have = ", ".join(f"{totals.get(r, 0.0):g} {r}" for r, v in d.unit.items() if v > 0)
            raise FcotError(f"key {d.key!r}: {d.count} {d.what} x {_fmt(d.unit)} need {asked} at once, but {where} "
                            f"has {have} over {len(nodes)} node(s): at most {int(fits)} fit{hint}")
        notes.append(f"{d.key}: {d.count} x {_fmt(d.unit)} fits")
    return notes


def check_resources(demands: list[Demand], address: str) -> list[str]:
    """Compare `demands` with the cluster at `address` (the dashboard `http://HOST:8265`, or a Ray address:
    `auto`, `HOST:6379`, `ray://...`); FcotError if they can never run there."""
    if not demands:
        return []
    headers = auth_headers() if address.startswith(("http://", "https://")) else None
    hint = (" (an autoscaling cluster that has not scaled up yet counts only its nodes now: submit with "
            "--skip-resource-check)")
    return check_demands(demands, cluster_nodes(address, headers), where=f"the cluster at {address}", hint=hint)


def check_local(demands: list[Demand], cpus: float) -> None:
    """On the local machine (no cluster address): a demand that needs more CPUs than it has can never start."""
    for d in demands:
        if d.unit.get("GPU", 0) > 0:
            continue  # sized for a GPU cluster: `fcot submit` checks it against the cluster
        if d.total("CPU") > cpus:
            key = d.unit_keys.get("CPU", d.key) if d.count == 1 else d.key
            raise FcotError(f"key {key!r}: {d.count} {d.what} x {d.unit.get('CPU', 0):g} CPUs > {cpus:g} CPUs on "
                            f"this machine")
