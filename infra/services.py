"""The head node's stack services (Redis for sessions, nginx at the edge), owned by a
detached Ray actor so that they live and die with Ray on the head: `ray stop` (which `ray
down` runs) kills the actor, and the kernel then stops its children (PR_SET_PDEATHSIG).

Redis needs a password on a cluster: it is made once (random 256 bits) into a file only
the user can read, written into Redis' config file (never a command line, never printed),
and handed to the routers as TPSERVE_REDIS_URL in the environment of `ray start`. Redis
listens only on the address given (the head's private address, or loopback).

    python -m infra.services redis-url --bind IP      # for: export TPSERVE_REDIS_URL=$(...)
    python -m infra.services up --bind IP [--nginx-listen HOST:PORT --upstream HOST:PORT]

The same actor keeps nginx's upstreams on the router replicas' own HTTP servers (Serve's
direct ingress) as they come and go: infra/edge.py.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray

from infra import nginx
from infra.edge import EdgeFollower

ACTOR_NAME = "tpserve-services"
NAMESPACE = "tpserve"
DEFAULT_STATE = Path.home() / ".tpserve"
DEFAULT_REDIS_PORT = 6380  # Ray's head takes 6379, Redis' own default
PR_SET_PDEATHSIG = 1


def redis_password(state: Path) -> str:
    """The cluster's Redis password, made on first use in a file readable by its owner."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / "redis.pass"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def redis_url(state: Path, bind: str, port: int) -> str:
    return f"redis://:{redis_password(state)}@{bind}:{port}/0"


def redis_command(state: Path, bind: str, port: int) -> list[str]:
    """redis-server with a config file (mode 600) that holds the password."""
    conf = state / "redis.conf"
    lines = [f"port {port}", f"bind {bind}", f"requirepass {redis_password(state)}",
             # an append-only file, fsync'd every second: a Redis restart keeps the sessions
             'save ""', "appendonly yes", "appendfsync everysec", "daemonize no",
             f"dir {state}",
             f"logfile {state / 'redis.log'}", "protected-mode yes"]
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return ["redis-server", str(conf)]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@ray.remote(num_cpus=0)
class Services:
    """Holds the service processes; they end when this actor's process ends. With `edge`
    (nginx's config and its path) nginx follows Serve's ingress targets."""

    def __init__(self, commands: dict[str, list[str]],
                 edge: tuple[nginx.NginxConfig, Path] | None = None) -> None:
        self.commands = commands
        self.procs = {name: self._spawn(name) for name in commands}
        self.edge = None if edge is None else EdgeFollower(*edge, self._nginx_pid)
        if self.edge is not None:
            self.edge.start()

    def _nginx_pid(self) -> int | None:
        proc = self.procs.get("nginx")
        return None if proc is None or proc.poll() is not None else proc.pid

    def _spawn(self, name: str) -> subprocess.Popen:
        return subprocess.Popen(self.commands[name], preexec_fn=_die_with_parent,
                                stdin=subprocess.DEVNULL)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self, name: str, timeout_s: float = 10.0) -> int | None:
        """Stop one service gracefully (SIGTERM: Redis flushes its append-only file);
        returns its exit code. For fault drills (infra/chaos.py)."""
        proc = self.procs[name]
        proc.terminate()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def start(self, name: str) -> int:
        """Start a stopped service again with its original command; returns the new pid."""
        if self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is still running (pid {self.procs[name].pid})")
        self.procs[name] = self._spawn(name)
        return self.procs[name].pid

    def exited(self) -> dict[str, int | None]:
        return {name: p.poll() for name, p in self.procs.items()}


def wait_for_port(host: str, port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def nginx_conf(state: Path) -> Path:
    """The edge's nginx.conf under a stack's state directory (its prefix is the folder)."""
    return state / "nginx" / "nginx.conf"


def nginx_edge(state: Path, listen: str, upstreams: list[str]
               ) -> tuple[nginx.NginxConfig, Path]:
    """Write and check the edge's nginx.conf (infra/nginx.py) with the Serve proxies as its
    upstreams; its config and path."""
    path = nginx_conf(state)
    config = nginx.NginxConfig(upstreams=tuple(upstreams), listen=listen,
                               prefix=str(path.parent))
    nginx.write(config, path)
    nginx.check(path, path.parent)
    return config, path


def start(state: Path, bind: str, redis_port: int,
          edge: tuple[nginx.NginxConfig, Path] | None) -> dict[str, int]:
    """Start the services under the detached actor (on this node); returns their pids."""
    commands = {"redis": redis_command(state, bind, redis_port)}
    if edge is not None:
        commands["nginx"] = nginx.nginx_command(edge[1], edge[0].prefix)
    node = ray.get_runtime_context().get_node_id()
    actor = Services.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
        scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            node, soft=False),
    ).remote(commands, edge)
    pids = ray.get(actor.pids.remote())
    wait_for_port(bind, redis_port)
    exited = ray.get(actor.exited.remote())
    if any(code is not None for code in exited.values()):
        raise RuntimeError(f"a service exited at start: {exited} (see {state})")
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.services")
    parser.add_argument("command", choices=["up", "redis-url"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT)
    parser.add_argument("--nginx-listen", help="HOST:PORT of the edge; no nginx if unset")
    parser.add_argument("--upstream", action="append", default=[],
                        help="HOST:PORT of a Serve HTTP proxy (repeatable)")
    parser.add_argument("--ray-address", default="auto")
    args = parser.parse_args(argv)
    if args.command == "redis-url":
        sys.stdout.write(redis_url(args.state, args.bind, args.redis_port))
        return 0
    edge = None
    if args.nginx_listen:
        edge = nginx_edge(args.state, args.nginx_listen, args.upstream)
    ray.init(address=args.ray_address, log_to_driver=False)
    pids = start(args.state, args.bind, args.redis_port, edge)
    print(json.dumps(pids))  # {"redis": pid, "nginx": pid}: for launchers to record
    return 0


if __name__ == "__main__":
    sys.exit(main())
