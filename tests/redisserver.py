"""A redis-server of a test's own on loopback (a free port, a password), which the test
may stop and restart; stopped by its pid."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from replicas.ranks import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """A redis-server of the test's own on loopback, which a test may stop and restart."""

    def __init__(self, tls_dir: str | None = None) -> None:
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.tls_dir = tls_dir  # holds cert.pem and key.pem: serve TLS only
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None) -> str:
        if self.tls_dir is None:
            return f"redis://:{password or self.password}@127.0.0.1:{self.port}/0"
        return (f"rediss://:{password or self.password}@127.0.0.1:{self.port}/0"
                f"?ssl_ca_certs={self.tls_dir}/cert.pem")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), decode_responses=True)

    def start(self) -> None:
        port = ["--port", str(self.port)]
        if self.tls_dir is not None:
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                    "--tls-cert-file", f"{self.tls_dir}/cert.pem",
                    "--tls-key-file", f"{self.tls_dir}/key.pem",
                    "--tls-ca-cert-file", f"{self.tls_dir}/cert.pem"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *port, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", self.password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextmanager
def running() -> Iterator[RedisServer]:
    """A started server for a test module's fixture, stopped at the end; the module's
    tests are skipped where redis-server is not installed."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
