"""cluster/control.py against a stand-in for Serve's REST API on loopback: the target
everyone shows is Serve's `target_num_replicas`, a scale request returns at once, and a
refused one is an error that says why. No Ray: the CLI and the admin API use this module
without it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cluster.control import (
    APP_NAME,
    ENGINE,
    DeploymentState,
    ReplicaState,
    ServeError,
    deployment_state,
    replicas,
    request_scale,
)


class FakeServe:
    """Serve's REST API as far as control.py reads it: the application status, and the
    scale endpoint (which only records the target, like Serve's controller)."""

    def __init__(self) -> None:
        self.target = 2
        self.states = ["RUNNING", "RUNNING"]
        self.refuse: tuple[int, dict[str, Any]] | None = None
        self.scale_requests: list[dict[str, Any]] = []

    def status(self) -> dict[str, Any]:
        reps = [{"replica_id": f"r{i}", "state": s} for i, s in enumerate(self.states)]
        return {"applications": {APP_NAME: {"deployments": {ENGINE: {
            "target_num_replicas": self.target, "replicas": reps}}}}}


@pytest.fixture
def serve() -> Iterator[tuple[FakeServe, str]]:
    fake = FakeServe()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            assert self.path == "/api/serve/applications/"
            self.answer(200, fake.status())

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == f"/api/v1/applications/{APP_NAME}/deployments/{ENGINE}/scale"
            fake.scale_requests.append(body)
            if fake.refuse is not None:
                self.answer(*fake.refuse)
                return
            fake.target = body["target_num_replicas"]
            self.answer(200, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_target_is_serves_not_the_running_count(serve: tuple[FakeServe, str]) -> None:
    fake, url = serve
    fake.target, fake.states = 3, ["RUNNING", "RUNNING", "STARTING"]
    state = deployment_state(url)
    assert state == DeploymentState(3, (ReplicaState("r0", "RUNNING"),
                                        ReplicaState("r1", "RUNNING"),
                                        ReplicaState("r2", "STARTING")))
    assert state.running == 2
    assert [r.state for r in replicas(url)] == ["RUNNING", "RUNNING", "STARTING"]


def test_a_scale_request_returns_at_once_and_serve_then_reports_the_target(
        serve: tuple[FakeServe, str]) -> None:
    fake, url = serve
    request_scale(3, url)  # nothing converges in the fake: returning proves it does not wait
    assert fake.scale_requests == [{"target_num_replicas": 3}]
    assert deployment_state(url).target == 3


def test_a_refused_scale_says_why(serve: tuple[FakeServe, str]) -> None:
    fake, url = serve
    fake.refuse = (412, {"error": "external scaler disabled"})
    with pytest.raises(ServeError, match="external scaler disabled.*external_scaler_enabled"):
        request_scale(3, url)
    fake.refuse = (500, {"error": "controller gone"})
    with pytest.raises(ServeError, match="controller gone"):
        request_scale(3, url)
    with pytest.raises(ServeError, match=">= 0"):
        request_scale(-1, url)
    assert deployment_state(url).target == 2


def test_no_dashboard_is_an_error_that_names_it() -> None:
    with pytest.raises(ServeError, match="cannot reach the Ray dashboard"):
        deployment_state("http://127.0.0.1:9")  # discard port: nothing listens


def test_control_imports_neither_ray_nor_torch() -> None:
    code = ("import sys, cluster.control, infra.stack; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
