"""Scaling the engine replicas through Ray Serve, never a process manager of our own.

`scale()` asks Serve's REST API on the Ray dashboard
(`POST /api/v1/applications/{app}/deployments/{dep}/scale`, which needs
`external_scaler_enabled: true` in the application's config) and then watches
`GET /api/serve/applications/` until exactly the target number of replicas is RUNNING and
no replica is left stopping. Serve drains a replica it removes: it takes no new requests
and gets `graceful_shutdown_timeout_s` to finish those it accepted. The admin API and
`tpserve scale N` both call this function.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.app import APP_NAME, ENGINE

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class ScaleError(RuntimeError):
    """Scaling was refused or did not finish; the message says why."""


@dataclass(frozen=True)
class ReplicaState:
    replica_id: str
    state: str  # STARTING | RUNNING | STOPPING | ...


def ray_auth_headers() -> dict[str, str]:
    """The Authorization header for a Ray cluster with token auth (Ray's default for local
    clusters since 2.5x): the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token, as Ray's own clients look for it. Empty when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0
             ) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **ray_auth_headers()}
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text}


def replicas(dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
             deployment: str = ENGINE) -> list[ReplicaState]:
    """The deployment's replicas as Serve reports them now."""
    status, body = _request(f"{dashboard}/api/serve/applications/")
    if status != 200:
        raise ScaleError(f"Serve status unavailable ({status}): {body}")
    try:
        dep = body["applications"][app]["deployments"][deployment]
    except (KeyError, TypeError) as e:
        raise ScaleError(f"no deployment {app}/{deployment} is running") from e
    return [ReplicaState(r["replica_id"], r["state"]) for r in dep.get("replicas", [])]


def scale(target: int, dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
          deployment: str = ENGINE, timeout_s: float = 600.0,
          progress: Callable[[str], None] | None = None) -> list[ReplicaState]:
    """Set the number of engine replicas and wait until Serve runs exactly that many.

    Returns the RUNNING replicas. Raises ScaleError when Serve refuses (e.g. the
    application was deployed without external_scaler_enabled) or on timeout.
    """
    if target < 0:
        raise ScaleError(f"target must be >= 0, got {target}")
    status, body = _request(
        f"{dashboard}/api/v1/applications/{app}/deployments/{deployment}/scale",
        {"target_num_replicas": target},
    )
    if status == 412:
        raise ScaleError(f"Serve refused to scale: {body.get('error', body)} (deploy the app "
                         "with external_scaler_enabled: true)")
    if status != 200:
        raise ScaleError(f"Serve refused to scale ({status}): {body}")
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        now = replicas(dashboard, app, deployment)
        running = [r for r in now if r.state == "RUNNING"]
        line = f"{len(running)}/{target} replicas running ({len(now)} known)"
        if progress is not None and line != last:
            progress(line)
            last = line
        if len(running) == target and len(now) == target:
            return running
        if time.monotonic() > deadline:
            raise ScaleError(f"timed out after {timeout_s:.0f} s: {line}")
        time.sleep(0.5)
