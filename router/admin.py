"""The admin API (the dashboard's): the engine replicas as Serve reports them, and scaling.

Routes (Authorization: Bearer TPSERVE_ADMIN_TOKEN; 401 without it, and while the token
is unset the admin API is off):
- GET /admin/replicas -> {target, serve: {status, message}, ray_dashboard, time,
  replicas: [...], totals}: the target and the replicas are Serve's own (whoever set them:
  `tpserve scale`, this API, a config), each replica with the stats it publishes in Redis
  and its session count. Serve's status and message say how a scale goes, and why it fails.
- POST /admin/scale {"replicas": N} -> 202 {"target": N}: one request to Serve, which
  converges by itself (seen in GET /admin/replicas); 400 for a bad N, 502 when Serve
  refuses the request, 504 when it does not answer in time (the target may yet change).

The router knows no Ray: it reads and scales the cluster through a `Control`, which the
cluster injects (cluster/app.py: ServeControl, over Serve's REST API).
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from router.errors import ApiError
from router.sessions import SessionStore


class ControlError(RuntimeError):
    """The cluster refused a request or did not answer; the message says why."""


class ControlTimeout(ControlError):
    """The cluster did not answer in time: the request may yet take effect."""


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    state: str  # STARTING | RUNNING | STOPPING | ...


@dataclass(frozen=True)
class DeploymentStatus:
    """The engine deployment as the cluster reports it."""

    target: int  # the replica count it converges to
    replicas: tuple[ReplicaStatus, ...]
    status: str = ""  # e.g. HEALTHY | UPDATING | UPSCALING | UNHEALTHY | DEPLOY_FAILED
    message: str = ""  # why, when it is not healthy


class Control(Protocol):
    """What the admin API needs of the cluster."""

    async def deployment(self) -> DeploymentStatus:
        """The engine deployment now; ControlError when the cluster does not answer."""
        ...

    async def request_scale(self, target: int) -> None:
        """Ask for `target` engine replicas and return at once; ControlError if refused."""
        ...


class Admin:
    """The admin routes' handlers, over a Control and the session store."""

    def __init__(self, control: Control | None, sessions: SessionStore, token: str | None,
                 max_replicas: int, ray_dashboard: str, totals: dict[str, Any]) -> None:
        self.control, self.sessions, self.token = control, sessions, token
        self.max_replicas, self.ray_dashboard, self.totals = max_replicas, ray_dashboard, totals

    async def replicas(self, request: Request) -> Response:
        if (denied := self.deny(request)) is not None:
            return denied
        try:
            state = await self._control().deployment()
        except ControlError as e:
            return ApiError(503, str(e), "replica_unavailable").response()
        stats = await self.sessions.replica_stats()
        sessions = await self.sessions.sessions_per_replica()
        rows = [self._row(r, stats.get(r.replica_id, {}), sessions.get(r.replica_id, 0))
                for r in state.replicas]
        return JSONResponse({"target": state.target, "max_replicas": self.max_replicas,
                             "serve": {"status": state.status, "message": state.message},
                             "ray_dashboard": self.ray_dashboard, "time": time.time(),
                             "replicas": rows, "totals": self.totals})

    @staticmethod
    def _row(replica: ReplicaStatus, beat: dict[str, Any], sessions: int) -> dict[str, Any]:
        return {"id": replica.replica_id, "state": replica.state, "tp": beat.get("tp"),
                "running": beat.get("running"), "waiting": beat.get("waiting"),
                "kv_used": beat.get("kv_used"), "tokens_per_s": beat.get("tokens_per_s"),
                "prefix_cache_hit_blocks": beat.get("prefix_cache_hit_blocks"),
                "block_size": beat.get("block_size"), "sessions": sessions}

    async def scale(self, request: Request) -> Response:
        if (denied := self.deny(request)) is not None:
            return denied
        try:
            target = json.loads(await request.body())["replicas"]
        except (ValueError, KeyError, TypeError):
            target = None
        if not isinstance(target, int) or isinstance(target, bool) or not (
                1 <= target <= self.max_replicas):
            return ApiError(400, f"replicas must be an integer in [1, {self.max_replicas}]",
                            param="replicas").response()
        try:  # one request; Serve converges by itself, seen in GET /admin/replicas
            await self._control().request_scale(target)
        except ControlTimeout as e:
            return ApiError(504, f"Serve did not answer in time: {e}",
                            "scale_timeout").response()
        except ControlError as e:
            return ApiError(502, f"Serve did not take the new target: {e}",
                            "scale_failed").response()
        return JSONResponse({"target": target}, 202)

    def _control(self) -> Control:
        if self.control is None:
            raise ControlError("this router has no cluster control")
        return self.control

    def deny(self, request: Request) -> Response | None:
        """401 unless the request carries the admin token (compared in constant time)."""
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if self.token is None:
            return ApiError(401, "the admin API is off: start the router with "
                            "TPSERVE_ADMIN_TOKEN set", "authentication_error").response()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return ApiError(401, "missing or wrong admin token", "authentication_error",
                            headers={"WWW-Authenticate": "Bearer"}).response()
        return None
