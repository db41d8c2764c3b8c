"""Where the engine's failures get their HTTP status, once (cluster/requests.py): the
replica's request code (serve_request) and the router's end of the handle (ServeEngine),
with fakes for the engine and the handle; no Ray cluster is started."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from cluster.engine import ServeEngine  # noqa: E402
from cluster.requests import ReplicaTimes, error_event, serve_request  # noqa: E402
from replicas import ConfigError, EngineDeadError, RequestError  # noqa: E402
from replicas.engine import TokenDelta  # noqa: E402
from router import wire  # noqa: E402


@pytest.mark.parametrize("error, status", [
    (RequestError("the prompt is empty"), 400), (ConfigError("bad"), 400),
    (wire.WireError("no prompt"), 400), (EngineDeadError("rank 1 died"), 503),
    (RuntimeError("an engine bug"), 503), (TypeError("an engine bug too"), 503),
    (ray.exceptions.RayTaskError("generate", "tb", RequestError("too long")), 400),
    (ray.exceptions.RayTaskError("generate", "tb", EngineDeadError("gone")), 503),
])
def test_every_failure_maps_once_to_400_or_503(error: BaseException, status: int) -> None:
    event = error_event(error, "r")
    assert (event.status, event.replica) == (status, "r")
    assert event.type == ("invalid_request_error" if status == 400 else "replica_unavailable")
    assert event.retryable == (status == 503)
    assert "tb" not in event.message  # the cause's message, without Ray's wrapping


class FakeTokenizer:
    chat_template: str | None = "{% if tools %}<tool_call>{% endif %}"  # Hermes calls

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        if messages[0]["role"] != "user":
            raise ValueError("conversation must start with a user message")
        return [1] * (len(messages) + len(tools or []))


class FakeEngine:
    """Token i is i, text str(i); `script`: the texts of the reply's deltas instead, the
    last finishing with "stop"."""

    tokenizer = FakeTokenizer()
    spec = type("Spec", (), {"family": "qwen2"})()

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = script
        self.params: list[Any] = []  # what each request asked for

    def check_structured(self, spec: Any) -> None:
        pass  # the real engine compiles it here (tests/test_structured.py)

    async def add_request(self, ids: list[int], params: Any, request_id: str | None
                          ) -> AsyncIterator[TokenDelta]:
        self.params.append(params)
        if not ids:
            raise RequestError("the prompt is empty; send at least one token")
        if self.script is not None:
            for i, text in enumerate(self.script):
                yield TokenDelta("x", [i], text, None,
                                 "stop" if i == len(self.script) - 1 else None)
            return
        for i in range(params.max_tokens):
            yield TokenDelta("x", [i], str(i), None,
                             "length" if i == params.max_tokens - 1 else None)


def items(request: dict[str, Any], engine: FakeEngine | None = None) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [item async for item in serve_request(engine or FakeEngine(), request, "r")]

    return asyncio.run(run())


def test_the_replica_streams_wire_deltas_and_refuses_in_band() -> None:
    out = [wire.decode(i) for i in items({"prompt": "ab", "params": {"max_tokens": 2}})]
    assert out == [wire.Delta([0], "0", None, "r", 2), wire.Delta([1], "1", "length", "r")]
    for request, words in (({"prompt": [], "params": {}}, "prompt is empty"),
                           ({"prompt": "a", "params": {"max_tokenz": 1}}, "sampling"),
                           ({"messages": [{"role": "system", "content": "x"}]}, "template"),
                           ({"prompt": 5}, "prompt")):
        (item,) = items(request)
        event = wire.decode(item)
        assert isinstance(event, wire.ErrorEvent) and event.status == 400, request
        assert words in event.message and event.replica == "r"


class SlowEngine(FakeEngine):
    """Its first delta comes `wait_s` after the request reaches add_request."""

    wait_s = 0.05

    async def add_request(self, ids: list[int], params: Any, request_id: str | None
                          ) -> AsyncIterator[TokenDelta]:
        await asyncio.sleep(self.wait_s)
        async for delta in super().add_request(ids, params, request_id):
            yield delta


def test_replica_times_record_the_way_to_the_engine_and_the_first_delta() -> None:
    """A replica's stats say how long its requests took to reach the engine and to their
    first delta (two streamed requests; a refused one reaches neither)."""
    times = ReplicaTimes()

    async def run(request: dict[str, Any]) -> list[dict[str, Any]]:
        return [i async for i in serve_request(SlowEngine(), request, "r", times)]

    for _ in range(2):
        asyncio.run(run({"prompt": "ab", "params": {"max_tokens": 3}}))
    asyncio.run(run({"prompt": [], "params": {}}))  # refused by the engine: no first delta
    summary = times.summary()
    prepare, first = summary["prepare_ms"], summary["replica_ttft_ms"]
    assert (prepare["n"], first["n"]) == (3, 2)
    assert first["p50"] >= SlowEngine.wait_s * 1e3 > prepare["max"]


TOOLS = {"tools": [{"type": "function", "function": {"name": "add"}}], "choice": "auto",
         "parallel": True}
CHAT = [{"role": "user", "content": "1 + 2?"}]


def test_tool_calls_are_parsed_from_the_reply_in_the_templates_format() -> None:
    script = ["Sure. <tool", "_call>{\"name\": \"add\", ", "\"arguments\": {\"a\": 1}}",
              "</tool_call>"]
    out = [wire.decode(i) for i in items({"messages": CHAT, "tools": TOOLS},
                                         FakeEngine(script))]
    assert all(isinstance(d, wire.Delta) for d in out)
    assert "".join(d.text for d in out) == "Sure. "  # the call is not content
    calls = [c for d in out for c in d.tool_calls or []]
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1}')]
    assert out[-1].finish_reason == "tool_calls" and out[0].prompt_tokens == 2  # tools in
    plain = [wire.decode(i) for i in items({"messages": CHAT}, FakeEngine(script))]
    assert "".join(d.text for d in plain) == "".join(script)  # no tools: no parsing
    assert plain[-1].finish_reason == "stop"


def test_tools_for_a_template_that_renders_none_are_refused() -> None:
    engine = FakeEngine(["x"])
    engine.tokenizer = FakeTokenizer()
    engine.tokenizer.chat_template = "{{ messages }}"
    (item,) = items({"messages": CHAT, "tools": TOOLS}, engine)
    event = wire.decode(item)
    assert isinstance(event, wire.ErrorEvent) and event.status == 400
    assert "renders no tools" in event.message


class FakeStream:
    """A Serve response stream: `items`, then `error` raised, if any."""

    def __init__(self, items: list[dict[str, Any]], error: BaseException | None) -> None:
        self.items, self.error, self.cancelled = list(items), error, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.items:
            return self.items.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, stream: FakeStream) -> None:
        self.stream, self.options_seen = stream, []
        self.generate = self

    def options(self, **options: Any) -> FakeHandle:
        self.options_seen.append(options)
        return self

    def remote(self, request: dict[str, Any]) -> FakeStream:
        self.request = request
        return self.stream


DELTA = {"token_ids": [5], "text": "a", "finish_reason": None, "replica": "r"}


def test_the_handle_end_pins_by_session_and_maps_a_dead_replica_to_a_503() -> None:
    handle = FakeHandle(FakeStream([DELTA], ray.exceptions.ActorDiedError()))

    async def run() -> list[wire.Item]:
        engine = ServeEngine(handle, "serve")  # type: ignore[arg-type]
        return [i async for i in engine.generate(wire.Request({}, prompt=[5]), "ip:1.2.3.4")]

    out = asyncio.run(run())
    assert {"session_id": "ip:1.2.3.4"} in handle.options_seen
    assert handle.request == {"params": {}, "prompt": [5]}
    assert out[0] == wire.decode(DELTA)
    assert isinstance(out[1], wire.ErrorEvent) and out[1].status == 503
    assert not handle.stream.cancelled  # it ended by itself


def test_a_reader_that_stops_early_cancels_the_request() -> None:
    handle = FakeHandle(FakeStream([DELTA, DELTA, DELTA], None))

    async def run() -> None:
        stream = ServeEngine(handle, "serve").generate(  # type: ignore[arg-type]
            wire.Request({}, prompt=[5]), "")
        await anext(stream)
        await stream.aclose()

    asyncio.run(run())
    assert handle.stream.cancelled


def test_strict_tools_with_auto_constrain_the_calls_in_the_templates_format() -> None:
    """tool_choice "auto" with a strict function: the request carries the structural tag
    that constrains its calls (replicas/toolcalls.py auto_call_tag), the reply is parsed
    as before, in the template's format (Hermes here, then Llama 3); a response_format
    beside is a 400."""
    strict = {"tools": [{"type": "function", "function": {
        "name": "add", "strict": True, "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}}, "required": ["a"]}}}], "choice": "auto",
        "parallel": False}
    script = ['<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>']
    engine = FakeEngine(script)
    out = [wire.decode(i) for i in items({"messages": CHAT, "tools": strict}, engine)]
    spec = engine.params[-1].structured
    assert spec.kind == "structural_tag"
    fmt = json.loads(spec.spec)["format"]
    assert fmt["type"] == "triggered_tags" and fmt["stop_after_first"] is True
    assert fmt["tags"][0]["content"]["json_schema"] == {  # closed, as json_schema's are
        **strict["tools"][0]["function"]["parameters"], "additionalProperties": False}
    calls = [c for d in out for c in d.tool_calls or []]
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1}')]
    assert out[-1].finish_reason == "tool_calls"
    items({"messages": CHAT, "tools": TOOLS}, engine)  # not strict: nothing constrained
    assert engine.params[-1].structured is None
    llama = FakeEngine(['{"name": "add", "parameters": {"a": 1}}'])
    llama.tokenizer = FakeTokenizer()
    llama.tokenizer.chat_template = "{% if tools %}<|python_tag|>{% endif %}"
    out = [wire.decode(i) for i in items({"messages": CHAT, "tools": strict}, llama)]
    assert json.loads(llama.params[-1].structured.spec)["format"]["type"] == "or"
    assert [(c.name, c.arguments) for d in out for c in d.tool_calls or []] == [
        ("add", '{"a": 1}')]
    both = {"messages": CHAT, "tools": strict, "params": {"structured": {
        "kind": "json_object", "spec": ""}}}
    (item,) = items(both, FakeEngine(script))
    event = wire.decode(item)
    assert isinstance(event, wire.ErrorEvent) and event.status == 400
    assert "response_format" in event.message


def test_replica_times_split_a_traced_way_in_hop_by_hop() -> None:
    """A direct-path call's way in (router's handle call to `deliver`), and with the trace's
    stamps (cluster/waytrace.py) each hop: Serve's routing, gRPC, Serve's dispatch; a call
    without them counts in the way in alone; a head-started request's also in its own."""
    import time

    times = ReplicaTimes()
    now = time.time()
    times.arrived({"sent_at": now - 0.050, "routed_at": now - 0.030}, now - 0.010)
    times.arrived({"sent_at": now - 0.020}, None)  # (trace off)
    times.arrived({}, None)  # (no stamp at all: nothing to measure)
    times.arrived({"sent_at": now - 0.002}, None, head=True)  # (down the data connection)
    summary = times.summary()
    assert summary["way_in_ms"]["n"] == 3 and summary["way_in_routing_ms"]["n"] == 1
    assert summary["way_in_head_ms"]["n"] == 1
    assert 1.5 <= summary["way_in_head_ms"]["mean"] < 20.0
    assert 19.0 <= summary["way_in_routing_ms"]["mean"] <= 21.0
    assert 19.0 <= summary["way_in_transit_ms"]["mean"] <= 21.0
    assert 10.0 <= summary["way_in_dispatch_ms"]["mean"] < 30.0


def test_the_way_trace_wraps_serves_send_and_grpc_handler_only_when_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TPSERVE_WAY_TRACE=1: Serve's gRPC send stamps a deliver call's reply dict with
    `routed_at` (other calls untouched), and its gRPC handler notes when it took the call
    for that call's task (`received_at`); wrapping twice wraps once. Off: nothing is
    wrapped."""
    import time
    from types import SimpleNamespace

    from ray.serve._private import replica
    from ray.serve._private.request_router import replica_wrapper

    from cluster import waytrace

    sent: list[Any] = []

    def send(self: Any, pr: Any, *, with_rejection: bool) -> str:
        sent.append(pr)
        return "call"

    async def handle(self: Any, request: Any, context: Any) -> float | None:
        await asyncio.sleep(0)
        return waytrace.received_at()

    monkeypatch.setattr(replica_wrapper.gRPCReplicaWrapper, "send_request_python", send)
    monkeypatch.setattr(replica.Replica, "HandleRequestWithRejection", handle)
    monkeypatch.delenv(waytrace.ENV, raising=False)
    assert not waytrace.install_router() and not waytrace.install_replica()
    assert replica_wrapper.gRPCReplicaWrapper.send_request_python is send
    monkeypatch.setenv(waytrace.ENV, "1")
    for _ in range(2):
        assert waytrace.install_router() and waytrace.install_replica()
    wrapped = replica_wrapper.gRPCReplicaWrapper.send_request_python
    assert wrapped is not send and wrapped.__wrapped__ is send  # (once: not wrapped twice)
    reply = {"stream": 3, "sent_at": time.time() - 1.0}
    deliver_call = SimpleNamespace(args=({"prompt": "x"}, reply))
    other = SimpleNamespace(args=({"prompt": "x"},))
    assert wrapped(None, deliver_call, with_rejection=True) == "call"
    wrapped(None, other, with_rejection=True)
    assert reply["sent_at"] < reply["routed_at"] <= time.time()
    assert other.args == ({"prompt": "x"},) and sent == [deliver_call, other]
    before = time.time()
    got = asyncio.run(replica.Replica.HandleRequestWithRejection(None, "request", "context"))
    assert got is not None and before <= got <= time.time()
    assert waytrace.received_at() is None  # (set in that call's task alone)
