"""cluster/control.py against a stand-in for Serve's REST API on loopback: the target
everyone shows is Serve's `target_num_replicas`, a scale request returns at once, and a
refused one is an error that says why. No Ray: the CLI and the admin API use this module
without it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from probes import loaded_after

import cluster.control as control
from cluster.control import (
    APP_NAME,
    ENGINE,
    DeploymentState,
    ReplicaState,
    ServeError,
    ServeTimeout,
    deploy,
    deployment_state,
    replicas,
    request_scale,
    scale,
    wait_running,
)


class FakeServe:
    """Serve's REST API as far as control.py reads it: the application status, and the
    scale endpoint (which only records the target, like Serve's controller)."""

    def __init__(self) -> None:
        self.target = 2
        self.states = ["RUNNING", "RUNNING"]
        self.refuse: tuple[int, dict[str, Any]] | None = None
        self.scale_requests: list[dict[str, Any]] = []
        self.app_status = "RUNNING"
        # how many status reads stall: each one is answered only once `released` is set
        # (the fixture's end), so a client's timeout, not a race with a sleep, decides
        self.stall_gets = 0
        self.released = threading.Event()
        self.deploy_s = 0.0  # how long a deploy (PUT) takes to answer
        # how many scale requests stall as the status reads do, and whether Serve takes
        # the stalled ones' targets before (as its controller does when the dashboard is
        # slow to answer) or not at all
        self.stall_posts = 0
        self.take_stalled = True
        self.deployed: list[dict[str, Any]] = []

    def status(self) -> dict[str, Any]:
        reps = [{"replica_id": f"r{i}", "state": s} for i, s in enumerate(self.states)]
        return {"applications": {APP_NAME: {"status": self.app_status, "deployments": {ENGINE: {
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
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a client that timed out and left (the busy-dashboard test)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            assert self.path == "/api/serve/applications/"
            if fake.stall_gets > 0:
                fake.stall_gets -= 1
                fake.released.wait()
            self.answer(200, fake.status())

        def do_PUT(self) -> None:  # noqa: N802
            assert self.path == "/api/serve/applications/"
            fake.deployed.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            time.sleep(fake.deploy_s)
            self.answer(200, {})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == f"/api/v1/applications/{APP_NAME}/deployments/{ENGINE}/scale"
            fake.scale_requests.append(body)
            if fake.refuse is not None:
                self.answer(*fake.refuse)
                return
            if fake.stall_posts > 0:
                fake.stall_posts -= 1
                if fake.take_stalled:
                    fake.target = body["target_num_replicas"]
                fake.released.wait()
                self.answer(200, {})
                return
            fake.target = body["target_num_replicas"]
            self.answer(200, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        fake.released.set()
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
    loaded = loaded_after("import cluster.control, infra.stack", timeout=60)
    assert "cluster" in loaded and not loaded & {"ray", "torch"}, loaded


def test_a_busy_dashboard_is_a_timeout_that_names_it_and_polls_try_again(
        serve: tuple[FakeServe, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A status read the dashboard answers too late is ServeTimeout (a ServeError that
    names the dashboard and the time), not a bare socket error; wait_running and scale
    poll again until their own deadline, and return once an answer comes in time."""
    fake, url = serve
    # (1 s: the reads that are answered must be answered within it on a starved machine;
    # 0.2 s was missed by an unstalled scale request in the fast tier's nice-19 workers)
    monkeypatch.setattr(control, "POLL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(control, "time", SimpleNamespace(monotonic=time.monotonic,
                                                         sleep=lambda s: None))
    fake.stall_gets = 1
    with pytest.raises(ServeTimeout, match=f"dashboard at {url}.* within 1 s"):
        deployment_state(url)
    fake.stall_gets = 2
    wait_running(url, timeout_s=30)
    assert fake.stall_gets == 0  # both stalled reads were tried past, then RUNNING
    fake.stall_gets, fake.app_status = 10**6, "DEPLOYING"
    with pytest.raises(ServeError, match="not RUNNING after 1 s .*status unknown.*within"):
        wait_running(url, timeout_s=1)
    fake.stall_gets = 2
    lines: list[str] = []
    assert [r.replica_id for r in scale(2, url, timeout_s=30, progress=lines.append)] == \
        ["r0", "r1"]
    assert lines[0].startswith("status unknown") and lines[-1] == "2/2 replicas running (2 known)"


def test_a_scale_request_the_dashboard_answers_too_late_reads_where_the_target_stands(
        serve: tuple[FakeServe, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A scale request is one write, not tried again: when the dashboard does not answer
    it within SCALE_TIMEOUT_S, Serve's target is read; the request took if it is the new
    one, else ServeTimeout names the target Serve still has."""
    fake, url = serve
    monkeypatch.setattr(control, "SCALE_TIMEOUT_S", 0.3)
    fake.stall_posts = 1  # Serve takes it, the answer comes too late
    request_scale(3, url)
    assert fake.target == 3 and fake.stall_posts == 0
    fake.stall_posts, fake.take_stalled = 1, False
    with pytest.raises(ServeTimeout, match="within 0.3 s; Serve's target is still 3"):
        request_scale(4, url)
    assert [r["target_num_replicas"] for r in fake.scale_requests] == [3, 4]  # once each


def test_a_deploy_may_take_longer_than_a_poll(
        serve: tuple[FakeServe, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first deploy of a cluster starts Serve before the dashboard answers: deploy
    waits up to DEPLOY_TIMEOUT_S, not a poll's time, and then fails as a ServeTimeout."""
    fake, url = serve
    monkeypatch.setattr(control, "POLL_TIMEOUT_S", 0.2)
    fake.deploy_s = 0.6
    deploy({"applications": []}, url)
    assert fake.deployed == [{"applications": []}]
    monkeypatch.setattr(control, "DEPLOY_TIMEOUT_S", 0.2)
    with pytest.raises(ServeTimeout, match="within 0.2 s"):
        deploy({"applications": []}, url)

