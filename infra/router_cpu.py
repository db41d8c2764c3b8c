"""The router's CPU per streamed token: `python -m infra.router_cpu [--tokens N]
[--stack EDGE [--state-dir DIR]]`.

The router replica was the GPU stack's bottleneck (~1 core at 64 clients, issue 19), and
most of its work is per token: reading the engine's wire item, shaping an OpenAI chunk,
writing a server-sent event. This runs the router's real ASGI app (router.app.make_api)
in this process on streamed chat requests, against an engine that answers with plain
tokens as wire dicts decoded as ServeEngine decodes them (router/wire.py, both ends of the
hop, no Ray), and measures the process's CPU time per streamed token: the best of
`--rounds` rounds of `--requests` requests of `--tokens` tokens. Sessions are off (no
Redis). Prints and appends one JSON line.

`--stack EDGE`: the same figure in a running stack (`tpserve up`; EDGE its nginx URL):
`--clients` streaming clients (infra/client.py) for `--duration` seconds through nginx,
and each stack process's CPU seconds per streamed token over the run (the router
replica's, the engine replica's, nginx's, this client's), with the run's tok/s and TTFT
and the `--stream-interval` and `--data-path` the stack was started with (as given here);
and where the router's TTFT went (`inside`: its routing, loop lag and data-path frames'
age over the run, and with `--state-dir` the engine replica's way in, own TTFT, loop lag
and max_ongoing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from cluster.datapath import DATA_PATHS
from cluster.ray_env import deviations
from infra.results import driver_env, emit, environment
from router import wire
from router.app import Router, RouterConfig, make_api

DEFAULT_OUT = "infra/results/router_cpu.jsonl"


class PlainEngine:
    """Answers every request with its max_tokens plain tokens, through the wire's dicts."""

    async def generate(self, request: wire.Request, session_key: str
                       ) -> AsyncGenerator[wire.Item, None]:
        n = request.params["max_tokens"]
        for i in range(n):
            delta = wire.Delta([100 + i], f"w{i} ", "length" if i == n - 1 else None,
                               "replica", 4 if i == 0 else None)
            yield wire.decode(delta.to_dict())


async def stream(app: Any, body: bytes) -> None:
    """One streamed request through the ASGI app, its response read to the end."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    done, sent = asyncio.Event(), False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)


async def measure(tokens: int, requests: int, rounds: int) -> float:
    """Best CPU microseconds per streamed token over `rounds` rounds."""
    router = Router(PlainEngine(), RouterConfig(redis_url="redis://127.0.0.1:1/0"))
    app = make_api(router)
    body = json.dumps({"model": "tpserve", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": tokens, "temperature": 0.8, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    for _ in range(max(1, requests // 5)):  # warm-up: imports, caches
        await stream(app, body)
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            await stream(app, body)
        best = min(best, (time.process_time() - start) / (requests * tokens) * 1e6)
    await router.sessions.close()
    return best


def stack_row(edge: str, clients: int, tokens: int, duration: float, interval: int,
              data_path: str, state_dir: str | None = None) -> dict[str, Any]:
    """CPU seconds per streamed token of each stack process over one load run, and where
    the router's TTFT went (PERF.md v0.34): its histograms' means over the run and, with
    `state_dir` (the stack's: a Ray driver reads the engine replica's stats), the
    replica's own view of its last 512 requests."""
    from dataclasses import asdict

    from cluster.datapath import head_start_on
    from cluster.pinning import routing_tasks
    from infra.client import LoadConfig, run_clients
    from infra.gpu_stack import (
        cpu_seconds,
        means,
        replica_inside,
        replica_stats,
        router_times,
        stack_pids,
    )
    from infra.results import summarize

    warm = LoadConfig(url=edge, clients=4, turns=1, max_tokens=8, duration=5.0,
                      max_requests=20)
    asyncio.run(run_clients(warm, []))
    config = LoadConfig(url=edge, clients=clients, turns=1, max_tokens=tokens, user_words=8,
                        duration=duration, max_requests=100_000, request_timeout=120.0)
    pids = stack_pids()
    before, times = cpu_seconds(pids), router_times(edge)
    records: list[Any] = []
    wall = asyncio.run(run_clients(config, records))
    after = cpu_seconds(pids)
    inside: dict[str, Any] = means(times, router_times(edge))
    inside["routing_tasks"] = routing_tasks()  # (as the stack was started with this env)
    inside["head_start"] = head_start_on()  # (cluster/datapath.py; likewise)
    if state_dir:
        stats = replica_stats(state_dir)
        inside.update(replica_inside(stats), ttft_ms=stats.get("ttft_ms"),
                      max_ongoing=stats.get("max_ongoing"))
    run = summarize(records, wall)
    streamed = run["output_tokens_per_s"] * wall
    per_token = {name: round((after[name] - before.get(name, 0.0)) / streamed * 1e6, 1)
                 for name in ("router", "engine", "nginx", "client") if name in after}
    return {"kind": "router_cpu_stack", "cpu_us_per_token": per_token,
            "tok_s": run["output_tokens_per_s"], "ttft_ms": run["ttft_ms"],
            "cycle_ms": run["cycle_ms"], "requests": run["requests"],
            "failed": run["failed_accepted"],
            "stream_interval": interval, "data_path": data_path, "inside": inside,
            # Serve settings set otherwise than cluster/ray.env (as given to this run)
            "serve_env": deviations(),
            "load_config": asdict(config)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256,
                        help="tokens per request (--stack: 128 is the GPU stack run's)")
    parser.add_argument("--requests", type=int, default=100, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=DEFAULT_OUT, help="append the JSON line here")
    parser.add_argument("--stack", metavar="EDGE", help="measure the running stack at EDGE")
    parser.add_argument("--clients", type=int, default=16, help="--stack: clients")
    parser.add_argument("--duration", type=float, default=25.0, help="--stack: seconds")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="--stack: the stack's --stream-interval, for the record")
    parser.add_argument("--data-path", default=DATA_PATHS[0], choices=DATA_PATHS,
                        help="--stack: the stack's --data-path, for the record")
    parser.add_argument("--state-dir", help="--stack: the stack's state dir (`tpserve up "
                        "--state-dir`): adds the engine replica's stats (its way in, loop "
                        "lag, own TTFT)")
    args = parser.parse_args(argv)
    if args.stack:
        if args.state_dir:
            driver_env()  # (before anything imports Ray)
        emit({**stack_row(args.stack, args.clients, args.tokens, args.duration,
                          args.stream_interval, args.data_path, args.state_dir),
              **environment()}, args.out or None)
        return 0
    us = asyncio.run(measure(args.tokens, args.requests, args.rounds))
    emit({"kind": "router_cpu", "tokens_per_request": args.tokens,
          "cpu_us_per_token": round(us, 2), **environment()}, args.out or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
