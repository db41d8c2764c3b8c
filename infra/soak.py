"""Memory under steady load: `python -m infra.soak [--duration 600]` (not in CI).

Starts a local stack (the tiny model, tp=2, 2 replicas), runs the streaming multi-turn
clients of infra/client.py for `--duration` seconds (new sessions all the time, so the
router's per-session state and Redis keep growing as in production) and samples, every
`--every` seconds, the resident memory (VmRSS) of the router replica, each engine replica
(rank 0, the Serve replica) and its rank actors, the Serve proxy, Redis and nginx.

The bound: after a warm-up of `--warmup` seconds (imports, KV pools, first batches),
no router or engine process may grow by more than `--bound-mib` MiB (default 64) by the
end. Growth is measured from the first sample after the warm-up to the median of the last
three samples (one sample can catch a transient allocation). One JSON line with the
samples, the growth per process and whether the bound held.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from infra.client import Budget, LoadConfig, Turn, run_clients
from infra.results import driver_env, emit, environment, script_args
from infra.results import summarize as load_summary

# Ray actor class names -> the role a soak reports them under
ROLES = {"ServeReplica:tpserve:Router": "router", "ServeReplica:tpserve:Engine": "engine",
         "RankActor": "engine_rank", "ProxyActor": "serve_proxy"}
BOUNDED = ("router", "engine", "engine_rank")


@dataclass(frozen=True)
class SoakConfig:
    duration: float = 600.0
    every: float = 15.0
    warmup: float = 60.0
    bound_mib: float = 64.0
    clients: int = 4
    turns: int = 4
    max_tokens: int = 32


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def processes(dashboard: str, services: dict[str, int]) -> dict[str, int]:
    """{label: pid} of the stack's processes (Ray's state API for the actors)."""
    from ray.util.state import list_actors

    out = {name: pid for name, pid in services.items()}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], address=dashboard, limit=1000):
        role = ROLES.get(actor.class_name)
        if role is not None and actor.pid:
            out[f"{role}:{actor.name or actor.actor_id}"[:80]] = actor.pid
    return out


async def sample(dashboard: str, services: dict[str, int], config: SoakConfig,
                 stop: asyncio.Event) -> list[dict[str, Any]]:
    samples = []
    start = time.monotonic()
    while not stop.is_set():
        pids = await asyncio.to_thread(processes, dashboard, services)
        samples.append({"t_s": round(time.monotonic() - start, 1),
                        "rss_mib": {k: round(v, 1) for k, pid in pids.items()
                                    if (v := rss_mib(pid)) is not None}})
        try:
            await asyncio.wait_for(stop.wait(), config.every)
        except TimeoutError:
            pass
    return samples


def growth(samples: list[dict[str, Any]], warmup: float) -> dict[str, float]:
    """MiB each process grew from the first sample after warm-up to the end (median of
    the last three samples that have it)."""
    after = [s for s in samples if s["t_s"] >= warmup] or samples[-1:]
    out = {}
    for name, first in after[0]["rss_mib"].items():
        tail = [s["rss_mib"][name] for s in after if name in s["rss_mib"]][-3:]
        out[name] = round(statistics.median(tail) - first, 1)
    return out


async def soak(stack: Any, config: SoakConfig, services: dict[str, int]
               ) -> tuple[list[Turn], list[dict[str, Any]], float]:
    load = LoadConfig(url=stack.edge, clients=config.clients, turns=config.turns,
                      max_tokens=config.max_tokens, duration=config.duration,
                      max_requests=1 << 30)
    records: list[Turn] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(stack.config.ray_dashboard, services, config, stop))
    wall = await run_clients(load, records, Budget(time.monotonic() + config.duration, 1 << 30))
    stop.set()
    return records, await sampler, wall


def run(config: SoakConfig, out: str | None) -> dict[str, Any]:
    import ray

    from infra.stack import local_stack, read_state

    with local_stack() as stack:
        stack.connect()
        try:
            services = read_state(stack.config.state_dir)["services"]
            records, samples, wall = asyncio.run(soak(stack, config, services))
        finally:
            ray.shutdown()
    grew = growth(samples, config.warmup)
    bounded = {k: v for k, v in grew.items() if k.split(":")[0] in BOUNDED}
    row = {"kind": "soak", **load_summary(records, wall), "growth_mib": grew,
           "max_growth_bounded_mib": max(bounded.values(), default=None),
           "bound_mib": config.bound_mib,
           "met": bool(bounded) and max(bounded.values()) <= config.bound_mib,
           "first_rss_mib": samples[0]["rss_mib"] if samples else {},
           "last_rss_mib": samples[-1]["rss_mib"] if samples else {},
           "samples": samples, "config": asdict(config), "stack": "local", "model": "tiny",
           "tp": 2, "data_path": stack.config.data_path, **environment()}
    emit(row, out)
    return row


def main(argv: list[str] | None = None) -> int:
    driver_env()
    config, out, _ = script_args("python -m infra.soak", __doc__.split("\n")[0], SoakConfig,
                                 "soak_cpu.jsonl", argv)
    row = run(config, out)
    return 0 if row["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
