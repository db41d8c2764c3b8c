"""The client of Serve's REST API on the Ray dashboard: deploy a config, read the
replicas, scale. Scaling goes through Ray Serve, never a process manager of our own.

`request_scale()` asks Serve's REST API on the Ray dashboard
(`POST /api/v1/applications/{app}/deployments/{dep}/scale`, which needs
`external_scaler_enabled: true` in the application's config); `scale()` (`tpserve scale
N`) then watches `GET /api/serve/applications/` until exactly the target number of
replicas is RUNNING and no replica is left stopping. The admin API only requests: the
dashboard follows Serve's progress. Serve drains a replica it removes: it takes no new
requests and gets `graceful_shutdown_timeout_s` to finish those it accepted. The target
that everyone shows is Serve's own (`deployment_state()`: `target_num_replicas`), never a copy
kept by a router replica.

`deploy()` is `serve deploy` with overrides (ports, engine options) applied to the YAML,
so scripts need no edited copies of cluster/serve.yaml.

Ray 2.5x clusters use token auth by default; requests carry the token as Ray's own
clients do.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.ray_token import read_token

# the Serve application and its engine deployment, by name (here, not in cluster/engine.py,
# so that the CLI reads and scales them without importing Ray or torch)
APP_NAME = "tpserve"
ENGINE = "Engine"
ROUTER = "Router"  # the router's deployment (cluster/app.py)
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class ServeError(RuntimeError):
    """Serve refused a deploy or a scale, or it did not finish; the message says why."""


class DeployFailed(ServeError):
    """Serve gave up deploying the application (DEPLOY_FAILED); the message is Serve's."""


class ServeTimeout(ServeError):
    """The Ray dashboard took longer than the request's timeout to answer (a busy head
    node); a poll may try again."""


# how long one request to the dashboard may take: a status poll, a scale request (a write:
# it waits for Serve's controller, and is not tried again), and a deploy (the first PUT of
# a cluster starts Serve's controller and proxies before it answers, which on a busy
# 2-core head took longer than a poll's 10 s)
POLL_TIMEOUT_S = 10.0
SCALE_TIMEOUT_S = 30.0
DEPLOY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ReplicaState:
    replica_id: str
    state: str  # STARTING | RUNNING | STOPPING | ...


def ray_auth_headers() -> dict[str, str]:
    """The Authorization header for a Ray cluster with token auth (Ray's default for local
    clusters since 2.5x), with the token Ray's own clients send (cluster/ray_token.py).
    Empty when there is none."""
    token = read_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _request(url: str, body: dict[str, Any] | None = None, timeout: float | None = None,
             method: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a request to Serve's REST API. ServeError when the dashboard
    cannot be reached, ServeTimeout when it does not answer within `timeout` (default
    POLL_TIMEOUT_S)."""
    timeout = POLL_TIMEOUT_S if timeout is None else timeout
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **ray_auth_headers()}
    method = method or ("POST" if body is not None else "GET")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"error": text}
    except (urllib.error.URLError, TimeoutError) as e:  # (a read that timed out is a bare
        reason = getattr(e, "reason", e)                 # TimeoutError, not a URLError)
        if isinstance(reason, TimeoutError):
            raise ServeTimeout(f"the Ray dashboard at {url} did not answer within "
                               f"{timeout:g} s") from e
        raise ServeError(f"cannot reach the Ray dashboard at {url}: {reason}; is Ray running "
                         "there?") from e


def load_config(path: str | Path, http_host: str | None = None, http_port: int | None = None,
                engine: dict[str, Any] | None = None, num_replicas: int | None = None,
                router: dict[str, Any] | None = None,
                router_replicas: int | None = None, data_path: str | None = None,
                gpus_per_rank: float | None = None) -> dict[str, Any]:
    """A Serve config file with overrides: HTTP host/port, EngineConfig fields, the
    engine's replica count, RouterConfig fields, the router's replica count, the way
    the engine's items come back to it (cluster/app.py: build's data_path) and the share
    of a GPU each rank takes."""
    with open(path) as f:
        config = yaml.safe_load(f)
    http = config.setdefault("http_options", {})
    if http_host is not None:
        http["host"] = http_host
    if http_port is not None:
        http["port"] = http_port
    for app in config.get("applications", []):
        if app.get("name") != APP_NAME:
            continue
        args = app.setdefault("args", {})
        args.setdefault("engine", {}).update(engine or {})
        if router:
            args["router"] = {**(args.get("router") or {}), **router}
        if data_path is not None:
            args["data_path"] = data_path
        if gpus_per_rank is not None:
            args["gpus_per_rank"] = gpus_per_rank
        for name, count in ((ENGINE, num_replicas), (ROUTER, router_replicas)):
            if count is None:
                continue
            deployments = app.setdefault("deployments", [])
            dep = next((d for d in deployments if d.get("name") == name), None)
            if dep is None:
                deployments.append(dep := {"name": name})
            dep["num_replicas"] = count
    return config


def deploy(config: dict[str, Any], dashboard: str = DEFAULT_DASHBOARD) -> None:
    """Submit a Serve config (as `serve deploy` does); Serve then converges to it. The
    dashboard may take up to DEPLOY_TIMEOUT_S to accept it (it starts Serve first)."""
    status, body = _request(f"{dashboard}/api/serve/applications/", config,
                            timeout=DEPLOY_TIMEOUT_S, method="PUT")
    if status != 200:
        raise ServeError(f"Serve refused the config ({status}): {body}")


def app_status(dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME) -> str | None:
    """The application's status as Serve reports it now (None: not reported); DeployFailed,
    with Serve's message, when Serve gave up deploying it (a deployment's replicas failed
    to start again and again, e.g. their constructor raised). ServeError when Serve's API
    cannot be reached."""
    status, body = _request(f"{dashboard}/api/serve/applications/")
    found = (body or {}).get("applications", {}).get(app, {}) if status == 200 else {}
    if found.get("status") == "DEPLOY_FAILED":
        why = [f"{name}: {d['message']}" for name, d in found.get("deployments", {}).items()
               if d.get("status") != "HEALTHY" and d.get("message")]
        raise DeployFailed("\n".join([f"Serve could not deploy {app}: "
                                      f"{found.get('message', '')}", *why]))
    return found.get("status")


def wait_running(dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
                 timeout_s: float = 600.0) -> None:
    """Wait until the application is RUNNING (all its deployments healthy). A poll the
    dashboard is too busy to answer in time is tried again until `timeout_s`; DeployFailed
    and an unreachable dashboard end the wait at once."""
    deadline = time.monotonic() + timeout_s
    state: str | None = None
    while True:
        try:
            if (state := app_status(dashboard, app)) == "RUNNING":
                return
        except ServeTimeout as e:
            state = f"unknown: {e}"
        if time.monotonic() > deadline:
            raise ServeError(f"{app} not RUNNING after {timeout_s:.0f} s (status {state})")
        time.sleep(1.0)


@dataclass(frozen=True)
class DeploymentState:
    """A deployment as Serve reports it: the replica count it is converging to (set by the
    config, `tpserve scale`, the admin API or an autoscaler) and its replicas now."""

    target: int
    replicas: tuple[ReplicaState, ...]
    status: str = ""  # Serve's: HEALTHY | UPDATING | UPSCALING | UNHEALTHY | ...
    message: str = ""  # why, when it is not healthy (a replica that fails to start, ...)

    @property
    def running(self) -> int:
        return sum(r.state == "RUNNING" for r in self.replicas)


def deployment_state(dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
                     deployment: str = ENGINE) -> DeploymentState:
    """The deployment's target and replicas from Serve's status (one GET): every reader
    (the dashboard, /admin/replicas, `tpserve status`) sees the same target."""
    status, body = _request(f"{dashboard}/api/serve/applications/")
    if status != 200:
        raise ServeError(f"Serve status unavailable ({status}): {body}")
    try:
        dep = body["applications"][app]["deployments"][deployment]
    except (KeyError, TypeError) as e:
        raise ServeError(f"no deployment {app}/{deployment} is running") from e
    states = tuple(ReplicaState(r["replica_id"], r["state"]) for r in dep.get("replicas", []))
    return DeploymentState(int(dep["target_num_replicas"]), states,
                           str(dep.get("status") or ""), str(dep.get("message") or ""))


def replicas(dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
             deployment: str = ENGINE) -> list[ReplicaState]:
    """The deployment's replicas as Serve reports them now."""
    return list(deployment_state(dashboard, app, deployment).replicas)


def request_scale(target: int, dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
                  deployment: str = ENGINE) -> None:
    """Ask Serve to run `target` replicas of the deployment and return at once (Serve
    converges in the background; `deployment_state()` shows its progress). ServeError when Serve
    refuses, e.g. the application was deployed without external_scaler_enabled. When the
    dashboard does not answer within SCALE_TIMEOUT_S, Serve's target is read once: the
    request took if it is `target`, else ServeTimeout says the target it still has (a
    request that timed out may yet be taken)."""
    if target < 0:
        raise ServeError(f"target must be >= 0, got {target}")
    try:
        status, body = _request(
            f"{dashboard}/api/v1/applications/{app}/deployments/{deployment}/scale",
            {"target_num_replicas": target}, timeout=SCALE_TIMEOUT_S)
    except ServeTimeout as e:
        try:
            now = deployment_state(dashboard, app, deployment).target
        except ServeError:
            now = None
        if now == target:
            return
        still = "unknown" if now is None else str(now)
        raise ServeTimeout(f"{e}; Serve's target is still {still}, and the request may yet "
                           f"be taken (Serve's status shows the target)") from e
    if status == 412:
        raise ServeError(f"Serve refused to scale: {body.get('error', body)} (deploy the app "
                         "with external_scaler_enabled: true)")
    if status != 200:
        raise ServeError(f"Serve refused to scale ({status}): {body}")


def scale(target: int, dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
          deployment: str = ENGINE, timeout_s: float = 600.0,
          progress: Callable[[str], None] | None = None) -> list[ReplicaState]:
    """Set the number of engine replicas and wait until Serve runs exactly that many.

    Returns the RUNNING replicas. Raises ServeError when Serve refuses (e.g. the
    application was deployed without external_scaler_enabled) or on timeout; a poll the
    dashboard is too busy to answer in time is tried again until then.
    """
    request_scale(target, dashboard, app, deployment)
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            now: list[ReplicaState] | None = replicas(dashboard, app, deployment)
        except ServeTimeout as e:  # a busy dashboard: poll again until the deadline
            now, line = None, f"status unknown: {e}"
        if now is not None:
            running = [r for r in now if r.state == "RUNNING"]
            line = f"{len(running)}/{target} replicas running ({len(now)} known)"
        if progress is not None and line != last:
            progress(line)
            last = line
        if now is not None and len(running) == target and len(now) == target:
            return running
        if time.monotonic() > deadline:
            raise ServeError(f"timed out after {timeout_s:.0f} s: {line}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.control deploy CONFIG [--http-port P] [--engine-json J]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.control")
    parser.add_argument("command", choices=["deploy"])
    parser.add_argument("config")
    parser.add_argument("--dashboard", default=DEFAULT_DASHBOARD)
    parser.add_argument("--http-host")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--engine-json", default="{}", help="EngineConfig fields to override")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.http_host, args.http_port, json.loads(args.engine_json))
    deploy(config, args.dashboard)
    wait_running(args.dashboard, timeout_s=args.timeout_s)
    print(f"{APP_NAME} is RUNNING")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
