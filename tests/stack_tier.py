"""The whole-stack tier's one stack (tests marked `stack` that take the `shared_stack`
fixture of tests/conftest.py): `tpserve up --detach`, the real CLI, as a user runs it on a
fresh machine (an empty HOME: no Ray token, no model cache, the default state dir), only
the ports not the defaults (free loopback ports), started once per test session and shared
by tests/test_stack.py and tests/test_chaos.py. It starts in the background as soon as the
tests are collected (tests/conftest.py), so its minute of start-up overlaps the tests that
run before the first one that needs it.

Its life in a session (tests/conftest.py orders the tests): the whole-stack tests that
bring their own processes run first, then the tests that only look at the shared stack or
change what they change back (scale 2 -> 3 -> 2), then those that inject faults
(`stack("faults")`, the chaos drill: the stack is whole again after it), and last those
that stop it (`stack("stops")`: `tpserve down`). The fixture stops by pid whatever a
failed or deselected stop left.

A module moves onto it by marking its tests `stack` and taking `shared_stack` instead of
starting a Ray of its own (then leaving tests/conftest.py's STACK_MODULES): nginx is
`running.edge`, Serve's own HTTP proxy `ports["serve"]`, Serve's REST API
`running.ray_dashboard`; the app is cluster/serve.yaml's (the tiny model, tp=2, 2 replicas,
no rate limit), so a test needing other router settings stays in-process. A Ray driver
connects with `infra.load.driver_env()` and the stack's token (`running.home/.ray`); Redis
stops and starts through the services actor as infra/chaos.py does. A test that scales
puts the replica count back; one that kills or stops something is `stack("faults")`.

Every Ray process of this stack carries its admin token in its environment (Ray hands its
environment down to raylet, gcs_server and every worker), so `stack_processes` finds this
stack's Ray and no other Ray on the host.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from replicas.engine import free_port

REPO = Path(__file__).resolve().parent.parent
PORT_FLAGS = ("nginx", "serve", "dashboard", "ray", "redis")
TOKEN_VARIABLE = "TPSERVE_ADMIN_TOKEN"  # infra/stack.py's stack_env


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


def port_flags(ports: dict[str, int]) -> list[str]:
    return [f"--{name}-port={port}" for name, port in ports.items()]


def start(home: Path) -> Running:
    """`tpserve up --detach` in `home` (empty), on free ports; AssertionError with its
    output when it fails."""
    ports = {name: free_port() for name in PORT_FLAGS}
    state = home / ".tpserve" / "stack"  # StackConfig's default state dir, in that HOME
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
    """`start` in a new empty HOME, on a thread of its own."""
    home = Path(tempfile.mkdtemp(prefix="tpserve-test-home-"))
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
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if marker in line and not line.lstrip().startswith("Z") and "ps -eo" not in line]


def stack_processes(token: str) -> list[str]:
    """Command lines of the live processes whose environment holds this stack's admin
    token: its Ray (raylet, gcs_server, the dashboard, every `ray::` worker); never another
    stack's or another Ray's. (Redis and nginx, started by a Ray actor with an environment
    of their own, are not among them.)"""
    wanted = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            if wanted not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if stat[0] != "Z":
            found.append(f"{proc.name} {args.strip()}")
    return found
