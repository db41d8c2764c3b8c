"""The overhead mode of infra/load.py (`python -m infra.load --mode overhead`): what
nginx + router add to a 1-token completion, against the engine deployment called directly
through a Serve DeploymentHandle from a Ray driver connected to a local stack (the same hop
the router itself makes). Sequential requests, the paths interleaved call by call."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from infra.results import emit, environment, ms


async def _overhead(edge: str, serve_url: str, router_url: str, calls: int, warmup: int = 20,
                    seed: int = 0) -> dict[str, list[float]]:
    """`calls` sequential 1-token completions per path, interleaved call by call in a
    shuffled order each round (no path always follows another or runs in a burst), after
    `warmup` untimed rounds (connections, imports, the prefix cache). Every path sends the
    same prompt and parameters, and each call is timed the same way: from the call until
    the whole response is read. (The handle is made inside the event loop: Serve may run
    its router on the caller's loop.) `router_url`: the router replica's own HTTP server
    (Serve's direct ingress), where nginx sends requests."""
    from ray import serve

    from cluster.control import APP_NAME, ENGINE

    handle = serve.get_deployment_handle(ENGINE, APP_NAME).options(stream=True)
    body = {"model": "tpserve", "prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0.0}
    request = {"prompt": [5, 6, 7, 8], "params": {"max_tokens": 1, "temperature": 0.0}}
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as http:
        async def post(base: str) -> None:
            async with http.post(f"{base}/v1/completions", json=body,
                                 headers={"X-Session-ID": "overhead-1"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

        async def direct() -> None:
            async for _ in handle.generate.remote(request):
                pass

        paths: dict[str, Callable[[], Awaitable[None]]] = {
            "direct_handle": direct, "nginx_router": lambda: post(edge),
            "router": lambda: post(router_url), "serve_router": lambda: post(serve_url)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(warmup + calls):
            order = list(paths)
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                await paths[name]()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def overhead_mode(calls: int, out: str | None) -> dict[str, Any]:
    """Start a local stack, connect a Ray driver to it, time the paths."""
    import ray

    from infra.edge import configured_upstreams
    from infra.services import nginx_conf
    from infra.stack import local_stack

    with local_stack() as stack:
        stack.connect()
        try:
            upstreams = configured_upstreams(nginx_conf(Path(stack.config.state_dir)))
            serve_url = f"http://127.0.0.1:{stack.config.serve_port}"
            if upstreams == [serve_url.removeprefix("http://")]:
                raise RuntimeError("nginx is on Serve's proxy, not on the router replica: "
                                   "is RAY_SERVE_ENABLE_DIRECT_INGRESS=0 in the environment?")
            times = asyncio.run(_overhead(stack.edge, serve_url, f"http://{upstreams[0]}",
                                          calls))
        finally:
            ray.shutdown()
    row = overhead_row(times)
    emit(row, out)
    return row


def overhead_row(times: dict[str, list[float]]) -> dict[str, Any]:
    """The result line of the overhead mode from each path's call times (seconds)."""
    from cluster.ray_env import ray_env

    p50 = {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
    added = p50["nginx_router"] - p50["direct_handle"]
    row = {"kind": "overhead", "calls_per_path": len(times["direct_handle"]),
           "p50_ms": p50, "p99_ms": {n: ms(t)["p99"] for n, t in times.items()},
           "added_p50_ms": round(added, 3),
           "nginx_p50_ms": round(p50["nginx_router"] - p50["router"], 3),
           "proxy_added_p50_ms": round(p50["serve_router"] - p50["direct_handle"], 3),
           "target_ms": 2.0, "met": added <= 2.0,
           "paths": {"direct_handle": "Ray driver -> DeploymentHandle (PinnedRouter, no "
                     "session) -> engine replica: the hop the router makes itself",
                     "nginx_router": "HTTP -> nginx -> the router replica's own server "
                     "(Serve's direct ingress; FastAPI, Redis pin, validation) -> engine "
                     "replica: the stack's path",
                     "router": "HTTP -> the router replica's own server -> engine replica "
                     "(no nginx)",
                     "serve_router": "HTTP -> Serve's proxy -> router -> engine replica "
                     "(the path without direct ingress)"},
           "serve_env": {k: os.environ.get(k) for k in ray_env()},
           "stack": "local", "model": "tiny", "tp": 2, **environment()}
    return row
