"""The router's HTTP app served by uvicorn on a free loopback port, in a thread of the
test process, over a real tiny engine in the same process (the engine deployment's own
request code, cluster/requests.py: serve_request): what a real HTTP client talks to,
without Ray or nginx. Stopped by `stop()` (uvicorn's should_exit)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

import uvicorn

from replicas.ranks import free_port
from router import wire
from router.app import Router, RouterConfig, make_api


class LocalEngine:
    """The router's engine over a real replicas.Engine in this process."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def generate(self, request: wire.Request, session_key: str
                       ) -> AsyncGenerator[wire.Item, None]:
        from cluster.requests import error_event, serve_request

        try:
            async for item in serve_request(self.engine, request.to_dict(), "local"):
                yield wire.decode(item)
        except Exception as e:  # noqa: BLE001 - as ServeEngine maps it
            yield error_event(e)


class RouterServer:
    """uvicorn serving a Router over `engine` on 127.0.0.1:`port` (and `control`, the
    admin API's cluster, router/admin.py's Control, when given)."""

    def __init__(self, engine: Any, redis_url: str, control: Any = None, **config: Any
                 ) -> None:
        self.port = free_port()
        self.router = Router(LocalEngine(engine), RouterConfig(redis_url=redis_url, **config),
                             control)
        self.server = uvicorn.Server(uvicorn.Config(
            make_api(self.router), host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="off"))
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        async def serve() -> None:
            try:
                await self.server.serve()
            finally:
                await self.router.sessions.close()

        asyncio.run(serve())

    def start(self) -> RouterServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the router did not start listening within 30 s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
