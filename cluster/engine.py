"""The engine deployment: one Serve replica = one TP group.

Each engine replica is one TP group: Serve reserves a placement group of tp bundles
(STRICT_PACK, one node) for it; the replica itself is rank 0 in bundle 0 and starts ranks
1..tp-1 as actors in the other bundles (cluster/ranks.py). Tokens stream from rank 0
through a DeploymentHandle; a caller that goes away cancels the stream, which aborts the
request in the engine.

Both ends of the router -> engine hop live here, and speak router/wire.py: the replica's
`generate` reads a wire Request and yields wire Deltas (cluster/requests.py: the
translation, and the one mapping of failures to an HTTP status), and `ServeEngine` (the
router's engine, over the deployment's handle) reads them back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from cluster import waytrace
from cluster.control import ENGINE
from cluster.datapath import (
    DATA_PATHS,
    DataPathError,
    Heads,
    Inbox,
    Outbox,
    Outboxes,
    checked,
)
from cluster.requests import ReplicaTimes, error_event, serve_request
from router import keys, metrics, wire
from router.looplag import LoopLag

if TYPE_CHECKING:
    from replicas import Engine, EngineConfig

# The engine (replicas: torch, transformers) is imported only where it runs: in an engine
# replica's __init__, not when this module loads. A router replica imports this module
# (ServeEngine, error_event) and so stays free of torch; and an engine replica starts its
# rank actors before it spends seconds importing torch, so they import in parallel.

log = logging.getLogger(__name__)
# each engine replica publishes its stats (JSON, short TTL, under router/keys.py's
# stats key) every STATS_PERIOD_S when Redis is configured
STATS_PERIOD_S = 1.0
# Serve waits this long for a replica being removed to finish its accepted requests
DRAIN_TIMEOUT_S = 300.0
# requests an engine replica takes at once (Serve's max_ongoing_requests): ONGOING_PER_SEQ
# times its engine's batch (max_num_seqs; the engine queues those past it itself). Not one
# batch: Serve counts a direct-path request until its unary call returns, after its last
# frame is flushed, and a client's next request can come before that. At a cap of one
# batch, 64 streaming clients against 64 made Serve's cache count the replica full, and
# Serve then probed its queue length before the send, the request waiting: 17 % of
# requests, ~40 ms each, on the CPU stack (tpserve_engine_queue_probe_seconds; PERF.md
# v0.37). TPSERVE_MAX_ONGOING=N sets another, for measuring (`AB_MAX_ONGOING=N bash
# infra/device_stack.sh measure` runs the stack both ways)
ONGOING_PER_SEQ = 2
MAX_ONGOING = 128  # (the deployment's own default: ONGOING_PER_SEQ x max_num_seqs' 64)


def max_ongoing(max_num_seqs: int = 64) -> int:
    """Serve's max_ongoing_requests for an engine replica whose batch is max_num_seqs."""
    value = os.environ.get("TPSERVE_MAX_ONGOING", "").strip()
    return int(value) if value else ONGOING_PER_SEQ * max_num_seqs


def engine_process() -> bool:
    """Whether an engine replica runs its engine (rank 0 and the driver) in a process of
    its own (replicas/engineproc.py), the default, or in the replica's process
    (TPSERVE_ENGINE_PROCESS=0, for measuring: `AB_ENGINE_PROCESS=0 bash
    infra/device_stack.sh measure`). In its own process the driver does not share a GIL
    with Serve's calls and the direct path's frames (issue 19: PERF.md v0.30, v0.54)."""
    value = os.environ.get("TPSERVE_ENGINE_PROCESS", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"TPSERVE_ENGINE_PROCESS={value}: give 1 (own process) or 0")
    return value == "1"


def switch_interval_ms() -> float | None:
    """TPSERVE_SWITCH_INTERVAL_MS: the engine replica's sys.setswitchinterval, in ms (None:
    Python's 5 ms). Its event loop (Serve's calls, the direct path's frames) and the
    engine's driver thread share one GIL; a thread that waits for it waits up to the
    interval each time (issue 19's way in: PERF.md v0.30). `AB_SWITCH_MS=N bash
    infra/device_stack.sh measure` runs the stack both ways."""
    value = os.environ.get("TPSERVE_SWITCH_INTERVAL_MS")
    if not value:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not 0 < ms <= 1000:  # (NaN too)
        raise ValueError(f"TPSERVE_SWITCH_INTERVAL_MS={value}: give milliseconds in (0, 1000]")
    return ms


@serve.deployment(
    name=ENGINE,
    max_ongoing_requests=MAX_ONGOING,  # (engine_deployment sets max_ongoing())
    # Serve stops routing to a replica after 3 failed checks in a row: at 0.5 s a replica
    # whose rank died answers 503 for ~1.5 s, not ~6 s (the check is one cheap call)
    health_check_period_s=0.5,
    health_check_timeout_s=30.0,
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
    # no access-log line per handle call: CPU in rank 0's process (the router's nginx has
    # the requests' log)
    logging_config={"enable_access_log": False},
)
class EngineDeployment:
    """One engine replica = one TP group. Takes the engine config as plain data."""

    def __init__(self, config: dict[str, Any], use_gpu: bool, cpus_per_rank: float) -> None:
        begun = time.monotonic()
        own_process = engine_process()
        if own_process:  # its fork server imports the engine while this starts
            from replicas.engineproc import start_fork_server

            start_fork_server()
        from cluster.ranks import RankGroup

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        if (ms := switch_interval_ms()) is not None:
            sys.setswitchinterval(ms / 1e3)
        self.times = ReplicaTimes()  # the requests' way to the engine (stats)
        waytrace.install_replica()  # (TPSERVE_WAY_TRACE=1: the way in, hop by hop)
        self.loop_lag = LoopLag(self.times.loop_lag.add)  # (started by the first request)
        # the direct data path's connections to routers, and the requests they head-start
        self.heads = Heads(self._head_start)
        self.outboxes = Outboxes(self.replica_id, self.heads.take)
        # the rank actors first: their processes start (and import torch) meanwhile
        self.ranks = RankGroup(int(config.get("tp", 1)), use_gpu, cpus_per_rank,
                               f"tpserve-{self.replica_id}")
        from replicas import EngineConfig
        from replicas.engineproc import EngineProcess

        self.config = EngineConfig(**{**config, "device": "cuda" if use_gpu else "cpu"})
        self.engine: Engine | EngineProcess
        # where the replica's start went, seconds from its __init__ (stats: replica_start_s)
        self.start_s = {"imports_and_ranks": round(time.monotonic() - begun, 3)}
        if own_process:
            # (its phases counted from this __init__ too: one clock, each figure rounded
            # once, so they keep their order; an offset added to rounded figures once put
            # "ready" 1 ms after "engine")
            self.engine = EngineProcess(self.config, launch=self.ranks.launch,
                                        started_at=begun)
            self.start_s.update({f"engine_process_{k}": v
                                 for k, v in self.engine.start_s.items()})
        else:
            from replicas import Engine

            self.engine = Engine(self.config, launch=self.ranks.launch)
        self.start_s["engine"] = round(time.monotonic() - begun, 3)
        self._publishing = threading.Event()
        url = os.environ.get("TPSERVE_REDIS_URL")
        if url:
            threading.Thread(target=self._publish_stats, args=(url,), daemon=True,
                             name="tpserve-stats").start()

    def _publish_stats(self, url: str) -> None:
        """Every STATS_PERIOD_S: this replica's queue, KV use and tokens/s into Redis,
        for the dashboard. Best effort: a Redis outage only skips beats."""
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        key = keys.stats(self.replica_id)
        last_tokens, last_time = 0, time.monotonic()
        while not self._publishing.wait(STATS_PERIOD_S):
            stats = self.engine.stats()
            now = time.monotonic()
            rate = (stats["tokens_out"] - last_tokens) / (now - last_time)
            last_tokens, last_time = stats["tokens_out"], now
            beat = {"running": stats["running"], "waiting": stats["waiting"],
                    "tp": stats["tp"], "tokens_per_s": round(rate, 1),
                    "kv_used": round(1 - stats["free_kv_blocks"] / stats["num_kv_blocks"], 4),
                    # for infra/load.py: the prefix-cache hit rate
                    "prefix_cache_hit_blocks": stats["prefix_cache_hit_blocks"],
                    "block_size": self.config.block_size}
            try:
                client.set(key, json.dumps(beat), ex=int(5 * STATS_PERIOD_S))
            except redis.RedisError:
                continue

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The wire items (router/wire.py, as dicts) of one wire Request: `serve_request`."""
        self.loop_lag.ensure_started()
        # closed with the stream (a caller gone aborts the request in the engine)
        async with aclosing(serve_request(self.engine, request, self.replica_id,
                                            self.times)) as items:
            async for item in items:
                yield item

    async def deliver(self, request: dict[str, Any], reply: dict[str, Any]) -> int:
        """The direct data path's call (cluster/datapath.py): the same items as
        `generate`, sent to the router's inbox at `reply` instead of through Serve;
        returns how many were sent, once all are written. A request the router
        head-started here already runs: the call awaits that run."""
        head = self.heads.claim(reply)
        if head is not None:
            return await head
        self.times.arrived(reply, waytrace.received_at())
        self.loop_lag.ensure_started()
        return await self._deliver(request, reply, await self.outboxes.get(reply))

    async def _head_start(self, request: dict[str, Any], reply: dict[str, Any],
                          outbox: Outbox) -> int:
        """A request a router sent down its data connection (Heads)."""
        self.times.arrived(reply, None, head=True)
        self.loop_lag.ensure_started()
        return await self._deliver(request, reply, outbox)

    async def _deliver(self, request: dict[str, Any], reply: dict[str, Any],
                       outbox: Outbox) -> int:
        return await deliver(serve_request(self.engine, request, self.replica_id, self.times),
                             outbox, reply["stream"], self.replica_id)

    async def stats(self) -> dict[str, Any]:
        # (off the event loop: from an engine process, a call over its pipe)
        stats = await asyncio.to_thread(self.engine.stats)
        return {"engine_process": None, **stats, **self.times.summary(),
                "head_starts": self.heads.started, "replica": self.replica_id,
                "replica_start_s": self.start_s,
                "max_ongoing": max_ongoing(self.config.max_num_seqs)}

    async def check_health(self) -> None:
        """Serve replaces the replica when this raises: a dead rank, a broken group, an
        engine process gone."""
        if not await asyncio.to_thread(self.engine.healthy):
            raise RuntimeError("engine unhealthy: a rank died, a collective failed or the "
                               "engine process exited")

    def __del__(self) -> None:
        if hasattr(self, "_publishing"):
            self._publishing.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class ServeEngine:
    """The router's engine (router/app.py: EngineClient) over the engine deployment's
    handle: the request goes out with `.options(session_id=key)`, so the deployment's
    request router (cluster/pinning.py) pins it. Never raises for a failed replica: the
    failure is the stream's last item, an ErrorEvent (`error_event`).

    `data_path`: "direct" makes a unary Serve call and takes the items from this
    process's inbox (cluster/datapath.py), listening on `host`; "serve" streams them
    through Serve's handle, one message each."""

    def __init__(self, handle: DeploymentHandle, data_path: str = DATA_PATHS[0],
                 host: str = "127.0.0.1") -> None:
        checked(data_path)
        waytrace.install_router()  # (TPSERVE_WAY_TRACE=1: the way in, hop by hop)
        self.handle = handle.options(stream=True)
        self.unary = handle.options(stream=False)
        self.inbox = Inbox(host, metrics.FRAME_AGE.observe) if data_path == "direct" else None

    async def generate(self, request: wire.Request, session_key: str
                       ) -> AsyncGenerator[wire.Item, None]:
        inbox, stream_id = self.inbox, None
        if inbox is None:  # the items through Serve, a message each
            call = self.handle.options(session_id=session_key).generate.remote(
                request.to_dict())
            items: AsyncIterator[Any] = call
        else:  # a unary call; the items through this process's inbox
            await inbox.start()
            stream_id, stream = inbox.open()
            call = self.unary.options(session_id=session_key).deliver.remote(
                request.to_dict(), {**inbox.reply_to(stream_id), "sent_at": time.time()})
            items = stream.items(asyncio.ensure_future(call))
        ended, lost, clean = False, False, False
        try:
            async for item in items:
                yield wire.decode(item)
            ended = clean = True
        except Exception as e:  # noqa: BLE001 - mapped here, once, for the router
            ended, lost = True, isinstance(e, DataPathError)
            log.warning("engine stream failed: %r", e)
            yield error_event(e)
        finally:
            if inbox is not None and stream_id is not None:
                # (a stream that did not end cleanly cancels its head start, if any: a
                # run no one reads must not go on)
                inbox.close(stream_id, abort=not clean)
            # the router stopped reading (its client went away), or the stream's items
            # were lost while its call may still run: abort
            if lost or not ended:
                call.cancel()


async def deliver(items: AsyncGenerator[dict[str, Any], None], outbox: Outbox, stream: int,
                  replica: str) -> int:
    """Send a request's wire items to `stream` through `outbox`; how many, once all are
    written. A failure goes the same way, after the items before it, as the ErrorEvent
    ServeEngine would make of it (a broken outbox raises: nothing can go through it)."""
    sent = 0
    try:
        async with aclosing(items):
            async for item in items:
                outbox.send(stream, item)
                sent += 1
    except DataPathError:
        raise
    except Exception as e:  # noqa: BLE001 - mapped here, as ServeEngine maps a stream's
        log.warning("request failed on the replica: %r", e)
        outbox.send(stream, error_event(e, replica).to_dict())
        sent += 1
    outbox.end(stream, sent)  # the router ends the stream at it, not at this call's answer
    await outbox.flushed()
    return sent


def engine_deployment(config: EngineConfig, cpus_per_rank: float = 1.0,
                      use_gpu: bool | None = None, num_replicas: int = 1,
                      request_router_class: str | None = None,
                      request_router_kwargs: dict[str, Any] | None = None,
                      gpus_per_rank: float = 1.0) -> Any:
    """The engine deployment bound to `config`, with its placement group of tp bundles.

    `gpus_per_rank` under 1: tp=1 replicas that share a GPU (Ray packs them by the
    fraction), each with a KV pool of a set size (a pool sized from free memory would
    race with the other replicas' starts); a ValueError otherwise."""
    check_gpu_share(config, gpus_per_rank)
    if use_gpu is None:
        use_gpu = config.device == "cuda" or (
            config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    gpus = gpus_per_rank if use_gpu else 0
    bundle = {"CPU": cpus_per_rank, **({"GPU": gpus} if use_gpu else {})}
    return EngineDeployment.options(
        max_ongoing_requests=max_ongoing(config.max_num_seqs),
        ray_actor_options={"num_cpus": cpus_per_rank, "num_gpus": gpus},
        placement_group_bundles=[bundle] * config.tp,
        placement_group_strategy="STRICT_PACK",
        num_replicas=num_replicas,
        **({"request_router_config": RequestRouterConfig(
            request_router_class=request_router_class,
            request_router_kwargs=request_router_kwargs or {})} if request_router_class else {}),
    ).bind(config.to_dict(), use_gpu, cpus_per_rank)


def check_gpu_share(config: EngineConfig, gpus_per_rank: float) -> None:
    """A share of a GPU per rank: (0, 1]; under 1 only for tp=1 (two ranks of one replica
    on one GPU cannot form an NCCL group) with kv_cache_memory or num_kv_blocks set."""
    if not 0 < gpus_per_rank <= 1:
        raise ValueError(f"gpus_per_rank must be in (0, 1], got {gpus_per_rank}")
    if gpus_per_rank == 1:
        return
    if config.tp != 1:
        raise ValueError(f"gpus_per_rank={gpus_per_rank} shares a GPU between replicas: "
                         f"tp=1 only (tp={config.tp} would put two ranks of one replica on "
                         "one GPU)")
    if config.kv_cache_memory is None and config.num_kv_blocks is None:
        raise ValueError(f"gpus_per_rank={gpus_per_rank}: set kv_cache_memory (bytes a "
                         "replica's KV pool takes) or num_kv_blocks; a pool sized from the "
                         "GPU's free memory would take what the other replicas need")
