"""Faults under load: `python -m infra.chaos [--faults kill_rank,redis,router,scale]`.

Starts a local stack (the tiny model, tp=2, 2 replicas) on free loopback ports, or with
`--state-dir DIR` uses the running one that `tpserve up` recorded there (run it with that
stack's HOME, where its Ray token is), runs the streaming multi-turn clients of
infra/client.py through nginx and, during the load, one fault after another, each waited out
until the stack has recovered (a stack used this way is whole again at the end):

- `kill_rank`: start a long stream (the probe), and once it has its first token kill
  rank 1 (a Ray actor) of the replica serving it; a tp=1 replica has no rank 1, so its
  rank 0, the Serve replica's own actor (a GPU replica's process dies with its CUDA
  context). Streams on that replica must end with an error event and [DONE], never hang
  (at tp=1 the router sees the replica's connection drop); Serve replaces the replica
  and its sessions move, history intact.
- `redis`: stop Redis (SIGTERM, through the Ray actor that owns it), wait, start it
  again; it reloads its append-only file. The router serves hash-only meanwhile.
- `router`: restart the router gracefully: redeploy the app with a new environment for
  the Router deployment only; Serve starts a new router and drains the old one.
- `router_kill`: kill the router's replica actor (a crash; Serve restarts it). Streams
  in flight through it break: counted apart, as the price of a crash.
- `scale`: POST /admin/scale to one replica more, wait until it is RUNNING and a client
  got a token from it, then back (Serve drains the removed replica).

Then it stops the load and checks every session's stored history. One JSON line:
accepted requests that failed (on the killed replica / elsewhere, by fault window),
hangs, refusals, sessions moved, sessions lost (stored history gone or missing a turn
that was answered while Redis was up) and turns answered during the Redis outage that
were not recorded (the router's documented hash-only degraded mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.client import Budget, LoadConfig, Turn, chat_turn, run_clients
from infra.results import driver_env, emit, environment, script_args
from infra.results import summarize as load_summary

FAULTS = ("kill_rank", "redis", "router", "router_kill", "scale")
# the Router deployment's environment variable a router restart changes (redeploy_config)
GENERATION_VAR = "TPSERVE_ROUTER_GENERATION"


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run; each default exists here once (the CLI is built from it)."""

    faults: str = "kill_rank,redis,router,scale"  # comma-separated, in this order
    clients: int = 4
    turns: int = 4
    max_tokens: int = 24
    user_words: int = 16
    settle_s: float = 5.0  # load before the first and after the last fault
    redis_down_s: float = 3.0
    recover_timeout_s: float = 300.0  # per fault: the stack must be whole again by then
    request_timeout: float = 60.0  # a stream not ended by then is a hang

    def __post_init__(self) -> None:
        unknown = set(self.fault_list) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}: use some of {FAULTS}")

    @property
    def fault_list(self) -> list[str]:
        return [f.strip() for f in self.faults.split(",") if f.strip()]


@dataclass
class Fault:
    name: str
    start: float
    end: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


class Drill:
    """The faults, on a running stack, with a Ray driver connected to it."""

    def __init__(self, stack: Any, config: ChaosConfig, records: list[Turn]) -> None:
        self.stack, self.config, self.records = stack, config, records
        self.dashboard = stack.config.ray_dashboard

    # -- helpers --

    def http(self, method: str, path: str, body: dict[str, Any] | None = None,
             admin: bool = False) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["Authorization"] = f"Bearer {self.stack.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.stack.edge}{path}", data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read()[:300].decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def engine_ids(self) -> dict[str, str]:
        from cluster.control import replicas

        return {r.replica_id: r.state for r in replicas(self.dashboard)}

    async def until(self, what: str, done: Any) -> float:
        """Poll `done()` (in a thread) until true; the seconds it took. A TimeoutError
        says what the stack looked like at the end (`snapshot`)."""
        start = time.monotonic()
        while not await asyncio.to_thread(done):
            if time.monotonic() - start > self.config.recover_timeout_s:
                seen = await asyncio.to_thread(self.snapshot)
                raise TimeoutError(f"{what}: not recovered after "
                                   f"{self.config.recover_timeout_s:.0f} s; at the end: "
                                   f"{json.dumps(seen)}")
            await asyncio.sleep(0.25)
        return time.monotonic() - start

    def snapshot(self) -> dict[str, Any]:
        """What a fault's recovery waits on, each part as far as it can be read: the edge's
        /healthz answer, Serve's engine and router replicas, nginx's upstreams."""
        from cluster.control import ROUTER, replicas
        from infra.edge import configured_upstreams
        from infra.services import nginx_conf

        parts: dict[str, Any] = {
            "healthz": lambda: self.http("GET", "/healthz"),
            "engines": self.engine_ids,
            "routers": lambda: {r.replica_id: r.state
                                for r in replicas(self.dashboard, deployment=ROUTER)},
            "edge_upstreams": lambda: configured_upstreams(
                nginx_conf(Path(self.stack.config.state_dir))),
        }
        seen: dict[str, Any] = {}
        for name, read in parts.items():
            try:
                seen[name] = read()
            except Exception as e:  # noqa: BLE001 - a diagnosis, never a second failure
                seen[name] = f"unreadable: {e!r}"[:300]
        return seen

    def running(self, count: int, excluding: str = "") -> bool:
        states = self.engine_ids()
        alive = [r for r, s in states.items() if s == "RUNNING" and r != excluding]
        return len(alive) == count and len(states) == count and excluding not in states

    def healthy(self) -> bool:
        status, body = self.http("GET", "/healthz")
        return status == 200 and isinstance(body, dict) and body.get("status") == "ok"

    # -- faults --

    async def kill_rank(self, fault: Fault) -> None:
        """A long stream (the probe) runs on some replica; once it has its first token,
        rank 1 of that replica is killed. The probe must end with an error event."""
        import aiohttp

        replicas_now = self.engine_ids()
        probe = Turn(f"probe-{os.getpid()}-{len(self.records)}", 0, time.monotonic(),
                     "a long answer, please")
        load = LoadConfig(url=self.stack.edge, max_tokens=1500, retries=0,
                          request_timeout=self.config.request_timeout)
        async with aiohttp.ClientSession() as http:
            streaming = asyncio.create_task(chat_turn(http, load, probe.session, 0,
                                                      probe.content, probe))
            while probe.ttft_s is None and not streaming.done():
                await asyncio.sleep(0.05)
            victim = probe.replica
            await self._kill_rank(victim, fault)
            self.records.append(await streaming)
        fault.detail["probe"] = {"error": probe.error[:80], "done": probe.done,
                                 "tokens_before_kill": len(probe.token_times)}
        count = len(replicas_now)
        fault.detail["replaced_s"] = round(await self.until(
            "replica replaced", lambda: self.running(count, excluding=victim)), 1)

    async def _kill_rank(self, victim: str, fault: Fault) -> None:
        """Kill rank 1 of replica `victim`, or its rank 0 (the Serve replica) at tp=1."""
        import ray
        from ray.util.state import list_actors

        def alive(cls: str) -> list[Any]:
            return list_actors(filters=[("class_name", "=", cls), ("state", "=", "ALIVE")],
                               address=self.dashboard)

        ranks = await asyncio.to_thread(alive, "RankActor")
        target = next((a for a in ranks if a.name == f"tpserve-{victim}-rank1"), None)
        rank = 1
        if target is None:  # tp=1: the replica is its only rank
            replicas_now = await asyncio.to_thread(alive, "ServeReplica:tpserve:Engine")
            target = next(a for a in replicas_now if a.name.endswith(f"#{victim}"))
            rank = 0
        ray.kill(ray.get_actor(target.name, namespace=target.ray_namespace))
        fault.detail.update(replica=victim, actor=target.name, rank=rank)

    async def redis(self, fault: Fault) -> None:
        import ray

        from infra.services import ACTOR_NAME, NAMESPACE
        from infra.stack import read_state, write_state

        actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        fault.detail["exit_code"] = await asyncio.to_thread(ray.get, actor.stop.remote("redis"))
        await asyncio.sleep(self.config.redis_down_s)
        pid = await asyncio.to_thread(ray.get, actor.start.remote("redis"))
        state = Path(self.stack.config.state_dir)
        record = read_state(str(state))
        record["services"]["redis"] = pid  # `tpserve down` stops the new one
        write_state(state, record)
        fault.detail["down_s"] = round(time.monotonic() - fault.start, 1)
        fault.detail["router_ok_again_s"] = round(await self.until("router back on Redis",
                                                                   self.healthy), 1)

    async def router(self, fault: Fault) -> None:
        from cluster.control import deploy

        body = await asyncio.to_thread(self.serve_status)
        config = redeploy_config(body)
        # the routers before the redeploy: read after it, on a busy machine Serve had
        # already started the new one (both listed, or only the new), and the drill then
        # waited for a replacement of the replacement (never: "not recovered")
        before = await asyncio.to_thread(self.router_ids)
        await asyncio.to_thread(deploy, config, self.dashboard)
        fault.detail["old"] = sorted(before)
        fault.detail["replaced_s"] = round(await self.until(
            "router restarted", lambda: self.router_replaced(before)), 1)

    def serve_status(self) -> dict[str, Any]:
        from cluster.control import ray_auth_headers

        req = urllib.request.Request(f"{self.dashboard}/api/serve/applications/",
                                     headers=ray_auth_headers())
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def router_ids(self) -> set[str]:
        from cluster.control import ROUTER, replicas

        return {r.replica_id for r in replicas(self.dashboard, deployment=ROUTER)}

    def router_replaced(self, old: set[str]) -> bool:
        from cluster.control import ROUTER, replicas

        now = replicas(self.dashboard, deployment=ROUTER)
        return bool(now) and all(r.state == "RUNNING" and r.replica_id not in old
                                 for r in now) and self.healthy()

    async def router_kill(self, fault: Fault) -> None:
        import ray
        from ray.util.state import list_actors

        actors = await asyncio.to_thread(
            list_actors, filters=[("class_name", "=", "ServeReplica:tpserve:Router"),
                                  ("state", "=", "ALIVE")], address=self.dashboard)
        ray.kill(ray.get_actor(actors[0].name, namespace=actors[0].ray_namespace),
                 no_restart=False)
        fault.detail["actor"] = actors[0].name
        await asyncio.sleep(2.0)
        fault.detail["healthy_s"] = round(await self.until("router back", self.healthy), 1)

    async def scale(self, fault: Fault) -> None:
        """One replica more, then as many as before. Besides the time until Serve lists
        the new one RUNNING: the time from the request until a client's first token
        from the new replica (`first_traffic_s`), waited for before scaling back."""
        before = self.engine_ids()
        count = len(before)
        for target in (count + 1, count):
            posted = time.monotonic()
            status, body = await asyncio.to_thread(self.http, "POST", "/admin/scale",
                                                   {"replicas": target}, True)
            if status != 202:
                raise RuntimeError(f"/admin/scale {target}: {status} {body}")
            fault.detail[f"to_{target}_s"] = round(await self.until(
                f"{target} replicas", lambda t=target: self.running(t)), 1)
            if target > count:
                await self.until("a token from the new replica",
                                 lambda p=posted: self.first_token_on_new(before, p) is not None)
                first = self.first_token_on_new(before, posted)
                assert first is not None
                fault.detail["first_traffic_s"] = round(first - posted, 1)

    def first_token_on_new(self, known: dict[str, str], since: float) -> float | None:
        """When the first token came of a turn started after `since` and served by a
        replica not in `known` (among the turns recorded so far: a turn is recorded once
        it ends), or None. (Turns before `since` on a replica replaced by an earlier fault
        are not in `known` either.)"""
        times = [t.started + t.ttft_s for t in list(self.records)
                 if t.started >= since and t.replica and t.replica not in known
                 and t.ttft_s is not None]
        return min(times, default=None)


def redeploy_config(body: dict[str, Any]) -> dict[str, Any]:
    """The deployed Serve config, with a new environment for the Router deployment only:
    Serve replaces the router replica (draining the old one) and leaves the engines. The
    new environment is the deployed one's generation + 1 (GENERATION_VAR): a drill run
    again on the same stack redeploys a config that differs (a drill counting from 1 each
    time redeployed an unchanged config, and waited for a restart that never came)."""
    from cluster.control import APP_NAME, ROUTER

    app = body["applications"][APP_NAME]["deployed_app_config"]
    deployments = [d for d in app.get("deployments", []) if d.get("name") != ROUTER]
    router = next((d for d in app.get("deployments", []) if d.get("name") == ROUTER), {})
    options = router.get("ray_actor_options") or {}
    runtime_env = options.get("runtime_env") or {}
    env = runtime_env.get("env_vars") or {}
    generation = int(env.get(GENERATION_VAR, "0")) + 1
    deployments.append({**router, "name": ROUTER, "ray_actor_options": {
        **options, "runtime_env": {**runtime_env, "env_vars": {
            **env, GENERATION_VAR: str(generation)}}}})
    http = body.get("http_options") or {}
    return {"proxy_location": body.get("proxy_location", "HeadOnly"),
            "http_options": {"host": http.get("host"), "port": http.get("port")},
            "applications": [{**app, "deployments": deployments}]}


async def drill(stack: Any, config: ChaosConfig) -> tuple[list[Turn], list[Fault], float]:
    """Load through the faults; returns the turns, the faults and the load's wall time."""
    records: list[Turn] = []
    load = LoadConfig(url=stack.edge, clients=config.clients, turns=config.turns,
                      max_tokens=config.max_tokens, user_words=config.user_words,
                      duration=24 * 3600.0, max_requests=1 << 30,
                      request_timeout=config.request_timeout)
    budget = Budget(time.monotonic() + 24 * 3600.0, 1 << 30)
    clients = asyncio.create_task(run_clients(load, records, budget))
    runner = Drill(stack, config, records)
    faults: list[Fault] = []
    try:
        await asyncio.sleep(config.settle_s)
        for name in config.fault_list:
            fault = Fault(name, time.monotonic())
            faults.append(fault)
            print(f"chaos: {name}", file=sys.stderr, flush=True)
            await getattr(runner, name)(fault)
            fault.end = time.monotonic()
            print(f"chaos: {name} done {fault.detail}", file=sys.stderr, flush=True)
            await asyncio.sleep(config.settle_s)
    finally:
        budget.stop.set()
        wall = await clients
    return records, faults, wall


def stored_users(edge: str, session: str) -> list[str] | None:
    """The user messages of a session's stored history; None when it is gone."""
    try:
        with urllib.request.urlopen(f"{edge}/v1/sessions/{session}", timeout=30) as resp:
            history = json.loads(resp.read())["history"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    return [m["content"] for m in history if m["role"] == "user"]


def in_window(turn: Turn, fault: Fault, grace_s: float = 0.0) -> bool:
    return turn.started <= fault.end + grace_s and turn.ended >= fault.start


def check_sessions(edge: str, records: list[Turn], faults: list[Fault]) -> dict[str, Any]:
    """Read back every session with an answered turn and judge it (`judge_sessions`)."""
    sessions = sorted({r.session for r in records if r.ok})
    return judge_sessions(records, {s: stored_users(edge, s) for s in sessions}, faults)


def judge_sessions(records: list[Turn], stored: dict[str, list[str] | None],
                   faults: list[Fault]) -> dict[str, Any]:
    """Sessions lost: stored history gone, or missing a turn answered while Redis was up.
    Turns answered during an outage (+ 3 s: the router's Redis retry) are counted apart.
    `stored`: session -> its stored user messages, None when the session is gone."""
    outages = [f for f in faults if f.name == "redis"]
    lost, unrecorded = [], 0
    for session, users in stored.items():
        answered = [r for r in records if r.session == session and r.ok]
        missing = [r for r in answered if users is None or r.content not in users]
        during = [r for r in missing if any(in_window(r, f, 3.0) for f in outages)]
        unrecorded += len(during)
        if len(missing) > len(during):
            lost.append(session)
    return {"sessions_checked": len(stored), "sessions_lost": len(lost),
            "lost_examples": lost[:3], "turns_unrecorded_redis_down": unrecorded}


def attribute(records: list[Turn], faults: list[Fault]) -> dict[str, Any]:
    """Accepted requests that failed: on the killed replica, in a router crash, or other."""
    killed = {f.detail.get("replica") for f in faults if f.name == "kill_rank"}
    crashes = [f for f in faults if f.name == "router_kill"]
    failed = [r for r in records if r.accepted and not r.ok]
    on_killed = [r for r in failed if r.replica in killed]
    in_crash = [r for r in failed if r not in on_killed
                and any(in_window(r, f) for f in crashes)]
    other = [r for r in failed if r not in on_killed and r not in in_crash]
    by_fault: dict[str, int] = {}
    for r in other:
        name = next((f.name for f in faults if in_window(r, f, 2.0)), "none")
        by_fault[name] = by_fault.get(name, 0) + 1
    return {
        "failed_on_killed_replica": len(on_killed),
        "killed_streams_ended_with_error_event": sum(
            r.error.startswith("error event") and r.done for r in on_killed),
        "failed_in_router_crash": len(in_crash),
        "failed_other": len(other), "failed_other_by_fault": by_fault,
        "failed_other_examples": sorted({r.error for r in other})[:3],
        "refused_by_fault": _refused(records, faults),
    }


def _refused(records: list[Turn], faults: list[Fault]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if not r.accepted and r.error != "hang":
            name = next((f.name for f in faults if in_window(r, f, 2.0)), "none")
            out[name] = out.get(name, 0) + 1
    return out


def dump(records: list[Turn], faults: list[Fault], path: str) -> None:
    """Every turn and fault as JSON lines (times from the first turn), for a post-mortem."""
    t0 = min((r.started for r in records), default=0.0)
    with open(path, "w") as f:
        for fault in faults:
            f.write(json.dumps({"fault": fault.name, "start": round(fault.start - t0, 3),
                                "end": round(fault.end - t0, 3), **fault.detail}) + "\n")
        for r in records:
            row = {k: v for k, v in asdict(r).items() if k != "token_times"}
            row.update(started=round(r.started - t0, 3), ended=round(r.ended - t0, 3))
            f.write(json.dumps(row) + "\n")


def run(config: ChaosConfig, out: str | None, records_path: str | None = None,
        state_dir: str | None = None) -> dict[str, Any]:
    """The drill on a stack of its own, or on the running stack recorded in `state_dir`."""
    import ray

    from infra.stack import Running, local_stack

    stack_cm = (contextlib.nullcontext(Running.recorded(state_dir)) if state_dir
                else local_stack())
    with stack_cm as stack:
        stack.connect()
        data_path = stack.config.data_path
        try:
            records, faults, wall = asyncio.run(drill(stack, config))
            sessions = check_sessions(stack.edge, records, faults)
            if records_path:
                dump(records, faults, records_path)
        finally:
            ray.shutdown()
    row = {**summarize(config, records, faults, wall, sessions), **stack_shape(state_dir),
           "data_path": data_path}
    emit(row, out)
    return row


def stack_shape(state_dir: str | None) -> dict[str, Any]:
    """What the drill ran on: a local stack of its own (the tiny model at tp=2), or the
    recorded stack's model, tp and device as `tpserve up` recorded them."""
    if not state_dir:
        return {"stack": "local", "model": "tiny", "tp": 2}
    from infra.stack import read_state

    state = read_state(state_dir)
    engine = state.get("engine", {})
    model = engine.get("model")
    return {"stack": "recorded", "model": Path(model).name if model else "tiny",
            "tp": engine.get("tp"), "device": engine.get("device"),
            # (under 1: the replicas shared GPUs, `tpserve up --gpus-per-rank`)
            "gpus_per_rank": state.get("config", {}).get("gpus_per_rank", 1.0)}


def summarize(config: ChaosConfig, records: list[Turn], faults: list[Fault], wall: float,
              sessions: dict[str, Any]) -> dict[str, Any]:
    t0 = min((r.started for r in records), default=0.0)
    load = load_summary(records, wall)
    blame = attribute(records, faults)
    met = (load["hung"] == 0 and blame["failed_other"] == 0
           and sessions["sessions_lost"] == 0
           and blame["killed_streams_ended_with_error_event"]
           == blame["failed_on_killed_replica"])
    return {"kind": "chaos", **load, **blame, **sessions,
            "faults": [{"name": f.name, "at_s": round(f.start - t0, 1),
                        "took_s": round(f.end - f.start, 1), **f.detail} for f in faults],
            "met": met, "config": asdict(config), **environment()}


def extra_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", help="write every turn and fault here (JSON lines)")
    parser.add_argument("--state-dir", help="drill the running stack recorded here by "
                        "`tpserve up` instead of starting one")


def main(argv: list[str] | None = None) -> int:
    driver_env()
    config, out, args = script_args(
        "python -m infra.chaos", __doc__.split("\n")[0], ChaosConfig, "chaos_cpu.jsonl", argv,
        extra_arguments)
    row = run(config, out, args.records, args.state_dir)
    return 0 if row["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
