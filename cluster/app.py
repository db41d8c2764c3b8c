"""The Serve application, composed: the router (router/app.py) as the HTTP ingress in front
of the engine deployment (cluster/engine.py), whose request router (cluster/pinning.py)
pins sessions.

This is where the router meets Ray: the ingress deployment gives the router its engine
(`ServeEngine`, over the engine deployment's handle) and its control of the cluster
(`ServeControl`, over Serve's REST API), and serves the router's FastAPI app as the
replica's ASGI app. The router itself imports no Ray.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.control import (
    APP_NAME,
    DEFAULT_DASHBOARD,
    ENGINE,
    ServeError,
    ServeTimeout,
    deployment_state,
    request_scale,
)
from cluster.datapath import DATA_PATHS, checked
from cluster.engine import ServeEngine, engine_deployment
from router.admin import ControlError, ControlTimeout, DeploymentStatus, ReplicaStatus
from router.app import Router, RouterConfig, make_api

PINNED_ROUTER = "cluster.pinning.PinnedRouter"


class ServeControl:
    """The router's Control (router/admin.py) over Serve's REST API on the Ray dashboard:
    Serve's own target, replicas and status, and its scale endpoint."""

    def __init__(self, dashboard: str = DEFAULT_DASHBOARD, app: str = APP_NAME,
                 deployment: str = ENGINE) -> None:
        self.dashboard, self.app, self.deployment_name = dashboard, app, deployment

    async def deployment(self) -> DeploymentStatus:
        try:
            state = await asyncio.to_thread(deployment_state, self.dashboard, self.app,
                                            self.deployment_name)
        except ServeError as e:
            raise ControlError(str(e)) from e
        replicas = tuple(ReplicaStatus(r.replica_id, r.state) for r in state.replicas)
        return DeploymentStatus(state.target, replicas, state.status, state.message)

    async def request_scale(self, target: int) -> None:
        try:
            await asyncio.to_thread(request_scale, target, self.dashboard, self.app,
                                    self.deployment_name)
        except ServeTimeout as e:
            raise ControlTimeout(str(e)) from e
        except ServeError as e:
            raise ControlError(str(e)) from e


# no Serve access-log line per request: nginx's access log has every request (status,
# upstream, times), and Serve's line cost the router ~0.13 ms of CPU per request (py-spy)
@serve.deployment(name="Router", max_ongoing_requests=1024,
                  logging_config={"enable_access_log": False})
@serve.ingress()
class RouterDeployment:
    """A router replica: the router over the engine deployment's handle."""

    def __init__(self, engine: DeploymentHandle, config: dict[str, Any] | None = None,
                 data_path: str = DATA_PATHS[0]) -> None:
        router_config = RouterConfig(**(config or {}))
        # the direct data path's inbox listens where this node's replicas reach it
        host = ray.util.get_node_ip_address() if data_path == "direct" else "127.0.0.1"
        self.router = Router(ServeEngine(engine, data_path, host), router_config,
                             ServeControl(router_config.ray_dashboard))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.router)


def build(args: dict[str, Any]) -> Any:
    """Application builder (`import_path: cluster.app:build`): the router in front of the
    engine deployment, whose request router pins sessions.

    args: {"engine": EngineConfig fields, "cpus_per_rank": float, "gpus_per_rank": float
    (under 1: tp=1 replicas sharing GPUs), "num_replicas": int,
    "router": RouterConfig fields, "data_path": "direct" | "serve" (cluster/datapath.py's
    DATA_PATHS)}; a config file's `deployments:` section overrides num_replicas /
    autoscaling_config.
    """
    from replicas import EngineConfig  # (the build task's process; never a router replica)

    data_path = checked(str(args.get("data_path", DATA_PATHS[0])))
    config = EngineConfig(**(args.get("engine") or {}))
    router_config = RouterConfig(**(args.get("router") or {}))
    engine = engine_deployment(
        config, float(args.get("cpus_per_rank", 1.0)),
        num_replicas=int(args.get("num_replicas", 1)),
        request_router_class=PINNED_ROUTER,
        request_router_kwargs={"routing": router_config.routing},
        gpus_per_rank=float(args.get("gpus_per_rank", 1.0)),
    )
    return RouterDeployment.bind(engine, asdict(router_config), data_path)
