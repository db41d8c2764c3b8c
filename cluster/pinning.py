"""Session pinning inside Ray Serve: the engine deployment's request router.

The router calls the engine handle with `.options(session_id=key)`; Serve hands each
request to `PinnedRouter.choose_replicas` in the caller's process. The pin lives in Redis
(router/sessions.py): a session keeps its replica while that replica lives, also after
scale-up; a session whose replica is gone is re-pinned by rendezvous hashing with bounded
load (router/policy.py), atomically, so routers racing on one session agree. Requests
without a session id go to the less loaded of the candidates.

One Redis round trip per session, not per request: the first request of a session in this
process waits for the claim; later ones go to the replica that claim returned (while it is
live) and refresh the pin in the background (one refresh in flight per session, at most one
every `refresh_s`: one per request cost the router ~0.2 ms of CPU each), which slides its
TTL and brings in a pin another router moved, for the next request. A cached replica that
is gone is never used: that request waits for a new claim. With `routing="random"`
(RouterConfig.routing) every request goes to a uniformly random live replica and no pin
is read or written: the baseline against which infra/load.py measures what pinning buys.

On the direct data path a request whose replica is chosen is also sent down that
replica's data connection at once, ahead of Serve's call (cluster/datapath.py, the head
start); choosing again for it (Serve backing off from a full replica) keeps that replica
while it is a candidate.

Configured with `RequestRouterConfig(request_router_class="cluster.pinning.PinnedRouter",
request_router_kwargs={...})`; the Redis URL comes from TPSERVE_REDIS_URL unless given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

from cluster import datapath
from router import metrics
from router.policy import ROUTING_MODES, choose_replica
from router.sessions import SessionStore, SessionStoreConfig

log = logging.getLogger(__name__)
# TPSERVE_ROUTING_TASKS=N: requests a router process routes at once (0: Serve's own rule,
# twice the replicas up to 50), for measuring (`AB_ROUTING_TASKS=0 bash
# infra/device_stack.sh measure` runs the GPU stack both ways); unset: Serve's cap, 50
ROUTING_TASKS_ENV = "TPSERVE_ROUTING_TASKS"
PIN_CACHE_SIZE = 100_000  # sessions whose pin this process remembers (least recent dropped)
REFRESH_S = 1.0  # s before a cached pin is claimed again (TTL slid, another router's move)


def routing_tasks() -> int | None:
    """TPSERVE_ROUTING_TASKS as a count (0: Serve's own rule; None: unset)."""
    value = os.environ.get(ROUTING_TASKS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{ROUTING_TASKS_ENV}={value}: give a count (0: Serve's own rule)")
    return int(value)


def opens_session(pending_request: PendingRequest | None) -> bool:
    """Whether the request is a chat's first turn: messages, none from the assistant. No
    replica holds a prefix of its conversation yet, so its choice need not wait for its
    Redis claim (PERF.md v0.39: ~30 ms under 64 clients on the CPU stack); a later turn
    waits, as another router may have pinned the session where its history is cached."""
    args = getattr(pending_request, "args", None)
    request = args[0] if args else None
    messages = request.get("messages") if isinstance(request, dict) else None
    return isinstance(messages, list) and not any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


class PinnedRouter(RequestRouter):
    """Routes by the Redis pin of `session_id`, re-pinning only when its replica is gone."""

    def initialize_state(self, redis_url: str | None = None, load_factor: float = 1.25,
                         ttl_s: int = 3600, routing: str = "pinned",
                         refresh_s: float = REFRESH_S, **_: Any) -> None:
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing={routing!r}: use one of {ROUTING_MODES}")
        self.routing = routing
        url = redis_url or os.environ.get("TPSERVE_REDIS_URL") or None
        self.store = SessionStore(SessionStoreConfig(url=url, ttl_s=ttl_s))
        self.store.warm_soon()
        self.load_factor = load_factor
        self.in_flight: Tally[str] = Tally()  # requests this router sent, per replica
        self.refresh_s = refresh_s
        # session -> (replica Redis gave, monotonic time of that claim)
        self.pins: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.refreshing: dict[str, asyncio.Task[str]] = {}  # background claims
        self.routing_tasks = routing_tasks()  # (max_num_routing_tasks)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            metrics.ROUTING.observe(time.time() - pending_request.created_at)
        args = getattr(pending_request, "args", None)
        with metrics.CHOICE.time():
            head = datapath.head_of(args)
            if head is not None:  # chosen before, and already running there
                for replica in candidate_replicas:
                    if replica.replica_id.unique_id == head:
                        return [[replica]]
                datapath.drop_head(args)  # (that replica went: choose again)
            ranks = await self._choose(candidate_replicas, pending_request)
        if ranks and len(ranks[0]) == 1 and datapath.start_head(
                args, ranks[0][0].replica_id.unique_id):
            metrics.HEAD_STARTS.inc()
        return ranks

    async def _choose(self, candidate_replicas: list[RunningReplica],
                      pending_request: PendingRequest | None
                      ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if self.routing == "random":
            return [[random.choice(candidate_replicas)]]
        live = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self.in_flight[rid] for rid in live}
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key:
            return [[live[min(loads, key=loads.__getitem__)]]]
        cached, claimed = self.pins.get(key, ("", 0.0))
        if cached in live:
            if time.monotonic() - claimed >= self.refresh_s:
                self._refresh(key, cached, list(live))
            return [[live[cached]]]
        choice = choose_replica(key, loads, self.load_factor)
        if opens_session(pending_request):  # nothing cached anywhere to lose by not
            self._refresh(key, choice, list(live))  # waiting: its claim runs meanwhile
            return [[live[choice]]]
        pinned = await self._claim(key, choice, live.keys())
        # a pin to a replica this router does not see yet (just started): use the choice
        return [[live.get(pinned, live[choice])]]

    async def _claim(self, key: str, choice: str, live: Collection[str]) -> str:
        """Claim `choice` for `key` in Redis (an existing live pin wins); remember the
        answer unless Redis was away (then it is only the hash's choice)."""
        pinned, moved = await self.store.claim_pin(key, choice, live)
        if moved:
            metrics.PINS_MOVED.inc()
        metrics.DEGRADED.set(1 if self.store.degraded else 0)
        if self.store.degraded:
            self.pins.pop(key, None)
        else:
            self.pins[key] = (pinned, time.monotonic())
            self.pins.move_to_end(key)
            if len(self.pins) > PIN_CACHE_SIZE:
                self.pins.popitem(last=False)
        return pinned

    def _refresh(self, key: str, cached: str, live: list[str]) -> None:
        """The claim of a cached pin (or of a new session's choice), off the request's
        path; one per session at a time."""
        if key in self.refreshing:
            return
        task = asyncio.ensure_future(self._claim(key, cached, live))
        self.refreshing[key] = task

        def done(task: asyncio.Task[str]) -> None:
            self.refreshing.pop(key, None)
            if not task.cancelled() and task.exception() is not None:
                log.warning("refreshing the pin of a session failed: %r", task.exception())

        task.add_done_callback(done)

    @property
    def max_num_routing_tasks(self) -> int:
        """Requests routed at once. Serve's default is twice the replicas, at most 50;
        but a choice here may wait for Redis (a session's first request claims its pin),
        and with one replica two such waits at a time held up every request behind them
        (64 clients on the CPU stack: 30 ms from the handle call to the choice). So
        Serve's cap, unless TPSERVE_ROUTING_TASKS says otherwise (routing_tasks)."""
        wanted = self.routing_tasks
        return super().max_num_routing_tasks if wanted == 0 else (
            wanted or self.max_num_routing_tasks_cap)

    async def _probe_queue_lens(self, replicas: list[RunningReplica], backoff_index: int
                                ) -> list[tuple[RunningReplica, int | None]]:
        """Serve's probe of `replicas`' queue lengths, timed (tpserve_engine_queue_probe_
        seconds). Serve probes before a send when its cache counts the chosen replica full
        or has no count for it, and the request waits for the answer; with one replica a
        choice (ours), that is every probe. Serve's private method (ray 2.60); the override
        only times it."""
        start = time.perf_counter()
        try:
            return await super()._probe_queue_lens(replicas, backoff_index)
        finally:
            if replicas:
                metrics.QUEUE_PROBE.observe(time.perf_counter() - start)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """A request goes to `replica_id` (counted in its load until it completes: Serve
        calls on_request_completed for every request sent, also one the replica refused).
        Not on_request_routed: on a unary call that comes when the call ends."""
        super().on_send_request(replica_id)
        self._count(replica_id.unique_id, +1)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._count(replica_id.unique_id, -1)

    def _count(self, replica: str, change: int) -> None:
        self.in_flight[replica] += change
        metrics.REPLICA_LOAD.labels(replica).set(self.in_flight[replica])
