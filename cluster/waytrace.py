"""Where a request's way into an engine replica goes, hop by hop (issue 19, PERF.md v0.39):
a measuring aid, off unless TPSERVE_WAY_TRACE=1 in the stack's environment.

The direct data path's call (cluster/engine.py ServeEngine) carries the router's wall
clock at the handle call, `sent_at`, and the replica records the way in from it to
`deliver` (ReplicaTimes.way_in). With the trace on, two more stamps split it:
- `install_router()`, in the router's process: as Serve's request router sends the call
  to the replica it chose (gRPC), the reply dict gets `routed_at`. From `sent_at` to it:
  Serve's routing (its queue of pending requests, our choice of replica with its Redis
  claim, Serve's pick among the choices).
- `install_replica()`, in an engine replica's process: as Serve's gRPC handler takes the
  call, `received_at()` holds the time for the call's task. From `routed_at` to it: the
  way over gRPC, both processes' event loops included; from it to `deliver`: Serve's
  dispatch within the replica.

Both wrap private methods of Ray Serve 2.60 (`gRPCReplicaWrapper.send_request_python`,
`Replica.HandleRequestWithRejection`); where those are missing, install says so in the
log and changes nothing. Serve's transport must be gRPC (cluster/ray.env).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

ENV = "TPSERVE_WAY_TRACE"
_RECEIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tpserve_received_at", default=None)


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def stamp_send(args: tuple[Any, ...]) -> None:
    """A deliver call's reply dict (its last positional argument, with `sent_at`) gets
    `routed_at`, now; other calls are left as they are."""
    if args and isinstance(args[-1], dict) and "sent_at" in args[-1]:
        args[-1]["routed_at"] = time.time()


def received_at() -> float | None:
    """When Serve's gRPC handler took the call this task serves (None: trace off)."""
    return _RECEIVED.get()


def _wrap(module: str, owner_name: str, name: str, make: Any) -> bool:
    """With the trace on, `module.owner_name.name` replaced by `make(it)`, once."""
    if not enabled():
        return False
    try:
        owner = getattr(importlib.import_module(module), owner_name, None)
    except ImportError:
        owner = None
    original = getattr(owner, name, None)
    if original is None:
        log.warning("%s=1 but Serve has no %s.%s here: the way in is not split", ENV,
                    owner_name, name)
        return False
    if getattr(original, "_tpserve_traced", False):
        return True
    wrapped = make(original)
    wrapped._tpserve_traced = True
    setattr(owner, name, wrapped)
    return True


def install_router() -> bool:
    """Stamp `routed_at` on each deliver call Serve sends from this process."""
    def make(send: Any) -> Any:
        @functools.wraps(send)
        def traced(self: Any, pr: Any, *args: Any, **kwargs: Any) -> Any:
            stamp_send(pr.args)
            return send(self, pr, *args, **kwargs)
        return traced

    return _wrap("ray.serve._private.request_router.replica_wrapper", "gRPCReplicaWrapper",
                 "send_request_python", make)


def install_replica() -> bool:
    """Note when Serve's gRPC handler takes each unary call in this process."""
    def make(handle: Any) -> Any:
        @functools.wraps(handle)
        async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            _RECEIVED.set(time.time())
            return await handle(self, *args, **kwargs)
        return traced

    return _wrap("ray.serve._private.replica", "Replica", "HandleRequestWithRejection", make)
