"""nginx following Serve's ingress targets (infra/edge.py): the pure choice of upstreams
with tiny fakes of Serve's TargetGroup, and a real nginx reloaded onto a new upstream."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from types import SimpleNamespace

import pytest

from infra import nginx
from infra.edge import EdgeFollower, answers_http, configured_upstreams, ingress_upstreams
from infra.services import wait_for_port
from replicas.ranks import free_port

PROXY = ("127.0.0.1:8000",)


def group(app: str, route: str, *targets: tuple[str, int], protocol: str = "HTTP"
          ) -> SimpleNamespace:
    return SimpleNamespace(protocol=SimpleNamespace(value=protocol), app_name=app,
                           route_prefix=route,
                           targets=[SimpleNamespace(ip=ip, port=port) for ip, port in targets])


def test_the_router_replicas_of_this_node_at_the_proxy_host() -> None:
    groups = [group("tpserve", "/", ("10.0.0.5", 30001), ("10.0.0.9", 30000),
                    ("10.0.0.5", 30000))]
    assert ingress_upstreams(groups, "10.0.0.5", "127.0.0.1", PROXY) == (
        "127.0.0.1:30000", "127.0.0.1:30001")


def test_the_serve_proxies_when_no_router_replica_runs_here() -> None:
    assert ingress_upstreams([], "10.0.0.5", "127.0.0.1", PROXY) == PROXY
    other_node = [group("tpserve", "/", ("10.0.0.9", 30000))]
    assert ingress_upstreams(other_node, "10.0.0.5", "127.0.0.1", PROXY) == PROXY
    # direct ingress off: Serve reports its proxies (app_name ""), nginx keeps its own list
    proxies = [group("", "/", ("10.0.0.5", 8000))]
    assert ingress_upstreams(proxies, "10.0.0.5", "127.0.0.1", PROXY) == PROXY


def test_only_http_targets_of_the_app_at_the_root() -> None:
    groups = [group("tpserve", "/", ("10.0.0.5", 40000), protocol="gRPC"),
              group("other", "/other", ("10.0.0.5", 30002)),
              group("tpserve", "/", ("10.0.0.5", 30000))]
    assert ingress_upstreams(groups, "10.0.0.5", "127.0.0.1", PROXY) == ("127.0.0.1:30000",)


class Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def backend(name: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Named)
    server.name = name  # type: ignore[attr-defined]
    Thread(target=server.serve_forever, daemon=True).start()
    return server


def answer(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_a_target_is_an_upstream_once_it_answers_http() -> None:
    server = backend("router")
    try:
        assert answers_http(f"127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert not answers_http(f"127.0.0.1:{server.server_port}")  # nothing listens now
    with socket.socket() as raw:  # listens, answers no HTTP (e.g. a gRPC port)
        raw.bind(("127.0.0.1", 0))
        raw.listen()
        port = raw.getsockname()[1]

        def garbage() -> None:
            conn, _ = raw.accept()
            conn.sendall(bytes(range(1, 40)))
            conn.close()

        Thread(target=garbage, daemon=True).start()
        assert not answers_http(f"127.0.0.1:{port}", timeout_s=5)


@pytest.mark.skipif(shutil.which("nginx") is None and shutil.which("nginx", path=nginx.SBIN_DIRS)
                    is None, reason="nginx is not installed")
def test_a_real_nginx_is_reloaded_onto_the_new_upstreams(tmp_path: Path) -> None:
    proxy, router = backend("proxy"), backend("router")  # Serve's proxy, a router replica
    listen = free_port()
    config = nginx.NginxConfig(upstreams=(f"127.0.0.1:{proxy.server_port}",),
                               listen=f"127.0.0.1:{listen}", prefix=str(tmp_path / "nginx"))
    path = nginx.write(config, tmp_path / "nginx" / "nginx.conf")
    proc = subprocess.Popen(nginx.nginx_command(path, config.prefix))
    try:
        wait_for_port("127.0.0.1", listen)
        edge = EdgeFollower(config, path, lambda: proc.pid)
        url = f"http://127.0.0.1:{listen}/"
        assert answer(url) == "proxy"
        assert not edge.apply(config.upstreams)  # unchanged: no rewrite, no reload
        new = (f"127.0.0.1:{router.server_port}",)
        assert edge.apply(new) and edge.reloads == 1
        assert configured_upstreams(path) == list(new)
        deadline, streak = time.monotonic() + 10, 0
        while streak < 10:  # the old workers finish (one may still accept for a moment)
            streak = streak + 1 if answer(url) == "router" else 0
            assert time.monotonic() < deadline, "nginx never moved to the new upstream"
            time.sleep(0.02)
        with pytest.raises(nginx.NginxError):  # a config nginx rejects is not installed
            edge.apply(("no-such-host.invalid:30000",))  # nginx -t: host not found
        assert configured_upstreams(path) == list(new) and edge.current == new
        assert answer(url) == "router"
        router.shutdown()  # the router replica crashes: its port refuses connections
        router.server_close()
        assert answer(url) == "proxy"  # nginx's own 502 goes to the fallback, Serve's proxy
        assert "connect() failed" in (tmp_path / "nginx" / "error.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        proxy.shutdown()
        router.shutdown()
