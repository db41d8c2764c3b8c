"""The local stack: `tpserve up` / `tpserve down` / `tpserve status`.

`up` starts, on loopback: a Ray head (`ray start --head --block`, one process group we
own, with the Ray dashboard), Redis and nginx under a Ray actor (infra/services.py: they
die with Ray), and the Serve app of cluster/serve.yaml (router + engine replicas), then
waits until Serve reports it RUNNING and prints the URLs and the admin token. Without
--detach it stays in the foreground until Ctrl-C and then stops everything; with
--detach, `tpserve down` does it later, by the pid recorded in the state file.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.control import (
    DeployFailed,
    ServeError,
    app_status,
    deploy,
    load_config,
    ray_auth_headers,
    replicas,
)
from cluster.datapath import DATA_PATHS
from cluster.ray_env import ray_env
from cluster.ray_token import ensure_token
from infra.edge import DIRECT_INGRESS_ENV, configured_upstreams
from infra.procs import ADMIN_TOKEN_ENV, STACK_PORTS
from infra.ray_start import (
    RAY_START_ATTEMPTS,
    RAY_START_TIMED_OUT,
    ray_program,
    starting_again,
)
from router.policy import RATE_LIMIT_PER_MINUTE, ROUTING_MODES, SESSION_POLICIES

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE = Path.home() / ".tpserve" / "stack"


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says what to do."""


def auto_router_replicas(cores: int | None = None) -> int:
    """Router replicas for a stack that does not say: one per 4 cores (`cores`, else this
    machine's), at least 1 and at most 4. Each streams on one event loop, ~1 core at 64
    clients on an H200; with 4 on the H200 host's 16 cores against 1, 64 streaming clients
    got 0.931 of the engine's tok/s against 0.869, TTFT p50 +55 ms against +73 (PERF.md
    v0.51). A 2-core machine keeps one."""
    return max(1, min(4, (cores if cores is not None else os.cpu_count() or 1) // 4))


@dataclass(frozen=True)
class StackConfig:
    """Ports and sizes of the local stack; each default exists here once."""

    nginx_port: int = 8080
    serve_port: int = 8000
    dashboard_port: int = 8265
    ray_port: int = 6379
    redis_port: int = 6380  # Ray's head takes 6379
    replicas: int = 2
    # the router's event loop is one core: more share the streams. Unset: one per 4 cores
    # of this machine, up to 4 (auto_router_replicas)
    router_replicas: int | None = None
    data_path: str = DATA_PATHS[0]  # cluster/app.py's build: direct | serve
    # logical CPUs Ray may hand out (the TP ranks' bundles, one per router replica).
    # Unset: 7 + the router replicas (two tp=2 CPU replicas and a third while scaling)
    num_cpus: int | None = None
    # each rank's share of a GPU; under 1, tp=1 replicas share GPUs (cluster/engine.py)
    gpus_per_rank: float = 1.0
    state_dir: str = str(DEFAULT_STATE)
    timeout_s: float = 600.0
    routing: str = ROUTING_MODES[0]  # RouterConfig.routing: pinned | random (the baseline)
    sessions: str = SESSION_POLICIES[0]  # RouterConfig.sessions: on_use | always
    rate_limit_per_minute: int = RATE_LIMIT_PER_MINUTE  # per client key; 0: no limit

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise StackError(f"routing={self.routing!r}: use one of {ROUTING_MODES}")
        if self.sessions not in SESSION_POLICIES:
            raise StackError(f"sessions={self.sessions!r}: use one of {SESSION_POLICIES}")
        if self.data_path not in DATA_PATHS:
            raise StackError(f"data_path={self.data_path!r}: use one of {DATA_PATHS}")
        if not 0 < self.gpus_per_rank <= 1:
            raise StackError(f"gpus_per_rank must be in (0, 1], got {self.gpus_per_rank}")
        if self.router_replicas is None:
            object.__setattr__(self, "router_replicas", auto_router_replicas())
        if self.router_replicas < 1:
            raise StackError(f"router_replicas must be >= 1, got {self.router_replicas}")
        if self.num_cpus is None:
            object.__setattr__(self, "num_cpus", 7 + self.router_replicas)
        if self.rate_limit_per_minute < 0:
            raise StackError(f"rate_limit_per_minute must be >= 0 (0: no limit), got "
                             f"{self.rate_limit_per_minute}")
        names: dict[int, list[str]] = {}
        for name, port in self.ports.items():
            names.setdefault(port, []).append(name)
        shared = [f"{' and '.join(n)} both on {port}" for port, n in names.items() if len(n) > 1]
        if shared:
            raise StackError(f"one port for two servers: {'; '.join(shared)}. Give each its "
                             "own (--nginx-port, --serve-port, --dashboard-port, --ray-port, "
                             "--redis-port)")

    @property
    def router(self) -> dict[str, Any]:
        """The RouterConfig fields this stack sets."""
        return {"ray_dashboard": self.ray_dashboard, "routing": self.routing,
                "sessions": self.sessions, "rate_limit_per_minute": self.rate_limit_per_minute}

    @property
    def ports(self) -> dict[str, int]:
        return {"nginx": self.nginx_port, "Serve HTTP": self.serve_port,
                "Ray dashboard": self.dashboard_port, "Ray GCS": self.ray_port,
                "Redis": self.redis_port}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}/v1"

    @property
    def ray_dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def preflight(config: StackConfig) -> None:
    """Missing programs and busy ports, as errors that say what to do."""
    for program in ("redis-server", "nginx", ray_program()):
        if not (shutil.which(program) or os.path.exists(f"/usr/sbin/{program}")):
            raise StackError(f"{program} is not installed: run `bash infra/install.sh`, "
                             "which installs redis-server and nginx with apt-get and Ray "
                             "into .venv")
    busy = [f"{name} port {port}" for name, port in config.ports.items() if port_busy(port)]
    if busy:
        raise StackError(f"busy: {', '.join(busy)}. Stop what uses it (or an earlier "
                         "`tpserve up --detach`: `tpserve down`), or pick other ports "
                         "(--nginx-port, --serve-port, --dashboard-port, --ray-port, "
                         "--redis-port)")


def up(engine: dict[str, Any], config: StackConfig, detach: bool) -> int:
    preflight(config)
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ensure_token()  # Ray's token auth refuses to start without one (a fresh HOME has none)
    token = secrets.token_urlsafe(24)
    env = stack_env(config, state, token)
    # SIGTERM (a supervisor, `timeout`, `kill`) stops the stack as Ctrl-C does, also while
    # it starts: nothing is left running, whichever comes when
    if threading.current_thread() is threading.main_thread():  # (where Python allows it)
        signal.signal(signal.SIGTERM, _interrupted)
    record: dict[str, Any] = {"pid": None, "services": {}, "config": asdict(config),
                              "engine": engine}
    try:
        ray = start_ray_head(config, state, env, record)
        start(engine, config, state, env, ray, record)
    except BaseException:
        if record["pid"] is not None:
            stop(record, config)
        clear_state(state)  # a failed start leaves no stack behind for `status` / `down`
        raise
    (state / "admin_token").write_text(token)
    os.chmod(state / "admin_token", 0o600)
    print(f"\ntpserve is up\n  API:            {config.api_url}\n"
          f"  dashboard:      http://127.0.0.1:{config.nginx_port}/dashboard\n"
          f"  Ray dashboard:  {config.ray_dashboard}\n  admin token:    {token}\n")
    if detach:
        print("detached; stop it with `tpserve down`")
        return 0
    # a shell that starts us in the background (`tpserve up &` in a script, a CI runner)
    # hands SIGINT down ignored, and Python then installs no KeyboardInterrupt for it:
    # the line below promises that Ctrl-C (a SIGINT) stops the stack, so take it back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # from here on, Ctrl-C (also one landing during the print) stops the stack
        print("Ctrl-C stops everything (so does SIGTERM)", flush=True)
        ray.wait()
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        stop(record, config)
        clear_state(state)
    return 0


def start_ray(config: StackConfig, state: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --head --block` in a process group of its own, output to state/ray.log."""
    with open(state / "ray.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [ray_program(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(config.ray_port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(config.dashboard_port), "--num-cpus",
             str(config.num_cpus), "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_ray_head(config: StackConfig, state: Path, env: dict[str, str],
                   record: dict[str, Any]) -> subprocess.Popen:
    """start_ray, then wait until Ray's dashboard and Serve's REST API answer. A start that
    timed out (RAY_START_TIMED_OUT in Ray's log: infra/ray_start.py says why) is stopped
    and made again, up to RAY_START_ATTEMPTS in all, saying so; `record`'s pid (and
    state_dir's record) is each attempt's Ray head as soon as it runs. StackError, with the
    end of Ray's log, when Ray dies otherwise, times out every time, or runs and does not
    answer."""
    log = state / "ray.log"
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        ray = start_ray(config, state, env)
        record["pid"] = ray.pid
        write_state(state, record)
        try:
            progress("starting Ray",
                     lambda: port_busy(config.dashboard_port) and serve_api_up(config), 120,
                     failed=functools.partial(ray_died, ray, log))
            return ray
        except StackError as e:
            if ray.poll() is None:  # alive but not answering: what it last said
                raise StackError(f"{e}; the end of {log}:\n{log_tail(log)}") from None
            timed_out = RAY_START_TIMED_OUT in log.read_text(errors="replace")
            if not timed_out or attempt == RAY_START_ATTEMPTS:
                raise
        stop(record, config)  # what is left of its process group
        print(f"  {starting_again(attempt + 1)}", flush=True)
    raise AssertionError("unreachable")


# what a Ray that died at start most often says in its log, and what to do about it
RAY_FIXES = (
    (RAY_START_TIMED_OUT.lower(), f"Ray's processes were too slow to start, "
     f"{RAY_START_ATTEMPTS} times (Ray's raylet waits 15 s for its dashboard agent): run "
     "`tpserve up` again when the machine is less busy"),
    ("authentication token", "Ray's token auth found no token: make one with `ray "
     "get-auth-token --generate` (it goes to ~/.ray/auth_token; RAY_AUTH_TOKEN_PATH names "
     "another file), then `tpserve up` again"),
    ("address already in use", "a port is taken: stop what uses it or pick other ports "
     "(--ray-port, --dashboard-port)"),
)


def ray_died(ray: subprocess.Popen, log: Path, lines: int = 15) -> str | None:
    """None while the Ray head runs; once it has exited, a message with the last `lines`
    lines of its log and the fix for what they say."""
    code = ray.poll()
    if code is None:
        return None
    text = log.read_text(errors="replace") if log.exists() else ""
    fix = next((f for cause, f in RAY_FIXES if cause in text.lower()),
               f"fix what its log says ({log}), then `tpserve up` again")
    return f"Ray exited (status {code}); the end of {log}:\n{log_tail(log, lines)}\n  fix: {fix}"


def log_tail(log: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log, indented; empty when there is none."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


# How long Serve keeps a removed router replica (a redeploy, a scale-down) serving on its
# direct-ingress port, so that the load balancer in front can stop sending to it first.
# Serve's default, 30 s, is sized for an external balancer's deregistration; ours is nginx
# on the same node, which infra/edge.py moves onto the new router replicas within about
# its POLL_S (1 s) of Serve reporting them. The chaos drill's graceful router restart
# (infra/chaos.py, `router`: the old replica gone, the new one serving) took 30.3 s with
# Serve's default here, 10.3 s with this, and no request failed either way.
ROUTER_DRAIN_S = 10.0


def stack_env(config: StackConfig, state: Path, token: str) -> dict[str, str]:
    """The environment of Ray's processes: loopback only, token auth, Redis and the admin
    token for the router (never printed by Ray; the token is printed once by `up`), no
    drain on SIGTERM, a removed router replica held open ROUTER_DRAIN_S, and the Serve
    settings of cluster/ray.env (a variable already in the environment wins over those
    three)."""
    from infra.services import redis_url  # imports Ray: only when a stack starts

    # one node: draining it on SIGTERM (Ray waits up to 30 s for its Serve replicas to move)
    # has nowhere to move them to, so Ctrl-C and `tpserve down` stop at once
    return {**ray_env(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(ROUTER_DRAIN_S), **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "TPSERVE_REDIS_URL": redis_url(state, "127.0.0.1", config.redis_port),
            ADMIN_TOKEN_ENV: token}


def _interrupted(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C; a second one is ignored, so that the stop it began finishes."""
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def start(engine: dict[str, Any], config: StackConfig, state: Path, env: dict[str, str],
          ray: subprocess.Popen, record: dict[str, Any]) -> None:
    """Services and the Serve app on Ray once it answers (start_ray_head); the services'
    pids go into `record` (and state_dir) as soon as they run, so that a `tpserve up`
    killed meanwhile leaves them to `tpserve down`. Every wait ends at once, with Ray's
    log, when the Ray head exits."""
    died = functools.partial(ray_died, ray, state / "ray.log")
    proxy = f"127.0.0.1:{config.serve_port}"  # nginx's upstream until it follows the router
    services = subprocess.run(
        [sys.executable, "-m", "infra.services", "up", "--state", str(state), "--bind",
         "127.0.0.1", "--redis-port", str(config.redis_port), "--nginx-listen",
         f"127.0.0.1:{config.nginx_port}", "--upstream", proxy,
         "--ray-address", f"127.0.0.1:{config.ray_port}"],
        env=env, capture_output=True, text=True)
    if services.returncode != 0:
        tail = "\n".join(services.stderr.rstrip().splitlines()[-15:])
        raise StackError(f"Redis and nginx did not start (python -m infra.services exited "
                         f"with {services.returncode}):\n{tail}")
    record["services"] = json.loads(services.stdout.strip().splitlines()[-1])
    write_state(state, record)
    print("  Redis and nginx up")
    serve_config = load_config(REPO / "cluster/serve.yaml", "127.0.0.1", config.serve_port,
                               engine, config.replicas, config.router,
                               config.router_replicas, config.data_path,
                               config.gpus_per_rank)
    deploy(serve_config, config.ray_dashboard)
    progress(f"deploying {config.replicas} engine replicas",
             lambda: app_running(config), config.timeout_s,
             lambda: replica_line(config), failed=lambda: died() or deploy_failed(config))
    if env.get(DIRECT_INGRESS_ENV) == "1":
        from infra.services import nginx_conf

        progress("nginx on the router replicas",
                 lambda: configured_upstreams(nginx_conf(state)) != [proxy], 30, failed=died)


def serve_api_up(config: StackConfig) -> bool:
    try:
        req = urllib.request.Request(f"{config.ray_dashboard}/api/serve/applications/",
                                     headers=ray_auth_headers())
        with urllib.request.urlopen(req, timeout=2):
            return True
    except OSError:
        return False


def app_running(config: StackConfig) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{config.nginx_port}/healthz",
                                    timeout=2) as resp:
            healthy = resp.status == 200
    except (OSError, http.client.HTTPException):  # nginx moving onto the router replicas
        return False
    try:
        running = [r for r in replicas(config.ray_dashboard) if r.state == "RUNNING"]
    except (ServeError, OSError, http.client.HTTPException):  # Serve's API slow to answer
        return False
    return healthy and len(running) == config.replicas


def deploy_failed(config: StackConfig) -> str | None:
    """Serve's message once it gave up deploying the app (a replica's constructor raised
    on each of its tries), with where the replicas' logs are; None while it still tries
    (or its API is slow to answer)."""
    try:
        app_status(config.ray_dashboard)
    except DeployFailed as e:
        return (f"{e}\n(each replica's log, its traceback among it: "
                "/tmp/ray/session_latest/logs/serve/replica_*.log)")
    except (ServeError, OSError, http.client.HTTPException):
        pass
    return None


def replica_line(config: StackConfig) -> str:
    try:
        now = replicas(config.ray_dashboard)
    except (ServeError, OSError, http.client.HTTPException):  # (a busy machine: a timeout)
        return "waiting for Serve"
    return f"{sum(r.state == 'RUNNING' for r in now)}/{config.replicas} replicas running"


def progress(what: str, done: Callable[[], bool], timeout_s: float,
             detail: Callable[[], str] | None = None,
             failed: Callable[[], str | None] | None = None) -> None:
    """Print `what` and the changing `detail()` until `done()`; StackError on timeout, or
    at once with `failed()`'s message when that says something went wrong."""
    print(f"  {what}…", flush=True)
    deadline, last = time.monotonic() + timeout_s, ""
    while not done():
        if failed is not None and (why := failed()):
            raise StackError(f"{what}: {why}")
        line = detail() if detail is not None else ""
        if line and line != last:
            print(f"    {line}", flush=True)
            last = line
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(0.25)  # each look is a local HTTP call or two


def stop(record: dict[str, Any], config: StackConfig, timeout_s: float = 60.0) -> None:
    """Stop nginx and Redis gracefully by pid, then the Ray head's process group (Ray and
    everything Serve runs); SIGKILL what outlives SIGTERM."""
    graceful = {"nginx": signal.SIGQUIT, "redis": signal.SIGTERM}
    for name, pid in record.get("services", {}).items():
        try:
            os.kill(pid, graceful[name])
        except ProcessLookupError:
            pass
    pid = record["pid"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s / 2
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.5)
        if not alive(pid):
            break
    deadline = time.monotonic() + timeout_s / 2
    while any(port_busy(p) for p in config.ports.values()) and time.monotonic() < deadline:
        time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_state(state: Path, data: dict[str, Any]) -> None:
    (state / "stack.json").write_text(json.dumps(data))


def read_state(state_dir: str) -> dict[str, Any]:
    """The stack recorded by `up` in state_dir; StackError when there is none or it cannot
    be read (a file of another version, cut short)."""
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        raise StackError(f"no stack is recorded in {state_dir}: nothing started by `tpserve "
                         "up --detach` is running there")
    try:
        data = json.loads(path.read_text())
        StackConfig(**data["config"])
        int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StackError(f"{path} cannot be read ({type(e).__name__}: {e}); if no stack is "
                         f"running, remove it (or `tpserve down --state-dir {state_dir}`, "
                         "which stops what it can and removes it)") from e
    return data


def clear_state(state: Path) -> None:
    for name in ("stack.json", "admin_token"):
        (state / name).unlink(missing_ok=True)


def down(state_dir: str) -> int:
    try:
        data = read_state(state_dir)
    except StackError:
        if not (Path(state_dir) / "stack.json").exists():
            raise
        clear_state(Path(state_dir))  # unreadable: nothing to stop by pid; forget it
        print(f"removed an unreadable stack record from {state_dir}")
        return 0
    config = StackConfig(**data["config"])
    stop(data, config)
    busy = [f"{n} {p}" for n, p in config.ports.items() if port_busy(p)]
    clear_state(Path(state_dir))
    if busy:
        print(f"stopped, but still busy: {', '.join(busy)}", file=sys.stderr)
        return 1
    print("tpserve is down; its ports are free")
    return 0


NOT_RUNNING = 3  # `tpserve status`'s exit status when no stack is recorded (as LSB's)


def status(state_dir: str) -> int:
    """What `tpserve status` prints: the replicas, Serve's target, the router's health and
    the URLs. No stack recorded: its own wording, exit status 3; a stack that is gone or
    not answering is explained (exit status 1), never a traceback."""
    if not (Path(state_dir) / "stack.json").exists():
        print(f"tpserve is not running (no stack recorded in {state_dir}). Start it with "
              "`tpserve up`, or `tpserve up --detach` to keep the shell.")
        return NOT_RUNNING
    data = read_state(state_dir)
    config = StackConfig(**data["config"])
    if not alive(data["pid"]):
        raise StackError(f"the stack recorded in {state_dir} is not running (its Ray head, "
                         f"pid {data['pid']}, is gone): `tpserve down --state-dir {state_dir}` "
                         "clears the record, `tpserve up` starts a new stack")
    print(f"Ray head pid {data['pid']} (alive)")
    token_file = Path(state_dir) / "admin_token"
    if not token_file.exists():
        raise StackError(f"the stack in {state_dir} is still starting (no admin token yet), "
                         "or its start failed: try again in a moment, or `tpserve down`")
    edge = f"http://127.0.0.1:{config.nginx_port}"
    try:
        req = urllib.request.Request(f"{edge}/admin/replicas", headers={
            "Authorization": f"Bearer {token_file.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            admin = json.loads(resp.read())
        running = sum(r["state"] == "RUNNING" for r in admin["replicas"])
        print(f"  engine replicas: {running} running (target {admin['target']})")
        for r in admin["replicas"]:
            print(f"  replica {r['id']}: {r['state']}, tp={r['tp']}, queue="
                  f"{(r['running'] or 0) + (r['waiting'] or 0)}, sessions={r['sessions']}")
        with urllib.request.urlopen(f"{edge}/healthz", timeout=5) as resp:
            health = json.loads(resp.read())
        print(f"  router: {health['status']} (Redis {'up' if health['redis'] else 'down'})")
    except (ServeError, OSError, http.client.HTTPException, ValueError, KeyError,
            TypeError) as e:
        print(f"  not answering at {edge}: {type(e).__name__}: {e}")
        return 1
    print(f"  API {config.api_url}  dashboard http://127.0.0.1:{config.nginx_port}/dashboard"
          f"  Ray dashboard {config.ray_dashboard}")
    return 0


@dataclass(frozen=True)
class Running:
    """A stack started by `local_stack`: its config and admin token."""

    config: StackConfig
    token: str

    @property
    def edge(self) -> str:
        return f"http://127.0.0.1:{self.config.nginx_port}"

    @classmethod
    def recorded(cls, state_dir: str) -> Running:
        """The stack that `tpserve up` recorded in state_dir and still runs (StackError when
        none is recorded there, or it is still starting)."""
        data = read_state(state_dir)
        token = Path(state_dir) / "admin_token"
        if not (alive(data["pid"]) and token.exists()):
            raise StackError(f"the stack recorded in {state_dir} is not running (or still "
                             "starting): `tpserve status` says more")
        return cls(StackConfig(**data["config"]), token.read_text())

    def connect(self) -> None:
        """Connect this process to the stack's Ray as a driver (`ray.shutdown()` ends it).
        Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (stay on loopback) and
        RAY_AUTH_MODE=token (the stack's token, ~/.ray/auth_token) when first imported:
        set them before that (infra.load.driver_env does)."""
        import ray

        ray.init(address=f"127.0.0.1:{self.config.ray_port}", log_to_driver=False)


def on_free_ports(**fields: Any) -> StackConfig:
    """A StackConfig of `fields`, its servers on distinct free loopback ports."""
    from replicas.ranks import free_ports

    return StackConfig(**free_ports(f"{name}_port" for name in STACK_PORTS), **fields)


@contextlib.contextmanager
def local_stack(engine: dict[str, Any] | None = None, state_dir: str | None = None,
                **overrides: Any) -> Iterator[Running]:
    """A detached stack on free loopback ports for scripts and tests (infra/load.py,
    infra/chaos.py), stopped by pid on exit. `up`'s progress goes to stderr so that a
    script's stdout stays JSON lines. `overrides` are StackConfig fields."""
    state = state_dir or tempfile.mkdtemp(prefix="tpserve-stack-")
    config = on_free_ports(state_dir=state, **overrides)
    engine = {"tp": 2, **(engine or {})}
    with contextlib.redirect_stdout(sys.stderr):
        up(engine, config, detach=True)
    try:
        yield Running(config, (Path(state) / "admin_token").read_text())
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            down(state)
