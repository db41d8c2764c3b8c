"""The whole path on loopback: openai client -> nginx -> router (Serve ingress) -> engine
replicas, with a real redis-server: the whole-stack tier's shared stack (tests/stack_tier.py;
the tiny model, tp=2, 2 replicas), a Ray driver connected to it. Tests that scale, stop
Redis or kill a replica are `stack("faults")` and leave the stack whole. What needs the
whole stack: pinning by client address and by X-Session-ID across real replicas, scaling,
Redis outage, spoofed forwarding headers seen by Serve's proxy, the engine's own refusals,
killed replicas. The router's HTTP contract (bad bodies, the fuzz, SSE framing, history,
rate limits, retry-once) runs in-process in tests/test_router_http.py."""

from __future__ import annotations

import http.client
import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
import stack_tier  # noqa: E402

from cluster.control import replicas, scale  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.stack]
MAX_MODEL_LEN = 2048  # the shared stack's engine: the tiny model's (replicas/tiny.py)


@dataclass
class Stack:
    """The shared stack (tests/stack_tier.py) as these tests use it, a Ray driver
    connected to it."""

    edge: int  # nginx
    serve: int  # Serve's HTTP proxy (the router, no nginx)
    dashboard: str
    redis_port: int
    redis_password: str
    running: stack_tier.Running

    def stop_redis(self) -> None:
        stack_tier.stop_redis(self.running)

    def start_redis(self) -> None:
        stack_tier.start_redis(self.running)


@pytest.fixture(scope="module")
def stack(shared_stack: stack_tier.Running) -> Iterator[Stack]:
    env = pytest.MonkeyPatch()
    stack_tier.connect_driver(shared_stack, env)
    try:
        yield Stack(shared_stack.ports["nginx"], shared_stack.ports["serve"],
                    shared_stack.ray_dashboard, shared_stack.ports["redis"],
                    shared_stack.redis_password, shared_stack)
    finally:
        stack_tier.disconnect_driver(env)


def post(port: int, path: str, body: object, headers: dict[str, str] | None = None,
         source: str = "127.0.0.1", timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """POST from a chosen loopback source address; (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack.edge}/v1", api_key="none",
                         max_retries=0, timeout=60)


def test_openai_client_completion_chat_and_stream(stack: Stack) -> None:
    c = client(stack)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tpserve"]
    done = c.completions.create(model="tpserve", prompt="Once upon a time", max_tokens=8,
                                temperature=0.0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.prompt_tokens > 0
    chat = c.chat.completions.create(model="tpserve", max_tokens=8, temperature=0.0,
                                     messages=[{"role": "user", "content": "Hello there"}])
    assert chat.choices[0].message.role == "assistant"
    raw = c.chat.completions.with_raw_response.create(
        model="tpserve", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert raw.headers["x-replica-id"] and "x-session-id" not in raw.headers  # none used
    raw = c.chat.completions.with_raw_response.create(
        model="tpserve", max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
        extra_body={"session": {"append": True}})  # the README's first turn opens one
    assert raw.headers["x-session-id"] and raw.headers["x-replica-id"]
    chunks = list(c.chat.completions.create(
        model="tpserve", max_tokens=8, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hello there"}]))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def replica_of(stack: Stack, source: str, headers: dict[str, str] | None = None) -> str:
    status, hdrs, body = post(stack.edge, "/v1/completions",
                              {"prompt": [5, 6, 7], "max_tokens": 2}, headers, source)
    assert status == 200, body
    return hdrs["x-replica-id"]


def pins(stack: Stack, clients: list[tuple[str, dict[str, str] | None]], times: int
         ) -> dict[int, set[str]]:
    """The replicas that served each client, asked `times` times: one request after
    another per client, the clients at once (as real ones come)."""
    def served(client: tuple[str, dict[str, str] | None]) -> set[str]:
        return {replica_of(stack, *client) for _ in range(times)}

    with ThreadPoolExecutor(8) as pool:
        return dict(enumerate(pool.map(served, clients)))


IP_CLIENTS = [(f"127.0.0.{i}", None) for i in range(2, 22)]
SESSION_CLIENTS = [("127.0.0.1", {"X-Session-ID": f"s-{i}-{secrets.token_hex(4)}"})
                   for i in range(20)]


def test_each_client_stays_on_one_replica(stack: Stack) -> None:
    for group in (IP_CLIENTS, SESSION_CLIENTS):
        seen = pins(stack, group, 10)
        assert all(len(r) == 1 for r in seen.values()), seen
        assert len(set().union(*seen.values())) == 2  # both replicas have sessions


@pytest.mark.stack("faults")
def test_scale_up_moves_no_session(stack: Stack) -> None:
    before = {i: next(iter(r)) for i, r in pins(stack, SESSION_CLIENTS, 1).items()}
    assert len(scale(3, stack.dashboard, timeout_s=240)) == 3
    after = {i: next(iter(r)) for i, r in pins(stack, SESSION_CLIENTS, 2).items()}
    assert after == before
    new = [f"new-{i}" for i in range(30)]  # new sessions may use the new replica
    used = {replica_of(stack, "127.0.0.1", {"X-Session-ID": s}) for s in new}
    assert len(used) == 3
    assert len(scale(2, stack.dashboard, timeout_s=240)) == 2  # the stack as it was
    live = {r.replica_id for r in replicas(stack.dashboard)}
    after_down = {i: next(iter(r)) for i, r in pins(stack, SESSION_CLIENTS, 1).items()}
    for i, replica in before.items():  # only sessions of the removed replica moved
        assert after_down[i] == replica or replica not in live


@pytest.mark.stack("faults")
def test_redis_outage_degrades_without_5xx(stack: Stack) -> None:
    stack.stop_redis()
    try:
        statuses = [post(stack.edge, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2},
                         source=f"127.0.0.{30 + i}")[0] for i in range(6)]
        assert statuses == [200] * 6
        conn = http.client.HTTPConnection("127.0.0.1", stack.edge, timeout=10)
        conn.request("GET", "/healthz")
        assert json.loads(conn.getresponse().read())["status"] == "degraded"
    finally:
        stack.start_redis()
    deadline = time.monotonic() + 30
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", stack.edge, timeout=10)
        conn.request("GET", "/healthz")
        if json.loads(conn.getresponse().read())["status"] == "ok":
            break
        assert time.monotonic() < deadline, "the router did not go back to Redis"
        post(stack.edge, "/v1/completions", {"prompt": [5], "max_tokens": 1})
        time.sleep(0.5)


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(stack: Stack) -> None:
    import redis

    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}
    status, _, _ = post(stack.serve, "/v1/completions", {"prompt": [5], "max_tokens": 1},
                        spoof, source="127.0.0.77")  # straight to Serve: peer untrusted
    assert status == 200
    r = redis.Redis(port=stack.redis_port, password=stack.redis_password)
    keys = {k.decode() for k in r.scan_iter("tpserve:s:ip:*")}
    assert "tpserve:s:ip:127.0.0.77" in keys
    assert not any("203.0.113.9" in k for k in keys)


# a prompt over the engine's max_model_len (token ids the tiny model has)
TOO_LONG_PROMPT = [5 + i % 500 for i in range(MAX_MODEL_LEN + 88)]
# bodies only the engine refuses (over its max_model_len): through the whole stack; the
# router's own refusals run in-process (tests/test_router_http.py: BAD_BODIES)
ENGINE_REFUSED_BODIES = [json.dumps({"prompt": TOO_LONG_PROMPT, "max_tokens": 1}).encode(),
                         json.dumps({"prompt": "x", "max_tokens": MAX_MODEL_LEN + 88}).encode()]


@pytest.mark.parametrize("body", ENGINE_REFUSED_BODIES, ids=range(len(ENGINE_REFUSED_BODIES)))
def test_bad_input_is_a_4xx_with_an_openai_error(stack: Stack, body: bytes) -> None:
    status, _, raw = post(stack.serve, "/v1/completions", body)
    assert 400 <= status < 500, (status, raw[:200])
    assert "message" in json.loads(raw)["error"]


def session_keys(stack: Stack) -> set[str]:
    import redis

    r = redis.Redis(port=stack.redis_port, password=stack.redis_password)
    return {k.decode() for pattern in ("tpserve:s:*", "tpserve:h:*")
            for k in r.scan_iter(pattern)}


def test_anonymous_requests_store_no_session_and_a_used_one_is_kept(stack: Stack) -> None:
    source = "127.0.0.55"
    before = session_keys(stack)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for i in range(10):
        path, body = (("/v1/chat/completions", chat) if i % 2 else
                      ("/v1/completions", {"prompt": [5, 6], "max_tokens": 2}))
        status, headers, _ = post(stack.edge, path, body, source=source)
        assert status == 200 and "x-session-id" not in headers
    # 10 requests leave one key: the pin of this client's address, not one per request
    assert session_keys(stack) - before == {f"tpserve:s:ip:{source}"}
    status, headers, _ = post(stack.edge, "/v1/chat/completions",
                              {**chat, "session": {"append": True}}, source=source)
    sid = headers["x-session-id"]
    status, headers, _ = post(stack.edge, "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "again"}],
                               "max_tokens": 2, "session": {"append": True}},
                              {"X-Session-ID": sid}, source=source)
    assert status == 200 and headers["x-session-id"] == sid
    _, stored = get_json(stack.edge, f"/v1/sessions/{sid}")
    assert [m["content"] for m in stored["history"] if m["role"] == "user"] == ["hi", "again"]
    assert {f"tpserve:s:session:{sid}", f"tpserve:h:session:{sid}"} <= session_keys(stack)


def replica_logs() -> str:
    """The engine replicas' Serve logs of this Ray session."""
    from pathlib import Path

    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    return "".join(p.read_text(errors="replace")
                   for p in sorted((session / "logs" / "serve").glob("replica_*Engine*.log")))


def test_a_request_the_engine_refuses_is_a_400_and_one_log_line(stack: Stack) -> None:
    before = replica_logs()
    too_long = {"prompt": TOO_LONG_PROMPT, "max_tokens": 1}  # over max_model_len
    for _ in range(3):
        status, _, raw = post(stack.serve, "/v1/completions", too_long)
        assert status == 400 and "max_model_len" in json.loads(raw)["error"]["message"], raw
    deadline = time.monotonic() + 20
    while True:  # the replicas' processes write the lines: wait for them
        after = replica_logs()
        refused = after.count("request refused (400)") - before.count("request refused (400)")
        if refused >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert refused >= 3, after[-2000:]
    for text in ("Request failed", "Traceback"):  # what Serve logs for a raised exception
        assert after.count(text) == before.count(text), after[-3000:]


def get_json(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def chat(stack: Stack, sid: str, content: str, append: bool) -> tuple[int, dict[str, str]]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "session": {"append": append}}
    status, headers, _ = post(stack.edge, "/v1/chat/completions", body, {"X-Session-ID": sid})
    return status, headers


@pytest.mark.stack("faults")
def test_killed_replica_moves_only_its_sessions_with_history(stack: Stack) -> None:
    from ray.util.state import list_actors

    sids = [f"kill-{i}-{secrets.token_hex(3)}" for i in range(12)]
    before = {}
    for sid in sids:
        status, headers = chat(stack, sid, f"hello {sid}", append=False)
        assert status == 200
        before[sid] = headers["x-replica-id"]
    assert len(set(before.values())) == 2
    victim = next(iter(before.values()))
    engines = list_actors(filters=[("class_name", "=", "ServeReplica:tpserve:Engine"),
                                   ("state", "=", "ALIVE")], address=stack.dashboard)
    target = next(a for a in engines if victim in (a.name or ""))
    ray.kill(ray.get_actor(target.name, namespace=target.ray_namespace))
    after = {}
    for sid in sids:  # a request in the window of the death is retried on a live replica
        status, headers = chat(stack, sid, f"again {sid}", append=True)
        assert status == 200
        after[sid] = headers["x-replica-id"]
    for sid in sids:
        if before[sid] != victim:
            assert after[sid] == before[sid], sid  # untouched sessions stay
        else:
            assert after[sid] != victim
        _, stored = get_json(stack.edge, f"/v1/sessions/{sid}")
        users = [m["content"] for m in stored["history"] if m["role"] == "user"]
        assert users == [f"hello {sid}", f"again {sid}"]  # history intact across the move
    _, text = get_metrics(stack)
    assert "tpserve_pins_moved_total" in text
    stack_tier.wait_whole(stack.running, gone=victim)  # Serve replaces the killed replica


def get_metrics(stack: Stack) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.edge, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def test_metrics_expose_requests_latency_and_sessions(stack: Stack) -> None:
    post(stack.edge, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2})
    status, text = get_metrics(stack)
    assert status == 200
    for name in ("tpserve_requests_total", "tpserve_request_seconds_bucket",
                 "tpserve_time_to_first_token_seconds_bucket", "tpserve_tokens_total",
                 "tpserve_live_sessions", "tpserve_redis_degraded",
                 'tpserve_replica_in_flight{replica="'):
        assert name in text, name
    live = next(line for line in text.splitlines() if line.startswith("tpserve_live_sessions"))
    assert float(live.split()[-1]) > 0


@pytest.mark.stack("faults")
def test_stream_on_a_dying_replica_ends_with_an_error_event(stack: Stack) -> None:
    from ray.util.state import list_actors

    # the replicas' actors looked up first, and a stream that runs to the context's end
    # (no max_tokens: ~2,000 tokens of the tiny model), so that it cannot end before its
    # replica is killed
    engines = list_actors(filters=[("class_name", "=", "ServeReplica:tpserve:Engine"),
                                   ("state", "=", "ALIVE")], address=stack.dashboard)
    conn = http.client.HTTPConnection("127.0.0.1", stack.edge, timeout=60)
    body = {"messages": [{"role": "user", "content": "go"}], "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "X-Session-ID": "dying-1"})
    resp = conn.getresponse()
    assert resp.status == 200
    replica = resp.getheader("x-replica-id")
    first = resp.readline()
    assert first.startswith(b"data: {")
    target = next(a for a in engines if replica in (a.name or ""))
    ray.kill(ray.get_actor(target.name, namespace=target.ray_namespace))
    rest = resp.read().decode()  # bounded by the connection timeout: never a hang
    events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert any("error" in json.loads(e) for e in events[:-1]), events[-3:]
    stack_tier.wait_whole(stack.running, gone=replica)  # Serve replaces the killed replica
