"""The whole-stack tier's one stack (tests marked `stack` that take the `shared_stack`
fixture of tests/conftest.py): `tpserve up --detach`, the real CLI, as a user runs it on a
fresh machine (an empty HOME: no Ray token, no model cache, the default state dir), only
the ports not the defaults (free loopback ports), started once per test session and shared
by tests/test_stack.py and tests/test_chaos.py. It starts in the background as soon as the
tests are collected (tests/conftest.py), so its minute of start-up overlaps the tests that
run before the first one that needs it.

Its life in a session (tests/conftest.py orders the tests): first the tests that only look
at the shared stack or change what they change back (scale 2 -> 3 -> 2), then those that
inject faults (`stack("faults")`, the chaos drill: the stack is whole again after it), and
last those that stop it (`stack("stops")`: `tpserve down`). The whole-stack tests that
start a Ray of their own (`ray up`, Ctrl-C, a Ray dying at start) run after that, so no two
Rays start at once. The session's end stops by pid whatever a failed or deselected stop
left.

A module moves onto it by marking its tests `stack` and taking `shared_stack` instead of
starting a Ray of its own (then leaving tests/conftest.py's STACK_MODULES): nginx is
`running.edge`, Serve's own HTTP proxy `ports["serve"]`, Serve's REST API
`running.ray_dashboard`; the app is cluster/serve.yaml's (the tiny model, tp=2, 2 replicas,
no rate limit), so a test needing other router settings stays in-process. A test process
becomes a Ray driver of it with `connect_driver` (the stack's token, loopback, cluster/ray.env;
a module fixture, `disconnect_driver` after: no driver may outlive the stack into the
`stops` phase); Redis stops and starts through the services actor as infra/chaos.py does
(`stop_redis`, `start_redis`). A test that scales, kills or stops something is
`stack("faults")` and leaves the stack whole (`wait_whole`: the replicas back, Redis back,
the target back). tests/test_router.py and tests/test_cluster.py moved this way.

Every Ray process of this stack carries its admin token in its environment (Ray hands its
environment down to raylet, gcs_server and every worker), so `stack_processes` finds this
stack's Ray and no other Ray on the host.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra import procs
from infra.procs import STACK_PORTS, processes
from replicas.ranks import free_ports

REPO = Path(__file__).resolve().parent.parent
PORT_FLAGS = STACK_PORTS  # `tpserve up --<name>-port`


def tpserve(*args: str, timeout: float = 600, home: Path | None = None
            ) -> subprocess.CompletedProcess:
    """`tpserve ARGS` (this interpreter's), with HOME=home when given."""
    env = {**os.environ, "HOME": str(home)} if home else None
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Running:
    """A stack started by `start`: its ports, HOME, state dir, admin token and what `up`
    printed."""

    ports: dict[str, int]
    home: Path
    state: Path
    token: str
    output: str

    @property
    def edge(self) -> str:
        return f"http://127.0.0.1:{self.ports['nginx']}"

    @property
    def ray_dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def redis_password(self) -> str:
        return (self.state / "redis.pass").read_text().strip()  # infra/services.py's


def port_flags(ports: dict[str, int]) -> list[str]:
    return [f"--{name}-port={port}" for name, port in ports.items()]


def start(home: Path) -> Running:
    """`tpserve up --detach` in `home` (empty), on free ports; AssertionError with its
    output when it fails. (`up` itself starts Ray again when Ray's start timed out, as CI's
    busy machine made it: infra.stack.start_ray_head.)"""
    state = home / ".tpserve" / "stack"  # StackConfig's default state dir, in that HOME
    ports = free_ports(PORT_FLAGS)
    up = tpserve("up", "--detach", *port_flags(ports), home=home)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    token = (state / "admin_token").read_text()
    return Running(ports, home, state, token, up.stdout)


def stop(running: Running) -> None:
    """`tpserve down` when the stack is still recorded (a test that should have stopped it
    failed, or was not selected)."""
    if (running.state / "stack.json").exists():
        tpserve("down", f"--state-dir={running.state}", timeout=180, home=running.home)


@dataclass
class Starting:
    """A stack being started by a thread (`start_in_background`)."""

    home: Path
    future: concurrent.futures.Future[Running]

    def running(self) -> Running:
        """The stack once it is up (re-raises why it could not start)."""
        return self.future.result(timeout=900)


def start_in_background() -> Starting:
    """`start` in a new empty HOME, on a thread of its own. The HOME is added to the file
    TPSERVE_TEST_STACKS names, if set: infra/test.sh stops a stack left there by a test
    run that could not clean up (a crashed or killed pytest)."""
    home = Path(tempfile.mkdtemp(prefix="tpserve-test-home-"))
    record = os.environ.get("TPSERVE_TEST_STACKS")
    if record:
        with open(record, "a") as f:
            f.write(f"{home}\n")
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shared-stack")
    future = pool.submit(start, home)
    pool.shutdown(wait=False)
    return Starting(home, future)


def stop_in_background(starting: Starting) -> None:
    """Stop a stack from `start_in_background` (waiting for its start to end first: a start
    cut short cleans up after itself) and remove its HOME."""
    try:
        concurrent.futures.wait([starting.future], timeout=900)
        if starting.future.done() and starting.future.exception() is None:
            stop(starting.future.result())
    finally:
        shutil.rmtree(starting.home, ignore_errors=True)


def live_processes(marker: str) -> list[str]:
    """Non-zombie processes whose command line mentions `marker`."""
    return [f"{pid} {args}" for pid, args in processes() if marker in args]


def stack_processes(token: str) -> list[str]:
    """"PID command line" of this stack's live Ray processes (infra/procs.py); never
    another stack's or another Ray's."""
    return [f"{pid} {args}" for pid, args in procs.stack_processes(token)]


# ---- a Ray driver on the shared stack (tests/test_router.py, tests/test_cluster.py) ----


def connect_driver(running: Running, env: pytest.MonkeyPatch) -> None:
    """Connect this process to the shared stack's Ray as a driver, the way
    infra.load.driver_env() sets one up (loopback, token auth, cluster/ray.env's Serve
    settings) with the stack's token (its HOME's .ray/auth_token; cluster.control's REST
    calls read it too). `env` holds the variables set: undo it after `ray.shutdown()`.
    Ray reads its auth mode and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when first imported (by a
    test module, before this): its config is read again from the environment (what Ray's
    own tests do) and the constant is set as the variable says (else Ray turns 127.0.0.1
    into the host's address, where the stack does not listen)."""
    import ray
    import ray._private.ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    from cluster.ray_env import ray_env

    for name, value in {**ray_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN_PATH": str(running.home / ".ray" / "auth_token")
                        }.items():
        env.setenv(name, value)
    env.delenv("RAY_AUTH_TOKEN", raising=False)
    env.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    reset_auth_token_state()
    ray.init(address=f"127.0.0.1:{running.ports['ray']}", log_to_driver=False)


def disconnect_driver(env: pytest.MonkeyPatch) -> None:
    """`ray.shutdown()`, then the environment as it was before `connect_driver`. Ray's
    cached auth token is left as it is (`connect_driver` reads it again): a GCS request of
    the driver still being retried after `ray.shutdown()` (its reply comes late on a busy
    machine) then still carries the token. Reset here, the retry went out without one,
    was refused (Unauthenticated), and Ray's check on it aborted the test process: the
    whole-stack tier's pytest ended with exit 1 and no summary, one second after a module's
    `ray.shutdown()` (the driver's log, python-core-driver-*.log, showed the failed check)."""
    import ray

    ray.shutdown()
    env.undo()


def stop_redis(running: Running) -> None:
    """Stop the stack's Redis (SIGTERM, through the services actor, as infra/chaos.py
    does); needs a connected driver."""
    import ray

    from infra.services import ACTOR_NAME, NAMESPACE

    ray.get(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE).stop.remote("redis"))


def start_redis(running: Running) -> None:
    """Start the stack's Redis again (it reloads its append-only file) and record its new
    pid, so that `tpserve down` stops this one."""
    import ray

    from infra.services import ACTOR_NAME, NAMESPACE, wait_for_port
    from infra.stack import read_state, write_state

    pid = ray.get(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE).start.remote("redis"))
    record = read_state(str(running.state))
    record["services"]["redis"] = pid
    write_state(running.state, record)
    wait_for_port("127.0.0.1", running.ports["redis"])


def healthy(running: Running) -> bool:
    """The router answers /healthz through nginx with status ok (Redis up)."""
    try:
        with urllib.request.urlopen(f"{running.edge}/healthz", timeout=10) as resp:
            return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
    except OSError:
        return False


def wait_whole(running: Running, replicas: int = 2, gone: str = "",
               timeout_s: float = 300) -> None:
    """Wait until the stack is whole again after a fault (as infra/chaos.py's drill does):
    exactly `replicas` engine replicas, all RUNNING, none of them `gone` (a killed one,
    which Serve lists as RUNNING until it notices), and the router healthy on Redis;
    AssertionError with what Serve reports when it is not by `timeout_s`."""
    from cluster.control import ReplicaState, ServeError
    from cluster.control import replicas as engine_replicas

    deadline = time.monotonic() + timeout_s
    now: list[ReplicaState] = []
    while time.monotonic() < deadline:
        try:
            now = engine_replicas(running.ray_dashboard)
        except (ServeError, OSError):
            now = []
        if (len(now) == replicas and all(r.state == "RUNNING" for r in now)
                and gone not in {r.replica_id for r in now} and healthy(running)):
            return
        time.sleep(0.5)
    raise AssertionError(f"the shared stack is not whole after {timeout_s:.0f} s: {now}")
