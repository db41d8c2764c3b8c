"""The engine deployment: one Serve replica = one TP group.

Each engine replica is one TP group: Serve reserves a placement group of tp bundles
(STRICT_PACK, one node) for it; the replica itself is rank 0 in bundle 0 and starts ranks
1..tp-1 as actors in the other bundles (cluster/ranks.py). Tokens stream from rank 0
through a DeploymentHandle; a caller that goes away cancels the stream, which aborts the
request in the engine.

Both ends of the router -> engine hop live here, and speak router/wire.py: the replica's
`generate` reads a wire Request and yields wire Deltas, and `ServeEngine` (the router's
engine, over the deployment's handle) reads them back. Errors become a wire ErrorEvent
with its HTTP status in one place, `error_event`: a request the engine refuses is a 400,
anything else (a dead replica or rank, an engine bug) a 503, which the router may retry
once on another replica.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from cluster.control import ENGINE
from router import keys, wire

if TYPE_CHECKING:
    from replicas import Engine, EngineConfig, SamplingParams
    from replicas.engine import TokenDelta
    from replicas.toolcalls import ToolCallParser

# The engine (replicas: torch, transformers) is imported only where it runs: in an engine
# replica's __init__, not when this module loads. A router replica imports this module
# (ServeEngine, error_event) and so stays free of torch; and an engine replica starts its
# rank actors before it spends seconds importing torch, so they import in parallel.

log = logging.getLogger(__name__)
# Serve's own logger: a line logged here lands in the replica's log file (serve/replica_*)
serve_log = logging.getLogger("ray.serve")

# each engine replica publishes its stats (JSON, short TTL, under router/keys.py's
# stats key) every STATS_PERIOD_S when Redis is configured
STATS_PERIOD_S = 1.0
# Serve waits this long for a replica being removed to finish its accepted requests
DRAIN_TIMEOUT_S = 300.0


def refused(error: BaseException) -> bool:
    """Whether the engine refused the request: the client's error (a 400), logged in one
    line. (An engine error class is only ever seen where its module is loaded: its
    instance was made, or unpickled, there; so this never imports the engine.)"""
    if isinstance(error, wire.WireError):
        return True
    engine, config = sys.modules.get("replicas.engine"), sys.modules.get("replicas.config")
    return ((engine is not None and isinstance(error, engine.RequestError))
            or (config is not None and isinstance(error, config.ConfigError)))


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams from a request; an unknown field is the client's error too."""
    from replicas import RequestError, SamplingParams

    try:
        return SamplingParams(**fields)
    except TypeError as e:
        raise RequestError(f"bad sampling parameters: {e}") from e


async def serve_request(engine: Engine, request: dict[str, Any], replica: str
                        ) -> AsyncGenerator[dict[str, Any], None]:
    """Stream the wire Deltas (as dicts) of one wire Request (a dict) on `engine`; the
    first also has prompt_tokens.

    A request the engine refuses (the client's fault, a 400) ends the stream with one
    ErrorEvent and one log line, rather than an exception: Serve logs every exception a
    replica raises at ERROR with its whole traceback. Any other failure raises; the
    caller's end (ServeEngine) maps it."""
    try:
        req = wire.Request.from_dict(request)
        fields = dict(req.params)
        if req.echo and fields.get("logprobs"):
            fields["prompt_logprobs"] = True
        parser = tool_parser(engine, req.tools, fields)
        params = sampling_params(fields)
        ids = prompt_ids(engine, req)
        first = True
        async for delta in engine.add_request(ids, params, req.request_id):
            text, calls, reason = delta.text, None, delta.finish_reason
            if parser is not None:
                text, calls, reason = parse_tools(parser, text, reason)
            out = wire.Delta(delta.token_ids, text, reason, replica,
                             len(ids) if first else None,
                             token_logprobs(engine, delta.token_ids, delta.logprobs,
                                            delta.top_logprobs), tool_calls=calls)
            if first and req.echo:
                out = echoed(engine, out, ids, req, delta)
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
    from replicas.toolcalls import ToolCallParser, detect_format, named_schema, required_schema

    fmt = detect_format(engine.tokenizer.chat_template, engine.spec.family)
    if fmt is None:
        raise RequestError("tools: this model's chat template renders no tools, so the "
                           "model would never see them")
    names = [t["function"]["name"] for t in tools["tools"]]
    choice, parallel = tools.get("choice", "auto"), bool(tools.get("parallel", True))
    if choice == "auto":
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


def token_logprobs(engine: Engine, ids: list[int], logprobs: list[float | None] | None,
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
    from dataclasses import replace

    text = request.prompt if isinstance(request.prompt, str) else engine.tokenizer.decode(ids)
    return replace(delta, prompt_text=text, prompt_logprobs=token_logprobs(
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


@serve.deployment(
    name=ENGINE,
    max_ongoing_requests=64,
    # Serve stops routing to a replica after 3 failed checks in a row: at 0.5 s a replica
    # whose rank died answers 503 for ~1.5 s, not ~6 s (the check is one cheap call)
    health_check_period_s=0.5,
    health_check_timeout_s=30.0,
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
    # no access-log line per handle call: CPU in rank 0's process (the router's nginx has
    # the requests' log)
    logging_config={"enable_access_log": False},
)
class EngineDeployment:
    """One engine replica = one TP group. Takes the engine config as plain data."""

    def __init__(self, config: dict[str, Any], use_gpu: bool, cpus_per_rank: float) -> None:
        from cluster.ranks import RankGroup

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # the rank actors first: their processes start (and import torch) meanwhile
        self.ranks = RankGroup(int(config.get("tp", 1)), use_gpu, cpus_per_rank,
                               f"tpserve-{self.replica_id}")
        from replicas import Engine, EngineConfig

        self.config = EngineConfig(**{**config, "device": "cuda" if use_gpu else "cpu"})
        self.engine = Engine(self.config, launch=self.ranks.launch)
        self._publishing = threading.Event()
        url = os.environ.get("TPSERVE_REDIS_URL")
        if url:
            threading.Thread(target=self._publish_stats, args=(url,), daemon=True,
                             name="tpserve-stats").start()

    def _publish_stats(self, url: str) -> None:
        """Every STATS_PERIOD_S: this replica's queue, KV use and tokens/s into Redis,
        for the dashboard. Best effort: a Redis outage only skips beats."""
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        key = keys.stats(self.replica_id)
        last_tokens, last_time = 0, time.monotonic()
        while not self._publishing.wait(STATS_PERIOD_S):
            stats = self.engine.stats()
            now = time.monotonic()
            rate = (stats["tokens_out"] - last_tokens) / (now - last_time)
            last_tokens, last_time = stats["tokens_out"], now
            beat = {"running": stats["running"], "waiting": stats["waiting"],
                    "tp": stats["tp"], "tokens_per_s": round(rate, 1),
                    "kv_used": round(1 - stats["free_kv_blocks"] / stats["num_kv_blocks"], 4),
                    # for infra/load.py: the prefix-cache hit rate
                    "prefix_cache_hit_blocks": stats["prefix_cache_hit_blocks"],
                    "block_size": self.config.block_size}
            try:
                client.set(key, json.dumps(beat), ex=int(5 * STATS_PERIOD_S))
            except redis.RedisError:
                continue

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The wire items (router/wire.py, as dicts) of one wire Request: `serve_request`."""
        # closed with the stream (a caller gone aborts the request in the engine)
        async with aclosing(serve_request(self.engine, request, self.replica_id)) as items:
            async for item in items:
                yield item

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "replica": self.replica_id}

    def check_health(self) -> None:
        """Serve replaces the replica when this raises: a dead rank, a broken group."""
        if not self.engine.healthy():
            raise RuntimeError("engine unhealthy: a rank died or a collective failed")

    def __del__(self) -> None:
        if hasattr(self, "_publishing"):
            self._publishing.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


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


class ServeEngine:
    """The router's engine (router/app.py: EngineClient) over the engine deployment's
    handle: the request goes out with `.options(session_id=key)`, so the deployment's
    request router (cluster/pinning.py) pins it. Never raises for a failed replica: the
    failure is the stream's last item, an ErrorEvent (`error_event`)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle.options(stream=True)

    async def generate(self, request: wire.Request, session_key: str
                       ) -> AsyncGenerator[wire.Item, None]:
        stream = self.handle.options(session_id=session_key).generate.remote(
            request.to_dict())
        ended = False
        try:
            async for item in stream:
                yield wire.decode(item)
            ended = True
        except Exception as e:  # noqa: BLE001 - mapped here, once, for the router
            ended = True
            log.warning("engine stream failed: %r", e)
            yield error_event(e)
        finally:
            if not ended:  # the router stopped reading (its client went away): abort
                stream.cancel()


def engine_deployment(config: EngineConfig, cpus_per_rank: float = 1.0,
                      use_gpu: bool | None = None, num_replicas: int = 1,
                      request_router_class: str | None = None,
                      request_router_kwargs: dict[str, Any] | None = None) -> Any:
    """The engine deployment bound to `config`, with its placement group of tp bundles."""
    if use_gpu is None:
        use_gpu = config.device == "cuda" or (
            config.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    bundle = {"CPU": cpus_per_rank, **({"GPU": 1} if use_gpu else {})}
    return EngineDeployment.options(
        ray_actor_options={"num_cpus": cpus_per_rank, "num_gpus": 1 if use_gpu else 0},
        placement_group_bundles=[bundle] * config.tp,
        placement_group_strategy="STRICT_PACK",
        num_replicas=num_replicas,
        **({"request_router_config": RequestRouterConfig(
            request_router_class=request_router_class,
            request_router_kwargs=request_router_kwargs or {})} if request_router_class else {}),
    ).bind(config.to_dict(), use_gpu, cpus_per_rank)
