"""nginx follows Serve's ingress: the edge's upstreams are the router replicas' own HTTP
servers when Serve runs them (direct ingress, cluster/ray.env), else the Serve proxies.

With `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` each replica of the ingress deployment (the
router) serves HTTP itself on a port Serve allocates from a range, besides the path through
Serve's HTTP proxy. Going to it directly saves the proxy hop and the proxy's second call
that hands the request body over (`python -m infra.load --mode overhead`, README). The
ports change whenever a router replica is replaced (a restart, a crash, a redeploy), so
a thread in the actor that owns nginx (infra/services.py) asks Serve's controller for the
ingress targets every POLL_S and, when they change, rewrites nginx.conf and reloads nginx
(SIGHUP: old workers finish their requests, new ones use the new upstreams). A replica
being removed keeps serving for Serve's draining period (30 s by default; 10 s on the
local stack, infra/stack.py's ROUTER_DRAIN_S), far longer than POLL_S. A
new target is taken only once it answers HTTP (Serve reports a replica's port before its
server listens).

Only targets on this node are used, at the host of the configured Serve proxy (Serve binds
both to its `http_options.host`, loopback on a tpserve head); with none there (direct
ingress off, no router replica running here, the app not deployed yet) the edge goes to
the Serve proxies it was started with. While nginx is on the router replicas, the Serve
proxies are its fallback for a request it cannot deliver (a router that has just crashed:
connection refused, or closed before answering): Serve's proxy holds it until a router
replica is up again, where the router's own port would only refuse it.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from infra import nginx

log = logging.getLogger(__name__)

POLL_S = 1.0
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # Serve's feature flag (cluster/ray.env)
_SERVER = re.compile(r"^\s*server\s+(\S+?);", re.MULTILINE)


def ingress_upstreams(groups: Iterable[Any], node_ip: str, host: str,
                      fallback: tuple[str, ...]) -> tuple[str, ...]:
    """HOST:PORT of each HTTP target of the application served at "/" (Serve's
    `TargetGroup`s: the router replicas under direct ingress, the proxies otherwise) that
    runs on `node_ip`, addressed at `host`; `fallback` when there is none."""
    for group in groups:
        if (str(getattr(group.protocol, "value", group.protocol)) == "HTTP"
                and group.app_name and group.route_prefix == "/"):
            ports = sorted({t.port for t in group.targets if t.ip == node_ip})
            if ports:
                return tuple(f"{host}:{port}" for port in ports)
    return fallback


def answers_http(upstream: str, path: str = "/healthz", timeout_s: float = 2.0) -> bool:
    """Whether an HTTP server answers `GET path` at HOST:PORT (any status): a port Serve
    has handed a replica but that it does not serve yet, or lost, is not an upstream."""
    host, _, port = upstream.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def configured_upstreams(path: str | Path) -> list[str]:
    """The servers of the main upstream block (not the fallback) of the nginx.conf at
    `path`: where nginx sends requests now."""
    text = Path(path).read_text()
    block = text[text.index(f"upstream {nginx.UPSTREAM_NAME} {{"):]
    return _SERVER.findall(block[:block.index("}")])


class EdgeFollower:
    """Keeps nginx's upstreams on Serve's ingress targets (see the module docstring).

    `config` is the edge as started (its upstreams are the Serve proxies: the fallback),
    `path` its nginx.conf, `nginx_pid` gives the running nginx master's pid (or None).
    """

    def __init__(self, config: nginx.NginxConfig, path: Path,
                 nginx_pid: Callable[[], int | None]) -> None:
        self.config = config
        self.path = path
        self.nginx_pid = nginx_pid
        self.current = config.upstreams
        self.reloads = 0

    def apply(self, upstreams: tuple[str, ...]) -> bool:
        """Rewrite nginx.conf for `upstreams` and reload nginx; False if nothing changed.
        A config nginx rejects raises NginxError and leaves the running one in place."""
        if upstreams == self.current:
            return False
        proxies = self.config.upstreams  # the fallback while nginx is on the routers
        config = dataclasses.replace(self.config, upstreams=upstreams,
                                     fallback=() if upstreams == proxies else proxies)
        staged = self.path.with_suffix(".next")
        nginx.write(config, staged)
        try:
            nginx.check(staged, self.config.prefix)
        except nginx.NginxError:
            staged.unlink()
            raise
        os.replace(staged, self.path)
        pid = self.nginx_pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)
        self.current = upstreams
        self.reloads += 1
        log.info("edge upstreams now %s", ", ".join(upstreams))
        return True

    def poll_once(self, controller: Any, node_ip: str) -> bool:
        import ray

        groups = ray.get(controller.get_target_groups.remote(), timeout=10 * POLL_S)
        host = self.config.upstreams[0].rpartition(":")[0]
        chosen = ingress_upstreams(groups, node_ip, host, self.config.upstreams)
        ready = tuple(u for u in chosen if u in self.current or answers_http(u))
        return self.apply(ready or self.config.upstreams)

    def _run(self) -> None:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        node_ip = ray.util.get_node_ip_address()
        while True:
            time.sleep(POLL_S)
            try:
                controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
                self.poll_once(controller, node_ip)
            except ValueError:  # no Serve controller yet (the app is deployed later)
                continue
            except Exception:  # a slow controller, a rejected config: keep the last edge
                log.exception("edge: could not follow Serve's ingress targets")

    def start(self) -> None:
        """Follow in a daemon thread, for as long as this process (the Services actor)."""
        threading.Thread(target=self._run, name="tpserve-edge", daemon=True).start()
