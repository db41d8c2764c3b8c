"""One request on an engine replica, between the wire and the engine: a wire Request
becomes the engine's prompt and SamplingParams, the engine's deltas become wire Deltas,
and a failure becomes a wire ErrorEvent with its HTTP status, here, once.

- `serve_request`: the replica's side of one request (the engine deployment calls it;
  tests call it on an engine in their process). Chat messages go through the model's
  chat template (with the request's tools); echo asks for the prompt's logprobs; a tool
  request's reply is split into content and calls (replicas/toolcalls.py) in the format
  the template asks for, and a forced tool_choice constrains decoding to a call.
- `error_event`: a request the engine refuses is a 400, anything else (a dead replica or
  rank, an engine bug) a 503, which the router may retry once on another replica.

The engine (replicas: torch, transformers) is imported only inside the functions that
run on an engine replica, so a router replica importing this module loads no torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import ray

from router import wire

if TYPE_CHECKING:
    from replicas import Engine, SamplingParams
    from replicas.engine import TokenDelta
    from replicas.jsonlines import Recent
    from replicas.toolcalls import ToolCallParser

# Serve's own logger: a line logged here lands in the replica's log file (serve/replica_*)
serve_log = logging.getLogger("ray.serve")


def refused(error: BaseException) -> bool:
    """Whether the engine refused the request: the client's error (a 400), logged in one
    line. (An engine error class is only ever seen where its module is loaded: its
    instance was made, or unpickled, there; so this never imports the engine.)"""
    if isinstance(error, wire.WireError):
        return True
    errors, config = sys.modules.get("replicas.errors"), sys.modules.get("replicas.config")
    return ((errors is not None and isinstance(error, errors.RequestError))
            or (config is not None and isinstance(error, config.ConfigError)))


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams from a request; an unknown field is the client's error too."""
    from replicas import RequestError, SamplingParams

    try:
        return SamplingParams(**fields)
    except TypeError as e:
        raise RequestError(f"bad sampling parameters: {e}") from e


def _recent(size: int = 512) -> Recent:
    from replicas.jsonlines import Recent  # (replicas imports torch: engine replicas only)

    return Recent(size)


@dataclass
class ReplicaTimes:
    """What a replica's requests spent before the engine, over the last ones (its stats):
    from entering the replica to reaching the engine's add_request (parsing, the chat
    template, tokenizing, a grammar's compile) and to their first delta; and, on the
    direct data path, from the router's call to entering the replica (wall clocks: the
    same host's, or as far apart as the hosts' clocks), and with TPSERVE_WAY_TRACE=1 that
    way in three (cluster/waytrace.py): Serve's routing, the way over gRPC, Serve's
    dispatch in the replica. And the replica's event loop's lag (router/looplag.py),
    sampled all the time once a request came."""

    prepare: Recent = field(default_factory=_recent)
    first_delta: Recent = field(default_factory=_recent)
    way_in: Recent = field(default_factory=_recent)
    routing: Recent = field(default_factory=_recent)
    transit: Recent = field(default_factory=_recent)
    dispatch: Recent = field(default_factory=_recent)
    head: Recent = field(default_factory=_recent)  # the way in of head-started requests
    loop_lag: Recent = field(default_factory=lambda: _recent(2048))

    def summary(self) -> dict[str, Any]:
        return {"prepare_ms": self.prepare.summary(),
                "replica_ttft_ms": self.first_delta.summary(),
                "way_in_ms": self.way_in.summary(),
                "way_in_routing_ms": self.routing.summary(),
                "way_in_transit_ms": self.transit.summary(),
                "way_in_dispatch_ms": self.dispatch.summary(),
                "way_in_head_ms": self.head.summary(),
                "loop_lag_ms": self.loop_lag.summary()}

    def arrived(self, reply: dict[str, Any], received: float | None,
                head: bool = False) -> None:
        """A direct-path call entering the replica now: its way in from the router's
        handle call (`sent_at`), and where the trace stamped it (`routed_at`, Serve's
        send; `received`, Serve's gRPC handler here), each hop. `head`: the request came
        down the data connection instead, ahead of its call (cluster/datapath.py): its
        way in counts in `head` too."""
        now = time.time()
        sent, routed = reply.get("sent_at"), reply.get("routed_at")
        if sent is None:
            return
        self.way_in.add(now - sent)
        if head:
            self.head.add(now - sent)
        if routed is None or received is None:
            return
        self.routing.add(routed - sent)
        self.transit.add(received - routed)
        self.dispatch.add(now - received)


async def serve_request(engine: Engine, request: dict[str, Any], replica: str,
                        times: ReplicaTimes | None = None
                        ) -> AsyncGenerator[dict[str, Any], None]:
    """Stream the wire Deltas (as dicts) of one wire Request (a dict) on `engine`; the
    first also has prompt_tokens. `times`, when given, records the request's way to the
    engine and its first delta.

    A request the engine refuses (the client's fault, a 400) ends the stream with one
    ErrorEvent and one log line, rather than an exception: Serve logs every exception a
    replica raises at ERROR with its whole traceback. Any other failure raises; the
    caller's end (ServeEngine) maps it."""
    start = time.perf_counter()
    try:
        req = wire.Request.from_dict(request)
        fields = dict(req.params)
        if req.echo and fields.get("logprobs"):
            fields["prompt_logprobs"] = True
        parser = tool_parser(engine, req.tools, fields)
        params = sampling_params(fields)
        ids = prompt_ids(engine, req)
        if params.structured is not None:  # off the replica's event loop (see there)
            await asyncio.to_thread(engine.check_structured, params.structured)
        first = True
        if times is not None:
            times.prepare.add(time.perf_counter() - start)
        async for delta in engine.add_request(ids, params, req.request_id):
            text, calls, reason = delta.text, None, delta.finish_reason
            if parser is not None:
                text, calls, reason = parse_tools(parser, text, reason)
            out = wire.Delta(delta.token_ids, text, reason, replica,
                             len(ids) if first else None,
                             wire_logprobs(engine, delta.token_ids, delta.logprobs,
                                            delta.top_logprobs), tool_calls=calls)
            if first and req.echo:
                out = echoed(engine, out, ids, req, delta)
            if first and times is not None:
                times.first_delta.add(time.perf_counter() - start)
            yield out.to_dict()
            first = False
    except Exception as e:
        if not refused(e):
            raise
        serve_log.info("request refused (400): %s", e)
        yield error_event(e, replica).to_dict()


def tool_parser(engine: Engine, tools: dict[str, Any] | None, fields: dict[str, Any]
                ) -> ToolCallParser | None:
    """The parser of a request's tool calls (None: no tools), in the format the model's
    chat template asks for; a template that renders no tools refuses the request."""
    if tools is None:
        return None
    from replicas import RequestError
    from replicas.toolcalls import (
        ToolCallParser,
        auto_call_tag,
        detect_format,
        named_schema,
        required_schema,
    )

    fmt = detect_format(engine.tokenizer.chat_template, engine.spec.family)
    if fmt is None:
        raise RequestError("tools: this model's chat template renders no tools, so the "
                           "model would never see them")
    names = [t["function"]["name"] for t in tools["tools"]]
    choice, parallel = tools.get("choice", "auto"), bool(tools.get("parallel", True))
    if choice == "auto":
        if any(t["function"].get("strict") for t in tools["tools"]):
            # the calls follow their schemas; the text around them stays free
            if "structured" in fields:
                raise RequestError("response_format and strict tools both constrain the "
                                   "reply; send one of the two")
            try:
                tag = auto_call_tag(fmt, tools["tools"], parallel)
            except ValueError as e:
                raise RequestError(f"tools: {e}") from None
            fields["structured"] = {"kind": "structural_tag", "spec": json.dumps(tag)}
        return ToolCallParser(fmt, names, parallel=parallel)
    # required or a named function: decoding is constrained to a call, as JSON
    if "structured" in fields:
        raise RequestError("response_format and a forced tool_choice both constrain the "
                           "reply; send one of the two")
    forced = choice["function"]["name"] if isinstance(choice, dict) else None
    tool = next((t for t in tools["tools"] if t["function"]["name"] == forced), None)
    schema = named_schema(tool) if tool is not None else required_schema(tools["tools"],
                                                                          parallel)
    fields["structured"] = {"kind": "json_schema", "spec": json.dumps(schema)}
    return ToolCallParser("json", names, forced, parallel)


def parse_tools(parser: ToolCallParser, text: str, reason: str | None
                ) -> tuple[str, list[wire.ToolCall] | None, str | None]:
    """A delta's content, the tool calls it completed, and its finish reason ("tool_calls"
    when a reply that stopped by itself made calls)."""
    content, calls = parser.feed(text)
    if reason is not None:
        rest, more = parser.finish()
        content, calls = content + rest, calls + more
        if reason == "stop" and parser.calls:
            reason = "tool_calls"
    return content, [wire.ToolCall(c.id, c.name, c.arguments) for c in calls] or None, reason


def wire_logprobs(engine: Engine, ids: list[int], logprobs: list[float | None] | None,
                   top: list[list[tuple[int, float]]] | None) -> list[wire.TokenLogprob] | None:
    """The wire's logprobs of tokens `ids`: each token's text (the tokenizer's decoding of
    that one token) with its log-probability and its alternatives'."""
    if logprobs is None:
        return None
    text = engine.tokenizer.decode
    tops = top if top is not None else [[] for _ in ids]
    return [wire.TokenLogprob(text([t]), p, [(text([a]), q) for a, q in alts or []])
            for t, p, alts in zip(ids, logprobs, tops, strict=True)]


def echoed(engine: Engine, delta: wire.Delta, ids: list[int], request: wire.Request,
           first: TokenDelta) -> wire.Delta:
    """The first delta of an echo request: with the prompt's text (decoded, when the
    client sent token ids) and, with logprobs, the prompt tokens' logprobs."""
    text = request.prompt if isinstance(request.prompt, str) else engine.tokenizer.decode(ids)
    return replace(delta, prompt_text=text, prompt_logprobs=wire_logprobs(
        engine, ids, first.prompt_logprobs, first.prompt_top_logprobs))


def prompt_ids(engine: Engine, request: wire.Request) -> list[int]:
    """The prompt's token ids: chat messages through the model's chat template."""
    from replicas import RequestError

    tokenizer = engine.tokenizer
    if request.messages is not None:
        tools = request.tools["tools"] if request.tools else None
        try:
            return tokenizer.apply_chat_template(request.messages, tools)
        except Exception as e:  # a template's own error: bad roles, order, fields
            raise RequestError(f"the chat template rejected the messages: {e}") from e
    prompt = request.prompt
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt or [])


def root_cause(error: BaseException) -> BaseException:
    """The exception raised in the replica, without Ray's task-error wrapping."""
    while isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def error_event(error: BaseException, replica: str = "") -> wire.ErrorEvent:
    """The one mapping of an engine failure to an HTTP status: a request the engine refuses
    is the client's 400; anything else (a dead replica or rank, a failed collective, an
    engine bug) is a 503, never the client's fault, and another replica may serve it."""
    cause = root_cause(error)
    if refused(cause):
        return wire.ErrorEvent(400, "invalid_request_error", str(cause), replica)
    return wire.ErrorEvent(503, "replica_unavailable", str(cause), replica)
