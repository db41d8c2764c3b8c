"""infra/nginx.py: the rendered config (text checks, `nginx -t`), validation, the CLI, and
one real run: nginx on loopback in front of two tiny HTTP backends, clients from distinct
source addresses (127.0.0.2..21), each pinned to one backend and seen by its own address.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra import nginx
from infra.nginx import NginxConfig, NginxConfigError, NginxError
from replicas.ranks import free_port

try:
    NGINX = nginx.nginx_binary()
except NginxError:
    NGINX = None
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx binary not found (on PATH or in "
                                 "/usr/sbin); apt-get install nginx to run this test")

UPSTREAMS = ("127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003")


def lines(text: str, directive: str) -> list[str]:
    """The lines of `text` that are the directive `directive` (stripped)."""
    return [ln.strip() for ln in text.splitlines()
            if re.match(rf"\s*{re.escape(directive)}(\s|;)", ln)]


def make(tmp_path: Path, **kw: object) -> NginxConfig:
    return NginxConfig(**{"upstreams": UPSTREAMS, "prefix": str(tmp_path / "nginx"), **kw})


# ---------------------------------------------------------------- rendered text


@pytest.mark.parametrize("n", [1, 2, 5])
def test_one_server_line_per_upstream(tmp_path: Path, n: int) -> None:
    # nginx-config-builder keys directives by name: a second `server` would replace the first
    upstreams = tuple(f"127.0.0.1:{18000 + i}" for i in range(n))
    text = nginx.render(make(tmp_path, upstreams=upstreams))
    assert lines(text, "server") == [*[f"server {u};" for u in upstreams], "server {"]


def test_balance_by_session_by_default_address_or_ip_hash_when_asked(tmp_path: Path) -> None:
    text = nginx.render(make(tmp_path))
    assert lines(text, "hash") == ["hash $http_x_session_id$remote_addr consistent;"]
    assert lines(text, "ip_hash") == []
    text = nginx.render(make(tmp_path, balance="hash"))
    assert lines(text, "hash") == ["hash $remote_addr consistent;"]
    text = nginx.render(make(tmp_path, balance="ip_hash"))
    assert lines(text, "ip_hash") == ["ip_hash;"]
    assert lines(text, "hash") == []


def test_upstream_block_order(tmp_path: Path) -> None:
    # nginx wants the balancing method before `keepalive`
    text = nginx.render(make(tmp_path, keepalive=7))
    block = re.search(r"upstream tpserve_serve \{(.*?)\}", text, re.S)
    assert block is not None
    body = [ln.strip() for ln in block.group(1).strip().splitlines()]
    assert body == ["hash $http_x_session_id$remote_addr consistent;",
                    *[f"server {u};" for u in UPSTREAMS],
                    "keepalive 7;"]


def test_proxy_location(tmp_path: Path) -> None:
    text = nginx.render(make(tmp_path, proxy_read_timeout_s=600, client_max_body_size="4m"))
    assert lines(text, "proxy_pass") == ["proxy_pass http://tpserve_serve;"]
    assert lines(text, "proxy_http_version") == ["proxy_http_version 1.1;"]
    assert lines(text, "proxy_buffering") == ["proxy_buffering off;"]  # SSE
    assert lines(text, "proxy_request_buffering") == ["proxy_request_buffering off;"]
    assert lines(text, "proxy_cache") == ["proxy_cache off;"]
    assert lines(text, "proxy_read_timeout") == ["proxy_read_timeout 600s;"]
    assert lines(text, "proxy_send_timeout") == ["proxy_send_timeout 600s;"]
    assert lines(text, "client_max_body_size") == ["client_max_body_size 4m;"]
    headers = lines(text, "proxy_set_header")
    for header in ['Connection ""', "Host $host", "X-Real-IP $remote_addr",
                   "X-Forwarded-For $proxy_add_x_forwarded_for"]:
        assert f"proxy_set_header {header};" in headers


def test_fallback_takes_nginx_own_502_to_the_serve_proxies(tmp_path: Path) -> None:
    assert lines(nginx.render(make(tmp_path)), "error_page 502") == []  # no fallback: none
    text = nginx.render(make(tmp_path, upstreams=("127.0.0.1:30000",),
                             fallback=("127.0.0.1:8000",)))
    assert lines(text, "proxy_pass") == ["proxy_pass http://tpserve_serve;",
                                         "proxy_pass http://tpserve_fallback;"]
    assert lines(text, "error_page") == ["error_page 413 @too_large;",
                                         "error_page 502 = @serve_proxy;"]
    assert "location @serve_proxy {" in text
    fallback = text[text.index("upstream tpserve_fallback"):]
    assert lines(fallback[:fallback.index("}")], "server") == ["server 127.0.0.1:8000;"]
    # the named location forwards like the main one (SSE unbuffered, client address)
    assert lines(text, "proxy_buffering") == ["proxy_buffering off;"] * 2
    assert lines(text, "proxy_set_header X-Real-IP") == [
        "proxy_set_header X-Real-IP $remote_addr;"] * 2


def test_runs_without_root_paths(tmp_path: Path) -> None:
    config = make(tmp_path, listen="9090")
    text = nginx.render(config)
    assert lines(text, "daemon") == ["daemon off;"]
    assert lines(text, "listen") == ["listen 9090;"]
    paths = re.findall(r"(?:pid|error_log|access_log|_temp_path)\s+(\S+?)[;\s]", text)
    assert len(paths) == 3 + len(nginx.TEMP_PATHS)
    assert all(p.startswith(config.prefix + "/") for p in paths), paths


def test_log_format_before_access_log(tmp_path: Path) -> None:
    # keyword options print before positional ones in nginx-config-builder; nginx needs the
    # format defined before the access_log that names it
    text = nginx.render(make(tmp_path))
    assert text.index("log_format tpserve ") < text.index("access_log ")
    assert lines(text, "access_log")[0].endswith(" tpserve;")


def test_trusted_proxies_enable_realip(tmp_path: Path) -> None:
    assert lines(nginx.render(make(tmp_path)), "set_real_ip_from") == []
    text = nginx.render(make(tmp_path, trusted=("10.0.0.0/8", "192.168.1.7")))
    assert lines(text, "set_real_ip_from") == ["set_real_ip_from 10.0.0.0/8;",
                                               "set_real_ip_from 192.168.1.7;"]
    assert lines(text, "real_ip_header") == ["real_ip_header X-Forwarded-For;"]


@needs_nginx
@pytest.mark.parametrize("kw", [{}, {"balance": "ip_hash", "listen": "[::1]:8080"},
                                {"trusted": ("10.0.0.0/8",), "worker_processes": "2"},
                                {"upstreams": ("localhost:8000",)},
                                {"upstreams": ("127.0.0.1:30000",),
                                 "fallback": ("127.0.0.1:8000",)}])
def test_nginx_accepts_the_config(tmp_path: Path, kw: dict[str, object]) -> None:
    config = make(tmp_path, **kw)
    nginx.check(nginx.write(config, Path(config.prefix) / "nginx.conf"))


@needs_nginx
def test_check_raises_with_nginx_message(tmp_path: Path) -> None:
    config = make(tmp_path)
    path = nginx.write(config, Path(config.prefix) / "nginx.conf")
    path.write_text(path.read_text().replace("proxy_buffering off;", "proxy_buffering sideways;"))
    with pytest.raises(NginxError, match="proxy_buffering"):
        nginx.check(path)


def test_missing_nginx_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(NginxError, match="apt-get install nginx"):
        nginx.nginx_binary()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("kw", "message"), [
    ({"upstreams": ()}, "at least one upstream"),
    ({"upstreams": "127.0.0.1:8000"}, "tuple of strings"),
    ({"upstreams": ("127.0.0.1",)}, "not HOST:PORT"),
    ({"upstreams": ("127.0.0.1:http",)}, "port must be a number"),
    ({"upstreams": ("127.0.0.1:70000",)}, "port must be a number"),
    ({"upstreams": ("bad host:8000",)}, "not HOST:PORT"),
    ({"upstreams": ("a;b:8000",)}, "not HOST:PORT"),
    ({"upstreams": ("127.0.0.1:8000", "127.0.0.1:8000")}, "listed twice"),
    ({"listen": "eighty"}, "port must be a number"),
    ({"listen": "127.0.0.1:"}, "port must be a number"),
    ({"prefix": "relative/dir"}, "absolute directory"),
    ({"prefix": "/tmp/a b"}, "plain path"),
    ({"balance": "round_robin"}, "balance must be one of"),
    ({"client_max_body_size": "1 MB"}, "client_max_body_size"),
    ({"proxy_read_timeout_s": 0}, "positive integer"),
    ({"keepalive": -1}, "positive integer"),
    ({"worker_processes": "many"}, "worker_processes"),
    ({"trusted": ("10.0.0.0/33",)}, "not an IP address or CIDR"),
    ({"fallback": ("127.0.0.1",)}, "fallback '127.0.0.1' is not HOST:PORT"),
])
def test_validation(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    with pytest.raises(NginxConfigError, match=message):
        make(tmp_path, **kw)


def test_lists_become_tuples(tmp_path: Path) -> None:
    config = make(tmp_path, upstreams=["127.0.0.1:8000"], trusted=["10.0.0.0/8"])
    assert config.upstreams == ("127.0.0.1:8000",) and config.trusted == ("10.0.0.0/8",)
    hash(config)


# ---------------------------------------------------------------- CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tpserve")
    nginx.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["nginx", *argv])


def test_cli_prints_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = str(tmp_path / "p")
    args = parse(["--upstream", "127.0.0.1:8000", "--upstream", "127.0.0.1:8001",
                  "--listen", "8081", "--prefix", prefix, "--balance", "ip_hash"])
    assert nginx.run(args) == 0
    expected = NginxConfig(upstreams=("127.0.0.1:8000", "127.0.0.1:8001"), listen="8081",
                           prefix=prefix, balance="ip_hash")
    assert capsys.readouterr().out == nginx.render(expected)


def test_cli_defaults_come_from_the_dataclass(capsys: pytest.CaptureFixture[str]) -> None:
    config = nginx.config_from_args(parse(["--upstream", "127.0.0.1:8000"]))
    defaults = NginxConfig(upstreams=("127.0.0.1:8000",), prefix=config.prefix)
    assert config == defaults and config.prefix.endswith("tpserve-nginx-8080")


def test_cli_bad_upstream_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert nginx.run(parse(["--upstream", "nowhere"])) == 2
    assert "not HOST:PORT" in capsys.readouterr().err


# ---------------------------------------------------------------- nginx for real


class Echo(BaseHTTPRequestHandler):
    """Answers its server's name and the client headers it got; /stream sends two SSE events
    and waits for `server.release` between them; POST answers the body's length."""

    protocol_version = "HTTP/1.1"  # so nginx's upstream keepalive is exercised
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK

    def do_GET(self) -> None:
        if self.path == "/stream":
            return self.stream()
        self.reply({"name": self.server.name,  # type: ignore[attr-defined]
                    "x_real_ip": self.headers.get("X-Real-IP"),
                    "x_forwarded_for": self.headers.get("X-Forwarded-For")})

    def do_POST(self) -> None:
        size = len(self.rfile.read(int(self.headers["Content-Length"])))
        self.reply({"name": self.server.name, "size": size})  # type: ignore[attr-defined]

    def reply(self, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk(b"data: first\n\n")
        self.server.release.wait(timeout=5)  # type: ignore[attr-defined]
        self.chunk(b"data: last\n\n")
        self.chunk(b"")

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def backends() -> Iterator[dict[str, ThreadingHTTPServer]]:
    servers: dict[str, ThreadingHTTPServer] = {}
    for name in ("a", "b"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        server.daemon_threads = True
        server.name = name  # type: ignore[attr-defined]
        server.release = threading.Event()  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers[f"127.0.0.1:{server.server_address[1]}"] = server
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


def wait_listening(port: int, proc: subprocess.Popen[bytes], prefix: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited {proc.returncode}: "
                                 f"{(prefix / 'error.log').read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on 127.0.0.1:{port} within 10 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGQUIT)  # graceful: let workers finish, then exit
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def edge(tmp_path: Path, backends: dict[str, ThreadingHTTPServer]) -> Iterator[int]:
    """nginx on a free loopback port in front of `backends`; yields the port."""
    port = free_port()
    prefix = tmp_path / "nginx"
    config = NginxConfig(upstreams=tuple(backends), listen=f"127.0.0.1:{port}",
                         prefix=str(prefix), worker_processes="1")
    path = nginx.write(config, prefix / "nginx.conf")
    proc = subprocess.Popen(nginx.nginx_command(path, prefix), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc, prefix)
        yield port
    finally:
        stop(proc)


def get(port: int, source: str, path: str = "/", body: bytes | None = None,
        session: str | None = None) -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("POST" if body else "GET", path, body=body,
                     headers={"X-Session-ID": session} if session else {})
        response = conn.getresponse()
        assert response.status == 200, (response.status, response.read())
        return json.loads(response.read())
    finally:
        conn.close()


@needs_nginx
@pytest.mark.slow
def test_sources_stick_to_one_backend(edge: int, backends: dict[str, ThreadingHTTPServer],
                                      ) -> None:
    sources = [f"127.0.0.{i}" for i in range(2, 22)]
    chosen: dict[str, str] = {}
    for source in sources:
        answers = [get(edge, source) for _ in range(5)]
        names = {a["name"] for a in answers}
        assert len(names) == 1, f"{source} reached {names} in 5 requests"
        assert all(a["x_real_ip"] == source for a in answers), answers
        assert all(a["x_forwarded_for"] == source for a in answers), answers
        chosen[source] = names.pop()
    assert set(chosen.values()) == {"a", "b"}, f"one backend got every source: {chosen}"


@needs_nginx
@pytest.mark.slow
def test_the_sessions_of_one_address_spread_and_each_sticks(
        edge: int, backends: dict[str, ThreadingHTTPServer]) -> None:
    """Behind one address (a NAT, a load test on loopback), `hash $remote_addr` sent every
    stream to one router replica; keyed on the session too, the sessions spread over the
    upstreams and each keeps its own."""
    chosen: dict[str, str] = {}
    for i in range(20):
        session = f"session-{i}"
        names = {get(edge, "127.0.0.2", session=session)["name"] for _ in range(3)}
        assert len(names) == 1, f"{session} reached {names} in 3 requests"
        chosen[session] = names.pop()
    assert set(chosen.values()) == {"a", "b"}, f"one backend got every session: {chosen}"


@needs_nginx
@pytest.mark.slow
def test_client_forwarded_for_is_kept_but_real_ip_is_the_socket(edge: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", edge, timeout=5,
                                      source_address=("127.0.0.9", 0))
    try:
        conn.request("GET", "/", headers={"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6"})
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    # no trusted proxies: a client's own X-Real-IP is replaced, its X-Forwarded-For extended
    assert answer["x_real_ip"] == "127.0.0.9"
    assert answer["x_forwarded_for"] == "6.6.6.6, 127.0.0.9"


@needs_nginx
@pytest.mark.slow
def test_request_body_beyond_memory_buffer(edge: int) -> None:
    # > client_body_buffer_size: with request buffering on, nginx (run as root, workers as
    # `nobody`) fails with 500 writing client_body_temp under a 0700 tmp_path
    assert get(edge, "127.0.0.3", body=b"x" * 200_000)["size"] == 200_000


@needs_nginx
@pytest.mark.slow
def test_stream_is_not_buffered(edge: int, backends: dict[str, ThreadingHTTPServer]) -> None:
    # the backend holds the stream open after its first event until we have read that event
    # through nginx: with proxy_buffering on, the event would wait in nginx's buffer
    with socket.create_connection(("127.0.0.1", edge), timeout=3,
                                  source_address=("127.0.0.4", 0)) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        try:
            while b"data: first" not in received:
                data = sock.recv(4096)
                assert data, f"stream closed before the first event: {received!r}"
                received += data
        except TimeoutError:
            raise AssertionError(f"first SSE event not delivered within 3 s (buffered?): "
                                 f"{received!r}") from None
        assert b"data: last" not in received
        for server in backends.values():
            server.release.set()  # type: ignore[attr-defined]
        while data := sock.recv(4096):
            received += data
    assert b"data: last" in received


@needs_nginx
@pytest.mark.slow
def test_a_body_over_the_limit_is_an_openai_413(edge: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", edge, timeout=5)
    try:
        conn.request("POST", "/v1/completions", body=b"x" * (1 << 20 + 1),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, kind, body = response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()
    assert status == 413 and kind == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "1m" in error["message"]
