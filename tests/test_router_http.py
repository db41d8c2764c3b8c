"""The router's HTTP contract in-process: its ASGI app (router.app.make_api) called
directly, no Ray, no Serve, no nginx. The engine is a fake that yields wire deltas (the
fuzz runs on the real tiny engine, still in this process); sessions live in a real
redis-server on a free loopback port. Bad bodies, the fuzz, SSE framing and [DONE],
usage, history append, rate limits, retry-once, errors forwarded with the engine
boundary's status, and the admin API over a fake control."""

from __future__ import annotations

import asyncio
import json
import threading
import zlib
from collections.abc import AsyncGenerator, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redisserver import RedisServer, running
from routerserver import LocalEngine

from router import wire
from router.admin import ControlError, ControlTimeout, DeploymentStatus, ReplicaStatus
from router.app import Router, RouterConfig, make_api

RATE_LIMIT = 300  # per client key and minute, in the rate-limited router
MAX_MODEL_LEN = 512  # the fake engine's context window, as the stack's engine


# ---- an event loop of the test's own, and an ASGI client on it ----------------------------


class Loop:
    """One event loop in a thread: the router, its Redis pool and the engine live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The data of each server-sent event, in order."""
        return [line[6:] for line in self.body.decode().split("\n\n") if line]


async def asgi(app: Any, method: str, path: str, body: bytes, headers: dict[str, str],
               source: str) -> Reply:
    """One HTTP request through the ASGI app, as a server would make it; the whole body."""
    head = {"content-type": "application/json", "content-length": str(len(body)), **{
        k.lower(): v for k, v in headers.items()}}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": (source, 50000),
             "server": ("127.0.0.1", 80),
             "headers": [(k.encode(), v.encode()) for k, v in head.items()]}
    done, sent = asyncio.Event(), False
    status, out_headers, chunks = 0, {}, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays until the response is whole
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update({k.decode(): v.decode() for k, v in message["headers"]})
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return Reply(status, out_headers, b"".join(chunks))


class Client:
    """Requests to one router's app, from a chosen client address."""

    def __init__(self, loop: Loop, router: Router) -> None:
        self.loop, self.router, self.app = loop, router, make_api(router)

    def request(self, method: str, path: str, body: object = b"",
                headers: dict[str, str] | None = None, source: str = "127.0.0.1") -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.loop.run(asgi(self.app, method, path, data, headers or {}, source))

    def post(self, path: str, body: object, headers: dict[str, str] | None = None,
             source: str = "127.0.0.1") -> Reply:
        return self.request("POST", path, body, headers, source)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self.request("GET", path, b"", headers)


# ---- the fake engine ------------------------------------------------------------------------


def prompt_length(request: wire.Request) -> int:
    if request.messages is not None:
        return sum(1 + len(m["content"].split()) for m in request.messages)
    prompt = request.prompt
    return len(prompt.split()) if isinstance(prompt, str) else len(prompt or [])


def fake_logprob(token: str, i: int, top: int) -> wire.TokenLogprob:
    """The fake engine's logprob of its token i, and `top` alternatives (itself first)."""
    value = -0.25 * (i + 1)
    return wire.TokenLogprob(token, value, [(token, value), ("alt", value - 1)][:top])


@dataclass
class FakeEngine:
    """Yields wire deltas: token i is id 100+i, text "w{i} "; refuses what the real engine
    refuses here (an empty prompt, prompt + max_tokens over MAX_MODEL_LEN) with a 400
    ErrorEvent. With logprobs, token i's logprob is -0.25 (i + 1) (`fake_logprob`); with
    echo, the first delta has "P" + the prompt as its text. `first` scripts the first items
    of the next calls (a failed replica's 503);
    `fail_after` ends each stream with that ErrorEvent after two deltas."""

    replicas: tuple[str, ...] = ("replica-a", "replica-b")
    first: list[wire.ErrorEvent] = field(default_factory=list)
    fail_after: wire.ErrorEvent | None = None
    calls: list[tuple[wire.Request, str]] = field(default_factory=list)

    def replica(self, key: str) -> str:
        return self.replicas[zlib.crc32(key.encode()) % len(self.replicas)]

    async def generate(self, request: wire.Request, session_key: str
                       ) -> AsyncGenerator[wire.Item, None]:
        self.calls.append((request, session_key))
        replica = self.replica(session_key)
        if self.first:
            yield self.first.pop(0)
            return
        n, max_tokens = prompt_length(request), request.params.get("max_tokens", 16)
        max_tokens = MAX_MODEL_LEN - n if max_tokens is None else int(max_tokens)
        if n == 0 or n + max_tokens > MAX_MODEL_LEN:
            yield wire.ErrorEvent(400, "invalid_request_error", f"prompt ({n} tokens) + "
                                  f"max_tokens ({max_tokens}) over max_model_len "
                                  f"({MAX_MODEL_LEN})", replica)
            return
        top = request.params.get("top_logprobs", 0)
        logprobs = request.params.get("logprobs")
        for i in range(max_tokens):
            if i == 2 and self.fail_after is not None:
                yield self.fail_after
                return
            await asyncio.sleep(0)
            echo = request.echo and i == 0
            yield wire.Delta([100 + i], f"w{i} ", "length" if i == max_tokens - 1 else None,
                             replica, n if i == 0 else None,
                             [fake_logprob(f"w{i} ", i, top)] if logprobs else None,
                             f"P{request.prompt}" if echo else None,
                             [wire.TokenLogprob("p0", None)] + [
                                 fake_logprob(f"p{j}", j, top) for j in range(1, n)]
                             if echo and logprobs else None)


# ---- fixtures -------------------------------------------------------------------------------


ROUTERS: list[Router] = []  # every router of this module; their Redis pools close at the end


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    for router in ROUTERS:
        loop.run(router.sessions.close())
    loop.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running() as server:
        yield server


def router_with(engine: Any, redis_server: RedisServer, control: Any = None,
                **config: Any) -> Router:
    ROUTERS.append(Router(engine, RouterConfig(redis_url=redis_server.url(), **config),
                          control))
    return ROUTERS[-1]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(loop: Loop, redis_server: RedisServer, engine: FakeEngine) -> Client:
    return Client(loop, router_with(engine, redis_server))


# ---- bad input ------------------------------------------------------------------------------


BAD_BODIES = [b"", b"{", b"[]", b"null", b'"x"', json.dumps({"prompt": ""}).encode(),
              json.dumps({"prompt": "x", "max_tokens": -1}).encode(),
              json.dumps({"prompt": "x", "max_tokens": "5"}).encode(),
              json.dumps({"prompt": "x", "temperature": 1e9}).encode(),
              json.dumps({"prompt": "x", "model": "gpt-4"}).encode(),
              json.dumps({"prompt": list(range(600)), "max_tokens": 1}).encode(),
              json.dumps({"prompt": "x", "max_tokens": 600}).encode(),
              b"x" * (2 << 20)]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_input_is_a_4xx_with_an_openai_error(client: Client, body: bytes) -> None:
    reply = client.post("/v1/completions", body)
    assert 400 <= reply.status < 500, (reply.status, reply.body[:200])
    assert "message" in reply.json()["error"]


def test_an_engine_refusal_is_forwarded_with_its_status_and_message(
        client: Client, engine: FakeEngine) -> None:
    reply = client.post("/v1/completions", {"prompt": list(range(600)), "max_tokens": 1})
    assert reply.status == 400 and "retry-after" not in reply.headers
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "max_model_len" in error["message"]
    assert len(engine.calls) == 1  # the client's fault: never retried


# ---- the fuzz, on the real tiny engine ------------------------------------------------------


@pytest.fixture(scope="module")
def real_client(loop: Loop, redis_server: RedisServer) -> Iterator[Client]:
    from replicas import Engine, EngineConfig

    engine = Engine(EngineConfig(tp=1, max_model_len=MAX_MODEL_LEN))
    try:
        yield Client(loop, router_with(LocalEngine(engine), redis_server))
    finally:
        engine.shutdown()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4), max_leaves=8)
fields = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 1200), max_size=8),
                        json_values),
    "messages": st.one_of(st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
         "content": st.one_of(st.text(max_size=20), json_values)}), max_size=3), json_values),
    "max_tokens": st.one_of(st.integers(-3, 4), st.integers(10**5, 10**9), json_values),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), json_values),
    "top_p": st.one_of(st.floats(-1, 2, allow_nan=False), json_values),
    "stream": st.one_of(st.booleans(), json_values), "model": json_values,
    "stop": json_values, "seed": json_values, "user": json_values,
    "n": st.one_of(st.integers(0, 3), json_values),
    # the fields of issue 18: logprobs, echo, penalties, bias, tools, structured outputs
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 3), json_values),
    "top_logprobs": st.one_of(st.integers(-1, 3), json_values),
    "echo": st.one_of(st.booleans(), json_values),
    "presence_penalty": st.one_of(st.floats(-3, 3, allow_nan=False), json_values),
    "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["0", "5", "999", "x", "-1"]),
                                            st.floats(-150, 150, allow_nan=False),
                                            max_size=2), json_values),
    "max_completion_tokens": st.one_of(st.integers(-1, 4), json_values),
    "response_format": st.one_of(
        st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "json_schema"},
                         {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                             "type": "object", "properties": {"a": {"type": "boolean"}},
                             "required": ["a"]}}},
                         {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                             "type": "nonsense"}}}]), json_values),
    "tools": st.one_of(st.just([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}}}}}]), json_values),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", {
        "type": "function", "function": {"name": "f"}}]), json_values),
})


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(body=fields, chat=st.booleans())
def test_fuzz_never_5xx_never_hangs(real_client: Client, body: dict, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = real_client.loop.run(asgi(real_client.app, "POST", path, json.dumps(body).encode(),
                                      {}, "127.0.0.1"), timeout=30)
    assert reply.status < 500, (reply.status, body, reply.body[:300])


# ---- responses: whole, streamed, usage ------------------------------------------------------


def test_completion_and_chat_answer_in_openai_shapes(client: Client) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tpserve"]
    reply = client.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 3})
    body = reply.json()
    assert reply.status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "w0 w1 w2 " and body["choices"][0][
        "finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert reply.headers["x-replica-id"] and "x-session-id" not in reply.headers  # none used
    assert "token_ids" not in body["choices"][0]
    ids = client.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 2,
                                          "return_token_ids": True}).json()
    assert ids["choices"][0]["token_ids"] == [100, 101]
    chat = client.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 "}


def test_a_streamed_answer_is_sse_ending_in_done_with_usage(client: Client) -> None:
    whole = client.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}).json()
    reply = client.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4,
        "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status == 200 and reply.headers["content-type"].startswith(
        "text/event-stream")
    # the router's own part of the time to first token, for the client to split it
    timing = reply.headers["server-timing"]
    assert timing.startswith("router;dur=") and float(timing.split("=")[1]) > 0
    assert reply.body.endswith(b"data: [DONE]\n\n")
    assert all(line.startswith("data: ") for line in reply.body.decode().split("\n\n") if line)
    events = reply.events()
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
               for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    plain = client.post("/v1/completions", {"prompt": [5], "max_tokens": 2, "stream": True})
    events = plain.events()
    assert events[-1] == "[DONE]" and len(events) == 3  # two tokens, no usage unless asked
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["w0 ", "w1 "]


def test_a_stream_whose_replica_fails_ends_with_an_error_event_then_done(
        client: Client, engine: FakeEngine) -> None:
    engine.fail_after = wire.ErrorEvent(503, "replica_unavailable", "the replica died")
    reply = client.post("/v1/completions", {"prompt": [5], "max_tokens": 8, "stream": True})
    assert reply.status == 200
    events = reply.events()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["type"], error["message"]) == ("replica_unavailable", "the replica died")
    whole = client.post("/v1/completions", {"prompt": [5], "max_tokens": 8})
    assert whole.status == 503 and whole.headers["retry-after"] == "1"
    assert client.router.in_flight == 0  # every path gave its slot back


# ---- retry once -----------------------------------------------------------------------------


def test_a_replica_that_fails_before_the_first_token_is_retried_once(
        client: Client, engine: FakeEngine) -> None:
    dead = wire.ErrorEvent(503, "replica_unavailable", "the replica died", "replica-a")
    engine.first = [dead]
    reply = client.post("/v1/completions", {"prompt": [5], "max_tokens": 2},
                        {"X-Session-ID": "retry-1"})
    assert reply.status == 200 and len(engine.calls) == 2
    assert engine.calls[0] == engine.calls[1]  # the same request, the same session key
    engine.first = [dead, dead]
    reply = client.post("/v1/completions", {"prompt": [5], "max_tokens": 2})
    assert reply.status == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["type"] == "replica_unavailable"
    assert len(engine.calls) == 4  # once more, not twice more
    assert client.router.in_flight == 0


# ---- sessions and history -------------------------------------------------------------------


def test_sessions_keep_history(client: Client, engine: FakeEngine,
                               redis_server: RedisServer) -> None:
    from router import metrics

    def appends() -> float:  # (each turn's write, timed before its stream's last event)
        return {s.name: s.value for m in metrics.HISTORY_APPEND.collect()
                for s in m.samples}["tpserve_history_append_seconds_count"]

    sid = "hist-1"
    h = {"X-Session-ID": sid}
    body = {"messages": [{"role": "user", "content": "first"}], "max_tokens": 3}
    before = appends()
    assert client.post("/v1/chat/completions", body, h).status == 200
    assert appends() == before + 1
    body = {"messages": [{"role": "user", "content": "second"}], "max_tokens": 3,
            "session": {"append": True}}
    reply = client.post("/v1/chat/completions", body, h)
    assert reply.status == 200 and reply.headers["x-session-id"] == sid
    sent, key = engine.calls[-1]  # the stored history went first, under the session's key
    assert [m["content"] for m in sent.messages or []] == ["first", "w0 w1 w2 ", "second"]
    assert key == f"session:{sid}"
    stored = client.get(f"/v1/sessions/{sid}").json()
    assert [m["content"] for m in stored["history"] if m["role"] == "user"] == [
        "first", "second"]
    with redis_server.client() as r:  # the key schema of router/keys.py
        assert r.exists(f"tpserve:h:session:{sid}")
    for method, status in (("DELETE", 200), ("GET", 404), ("DELETE", 404)):
        assert client.request(method, f"/v1/sessions/{sid}").status == status, method


def test_a_first_turn_with_a_session_field_gets_an_id_and_its_pin(
        client: Client, redis_server: RedisServer) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    reply = client.post("/v1/chat/completions", chat, source="127.0.0.56")
    assert reply.status == 200 and "x-session-id" not in reply.headers
    reply = client.post("/v1/chat/completions", {**chat, "session": {"append": True}},
                        source="127.0.0.56")
    sid = reply.headers["x-session-id"]
    with redis_server.client() as r:  # pinned where the first turn ran, for the next one
        assert r.hget(f"tpserve:s:session:{sid}", "replica") == reply.headers["x-replica-id"]
    again = client.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "again"}], "max_tokens": 2,
        "session": {"append": True}}, {"X-Session-ID": sid}, source="127.0.0.56")
    assert again.status == 200 and again.headers["x-session-id"] == sid
    stored = client.get(f"/v1/sessions/{sid}").json()
    assert [m["content"] for m in stored["history"] if m["role"] == "user"] == ["hi", "again"]
    # streamed: the pin is claimed while the tokens go out, and stored by the stream's end
    reply = client.post("/v1/chat/completions", {**chat, "stream": True,
                                                 "session": {"append": True}},
                        source="127.0.0.57")
    sid = reply.headers["x-session-id"]
    assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
    with redis_server.client() as r:
        assert r.hget(f"tpserve:s:session:{sid}", "replica") == reply.headers["x-replica-id"]


def test_spoofed_forwarding_headers_from_an_untrusted_peer_are_ignored(
        client: Client, engine: FakeEngine) -> None:
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}
    assert client.post("/v1/completions", {"prompt": [5], "max_tokens": 1}, spoof,
                       source="10.1.2.3").status == 200
    assert engine.calls[-1][1] == "ip:10.1.2.3"
    client.post("/v1/completions", {"prompt": [5], "max_tokens": 1}, spoof)  # nginx's peer
    assert engine.calls[-1][1] == "ip:203.0.113.9"


# ---- limits ---------------------------------------------------------------------------------


def test_rate_limit_is_a_429_with_retry_after(loop: Loop, redis_server: RedisServer,
                                              engine: FakeEngine) -> None:
    client = Client(loop, router_with(engine, redis_server, rate_limit_per_minute=RATE_LIMIT))
    source = "127.0.0.99"
    statuses = []
    for _ in range(2 * RATE_LIMIT):  # the bucket refills while we send
        reply = client.post("/v1/completions", {"prompt": [5], "max_tokens": 1}, source=source)
        statuses.append(reply.status)
        if reply.status == 429:
            assert int(reply.headers["retry-after"]) >= 1
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200}
    assert len(statuses) >= RATE_LIMIT - 5  # not before the budget is spent
    assert client.post("/v1/completions", {"prompt": [5], "max_tokens": 1},
                       source="127.0.0.98").status == 200  # another client is not limited


def test_too_many_in_flight_is_a_429(loop: Loop, redis_server: RedisServer,
                                     engine: FakeEngine) -> None:
    client = Client(loop, router_with(engine, redis_server, max_in_flight=1))
    client.router.in_flight = 1  # one request streaming
    reply = client.post("/v1/completions", {"prompt": [5], "max_tokens": 1})
    assert reply.status == 429 and reply.headers["retry-after"] == "1"


def test_health_and_metrics(client: Client) -> None:
    client.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 2})
    assert client.get("/healthz").json() == {"status": "ok", "redis": True, "in_flight": 0}
    text = client.get("/metrics").body.decode()
    for name in ("tpserve_requests_total", "tpserve_request_seconds_bucket",
                 "tpserve_time_to_first_token_seconds_bucket", "tpserve_tokens_total",
                 "tpserve_live_sessions", "tpserve_redis_degraded"):
        assert name in text, name


# ---- admin, over a fake control -------------------------------------------------------------


@dataclass
class FakeControl:
    target: int = 2
    status: str = "HEALTHY"
    message: str = ""
    refuse: str = ""
    late: str = ""  # request_scale's timeout (ControlTimeout) with this message
    asked: list[int] = field(default_factory=list)

    async def deployment(self) -> DeploymentStatus:
        if self.refuse:
            raise ControlError(self.refuse)
        return DeploymentStatus(self.target, (ReplicaStatus("replica-a", "RUNNING"),
                                              ReplicaStatus("replica-b", "STARTING")),
                                self.status, self.message)

    async def request_scale(self, target: int) -> None:
        if self.refuse:
            raise ControlError(self.refuse)
        self.asked.append(target)
        if self.late:
            raise ControlTimeout(self.late)


@pytest.fixture
def admin(loop: Loop, redis_server: RedisServer, engine: FakeEngine,
          monkeypatch: pytest.MonkeyPatch) -> tuple[Client, FakeControl]:
    monkeypatch.setenv("TPSERVE_ADMIN_TOKEN", "sesame")
    control = FakeControl()
    return Client(loop, router_with(engine, redis_server, control, max_replicas=4)), control


AUTH = {"Authorization": "Bearer sesame"}


def test_admin_needs_the_token(admin: tuple[Client, FakeControl]) -> None:
    client, _ = admin
    assert client.get("/admin/replicas").status == 401
    wrong = client.get("/admin/replicas", {"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/dashboard").status == 200  # the page itself asks for the token


def test_admin_scale_is_a_202_and_serve_reports_the_progress(
        admin: tuple[Client, FakeControl], redis_server: RedisServer) -> None:
    client, control = admin
    reply = client.post("/admin/scale", {"replicas": 3}, AUTH)
    assert (reply.status, reply.json(), control.asked) == (202, {"target": 3}, [3])
    for bad in ({"replicas": 0}, {"replicas": 5}, {"replicas": True}, {"n": 2}, b"{"):
        assert client.post("/admin/scale", bad, AUTH).status == 400, bad
    control.target, control.status, control.message = 3, "UPSCALING", "starting 1 replica"
    with redis_server.client() as r:  # the stats replica-a publishes (cluster/engine.py)
        r.set("tpserve:replica:replica-a", json.dumps({"tp": 2, "running": 1}), ex=5)
    state = client.get("/admin/replicas", AUTH).json()
    assert (state["target"], state["max_replicas"]) == (3, 4)  # (the page's scale range)
    assert state["serve"] == {"status": "UPSCALING", "message": "starting 1 replica"}
    rows = {row["id"]: row for row in state["replicas"]}
    assert rows["replica-a"]["state"] == "RUNNING" and rows["replica-a"]["tp"] == 2
    assert rows["replica-b"]["state"] == "STARTING" and rows["replica-b"]["tp"] is None


def test_admin_reports_what_serve_refused(admin: tuple[Client, FakeControl]) -> None:
    client, control = admin
    control.refuse = "deploy the app with external_scaler_enabled: true"
    reply = client.post("/admin/scale", {"replicas": 2}, AUTH)
    assert reply.status == 502 and "external_scaler_enabled" in reply.json()["error"][
        "message"]
    assert client.get("/admin/replicas", AUTH).status == 503


def test_a_scale_serve_answers_too_late_is_a_504_that_says_the_target_may_yet_change(
        admin: tuple[Client, FakeControl]) -> None:
    client, control = admin
    control.late = "no answer within 30 s; Serve's target is still 2"
    reply = client.post("/admin/scale", {"replicas": 3}, AUTH)
    error = reply.json()["error"]
    assert (reply.status, error["type"], control.asked) == (504, "scale_timeout", [3])
    assert "did not answer in time" in error["message"] and "still 2" in error["message"]


# ---- the OpenAI request fields: honoured or refused by name (router/schema.py) --------------


CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2}


@pytest.mark.parametrize(("field", "value"), [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("store", True), ("metadata", {"a": "b"}), ("service_tier", "flex"),
    ("reasoning_effort", "high"), ("functions", [{"name": "f"}]), ("prediction", {}),
    ("web_search_options", {}), ("suffix", "end"), ("safety_identifier", "u1"),
    ("verbosity", "low"), ("frobnicate", 1), ("max_token", 5),
])
def test_a_field_tpserve_does_not_honour_is_a_400_that_names_it(
        client: Client, engine: FakeEngine, field: str, value: object) -> None:
    body = {"prompt": "x", "max_tokens": 2} if field == "suffix" else CHAT
    path = "/v1/completions" if field == "suffix" else "/v1/chat/completions"
    reply = client.post(path, {**body, field: value})
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert not engine.calls  # refused before the engine saw it


@pytest.mark.parametrize(("field", "value"), [
    ("store", False), ("modalities", ["text"]), ("service_tier", "auto"), ("audio", None),
    ("metadata", None), ("tools", None), ("response_format", {"type": "text"}),
    ("temperature", None), ("stream_options", {"include_obfuscation": False}),
])
def test_a_harmless_value_of_a_refused_field_and_null_are_accepted(
        client: Client, field: str, value: object) -> None:
    assert client.post("/v1/chat/completions", {**CHAT, field: value}).status == 200


def test_the_token_limit_max_completion_tokens_wins_and_none_is_the_context(
        client: Client, engine: FakeEngine) -> None:
    reply = client.post("/v1/chat/completions", {**CHAT, "max_completion_tokens": 3})
    assert reply.json()["usage"]["completion_tokens"] == 3
    reply = client.post("/v1/chat/completions", CHAT_NO_LIMIT)
    assert engine.calls[-1][0].params["max_tokens"] is None  # the engine's context bound
    assert reply.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 3
    assert reply.json()["choices"][0]["finish_reason"] == "length"


CHAT_NO_LIMIT = {"messages": [{"role": "user", "content": "Hello there"}]}


def test_n_choices_each_with_its_seed_and_the_prompt_counted_once(
        client: Client, engine: FakeEngine) -> None:
    reply = client.post("/v1/chat/completions", {**CHAT, "n": 3, "seed": 7})
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(call[0].params["seed"] for call in engine.calls) == [7, 8, 9]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    stream = client.post("/v1/chat/completions", {**CHAT, "n": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in stream.events()[:-1]]
    by_choice: dict[int, list[dict]] = {}
    for c in chunks[:-1]:
        by_choice.setdefault(c["choices"][0]["index"], []).append(c["choices"][0])
    assert sorted(by_choice) == [0, 1]
    for parts in by_choice.values():
        assert parts[0]["delta"]["role"] == "assistant"
        assert "".join(p["delta"]["content"] for p in parts) == "w0 w1 "
        assert parts[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_list_of_prompts_gives_prompt_times_n_choices(
        client: Client, engine: FakeEngine) -> None:
    body = client.post("/v1/completions", {"prompt": ["a b", "c"], "n": 2,
                                           "max_tokens": 1}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [call[0].prompt for call in engine.calls] == ["a b", "a b", "c", "c"]
    assert body["usage"]["prompt_tokens"] == 3  # 2 + 1, each prompt once
    ids = client.post("/v1/completions", {"prompt": [[5, 6], [7]], "max_tokens": 1}).json()
    assert len(ids["choices"]) == 2 and engine.calls[-1][0].prompt == [7]
    for bad in ([], [[]], [""], [[5], "x"], [[5, "x"]]):
        reply = client.post("/v1/completions", {"prompt": bad, "max_tokens": 1})
        assert reply.status == 400 and reply.json()["error"]["message"], bad


def test_developer_role_text_parts_and_tool_turns_reach_the_template(
        client: Client, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]
    reply = client.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert reply.status == 200, reply.body
    sent = engine.calls[-1][0].messages or []
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[1]["content"] == "one\ntwo"
    assert sent[2]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert sent[3]["tool_call_id"] == "call_1"
    for bad, param in (
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
             "messages.0"),
            ([{"role": "tool", "content": "2"}], "messages.0"),
            ([{"role": "assistant", "content": None}], "messages.0"),
            ([{"role": "assistant", "content": None, "tool_calls": [{
                "id": "c", "function": {"name": "f", "arguments": "{"}}]}], "messages.0")):
        reply = client.post("/v1/chat/completions", {"messages": bad})
        assert reply.status == 400 and reply.json()["error"]["param"] == param, reply.body


def test_models_by_id_and_openai_errors_for_unknown_routes_and_methods(
        client: Client) -> None:
    assert client.get("/v1/models/tpserve").json()["id"] == "tpserve"
    for method, path, status in (("GET", "/v1/models/gpt-4", 404), ("GET", "/v1/nope", 404),
                                 ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/chat/completions", 405)):
        reply = client.request(method, path)
        assert reply.status == status, (method, path)
        assert reply.json()["error"]["message"] and "detail" not in reply.json()


def test_prompt_cache_key_is_the_session_key_before_user(
        client: Client, engine: FakeEngine) -> None:
    for source in ("127.0.0.7", "127.0.0.8"):
        client.post("/v1/chat/completions", {**CHAT, "prompt_cache_key": "k1",
                                             "user": "u1"}, source=source)
    keys_used = {call[1] for call in engine.calls}  # one key for both client addresses
    assert len(keys_used) == 1 and "k1" in keys_used.pop()


# ---- logprobs and echo ----------------------------------------------------------------------


def test_chat_logprobs_whole_and_streamed(client: Client) -> None:
    body = {**CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", body).json()["choices"][0]["logprobs"]
    entries = whole["content"]
    assert [e["token"] for e in entries] == ["w0 ", "w1 ", "w2 "]
    assert [e["logprob"] for e in entries] == [-0.25, -0.5, -0.75]
    assert entries[0]["bytes"] == list(b"w0 ")
    assert [t["token"] for t in entries[1]["top_logprobs"]] == ["w1 ", "alt"]
    streamed = client.post("/v1/chat/completions", {**body, "stream": True}).events()[:-1]
    parts = [e for c in streamed for e in json.loads(c)["choices"][0]["logprobs"]["content"]]
    assert parts == entries
    plain = client.post("/v1/chat/completions", CHAT).json()["choices"][0]
    assert plain["logprobs"] is None
    reply = client.post("/v1/chat/completions", {**CHAT, "top_logprobs": 2})
    assert reply.status == 400 and reply.json()["error"]["param"] == "top_logprobs"


def test_completion_logprobs_with_echo(client: Client, engine: FakeEngine) -> None:
    body = {"prompt": "a b c", "max_tokens": 2, "logprobs": 1, "echo": True}
    choice = client.post("/v1/completions", body).json()["choices"][0]
    assert engine.calls[-1][0].echo and engine.calls[-1][0].params["logprobs"] is True
    assert choice["text"] == "a b cw0 w1 "  # the client's prompt text, then the completion
    lp = choice["logprobs"]
    assert lp["tokens"] == ["p0", "p1", "p2", "w0 ", "w1 "]
    assert lp["token_logprobs"] == [None, -0.5, -0.75, -0.25, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][3] == {"w0 ": -0.25}
    assert lp["text_offset"] == [0, 2, 4, 6, 9]
    streamed = client.post("/v1/completions", {**body, "stream": True}).events()[:-1]
    chunks = [json.loads(c)["choices"][0] for c in streamed]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == lp["tokens"]
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == lp["text_offset"]
    ids = client.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 1, "echo": True})
    assert ids.json()["choices"][0]["text"] == "P[5, 6]w0 "  # the engine's prompt text
    assert ids.json()["choices"][0]["logprobs"] is None
    reply = client.post("/v1/completions", {"prompt": "x", "logprobs": 21})
    assert reply.status == 400 and reply.json()["error"]["param"] == "logprobs"


def test_penalties_and_logit_bias_reach_the_engine_and_bad_ones_are_refused(
        client: Client, engine: FakeEngine) -> None:
    body = {**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1.0,
            "logit_bias": {"17": 5.0, "3": -100}}
    assert client.post("/v1/chat/completions", body).status == 200
    params = engine.calls[-1][0].params
    assert (params["presence_penalty"], params["frequency_penalty"]) == (0.5, -1.0)
    assert params["logit_bias"] == {17: 5.0, 3: -100}
    plain = client.post("/v1/chat/completions", CHAT)
    assert plain.status == 200 and "presence_penalty" not in engine.calls[-1][0].params
    for bad in ({"presence_penalty": 3}, {"logit_bias": {"x": 1}},
                {"logit_bias": {"5": 101}}):
        reply = client.post("/v1/chat/completions", {**CHAT, **bad})
        assert reply.status == 400 and list(bad)[0] in reply.json()["error"]["message"]


# ---- tool calls -----------------------------------------------------------------------------


TOOLS = [{"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


class ToolEngine(FakeEngine):
    """Answers a request with tools by calling the first one (two deltas: some text, then
    the call with finish reason tool_calls)."""

    async def generate(self, request: wire.Request, session_key: str
                       ) -> AsyncGenerator[wire.Item, None]:
        self.calls.append((request, session_key))
        call = wire.ToolCall("call_1", request.tools["tools"][0]["function"]["name"]
                             if request.tools else "none", '{"a": 1}')
        yield wire.Delta([1], "Let me add.", None, "replica-a", 3)
        yield wire.Delta([2, 3], "", "tool_calls", "replica-a", tool_calls=[call])


def test_tools_reach_the_engine_and_calls_come_back_whole_and_streamed(
        loop: Loop, redis_server: RedisServer) -> None:
    engine = ToolEngine()
    client = Client(loop, router_with(engine, redis_server))
    body = {**CHAT, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}
    choice = client.post("/v1/chat/completions", body).json()["choices"][0]
    assert engine.calls[-1][0].tools == {"tools": TOOLS, "choice": "auto", "parallel": False}
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me add."
    assert choice["message"]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "add", "arguments": '{"a": 1}'}}]
    chunks = [json.loads(e)["choices"][0] for e in client.post(
        "/v1/chat/completions", {**body, "stream": True}).events()[:-1]]
    assert chunks[1]["delta"]["tool_calls"] == [{"index": 0, "id": "call_1", "type": "function",
                                                 "function": {"name": "add",
                                                              "arguments": '{"a": 1}'}}]
    assert chunks[-1]["finish_reason"] == "tool_calls"
    client.post("/v1/chat/completions", {**body, "tool_choice": "none"})
    assert engine.calls[-1][0].tools is None  # "none": the model is not shown the tools


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice"),
    ({"tools": TOOLS * 2}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
])
def test_bad_tool_requests_are_refused_by_name(client: Client, extra: dict, param: str
                                               ) -> None:
    reply = client.post("/v1/chat/completions", {**CHAT, **extra})
    assert reply.status == 400 and reply.json()["error"]["message"].startswith(param), \
        reply.body


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(chat=st.booleans(), n=st.integers(1, 3), logprobs=st.booleans(),
       top=st.integers(0, 3), echo=st.booleans(), stream=st.booleans(),
       penalty=st.floats(-2, 2, allow_nan=False), bias=st.sampled_from([None, {"5": 3.0}]),
       form=st.sampled_from(["text", "json_object", "json_schema"]),
       tools=st.sampled_from([None, "auto", "required", "named", "none"]))
def test_fuzz_valid_combinations_of_the_new_fields_answer_whole(
        real_client: Client, chat: bool, n: int, logprobs: bool, top: int, echo: bool,
        stream: bool, penalty: float, bias: dict | None, form: str, tools: str | None
        ) -> None:
    """Valid mixes of n, logprobs, echo, penalties, bias, response_format and tool_choice
    on the real tiny engine: never a 5xx; a whole answer has n choices, each with
    logprobs exactly when asked."""
    body: dict = {"max_tokens": 6, "n": n, "presence_penalty": penalty, "stream": stream,
                  "logit_bias": bias, "seed": 3}
    if chat:
        body.update(messages=[{"role": "user", "content": "Switch the light"}],
                    logprobs=logprobs, top_logprobs=top if logprobs else None)
        if form != "text":
            schema = {"type": "object", "properties": {"on": {"type": "boolean"}},
                      "required": ["on"]}
            body["response_format"] = {"type": form} if form == "json_object" else {
                "type": form, "json_schema": {"name": "s", "schema": schema}}
        if tools is not None and form == "text":
            body["tools"] = [{"type": "function", "function": {"name": "light", "parameters": {
                "type": "object", "properties": {"on": {"type": "boolean"}}}}}]
            body["tool_choice"] = ({"type": "function", "function": {"name": "light"}}
                                   if tools == "named" else tools)
    else:
        body.update(prompt="Once upon a time", logprobs=top if logprobs else None, echo=echo)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reply = real_client.loop.run(asgi(real_client.app, "POST", path, json.dumps(body).encode(),
                                      {}, "127.0.0.1"), timeout=60)
    assert reply.status == 200, (reply.status, body, reply.body[:300])
    if stream:
        assert reply.body.endswith(b"data: [DONE]\n\n") and b'"error"' not in reply.body
        return
    choices = reply.json()["choices"]
    assert sorted(c["index"] for c in choices) == list(range(n))
    assert all((c["logprobs"] is not None) == logprobs for c in choices), choices
