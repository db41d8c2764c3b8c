"""The OpenAI-compatible HTTP API in front of the engine replicas: HTTP only, no Ray.

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not; SSE ending in
`data: [DONE]`), GET /v1/models, GET /healthz, GET /metrics, GET and DELETE
/v1/sessions/{id}. Every generation response carries X-Replica-ID, and X-Session-ID when
the request has a session.

Sessions: the pin key is X-Session-ID, else the OpenAI `user`, else the client IP (the
socket peer; X-Real-IP / X-Forwarded-For only from trusted proxies), see router/policy.py.
A session (pin and history under an id, in X-Session-ID) is stored only for a request
that uses one, unless RouterConfig.sessions is "always".
The router talks to the engine through an `EngineClient` (router/wire.py's messages), which
the cluster injects (cluster/engine.py: ServeEngine calls the engine deployment's handle with
`.options(session_id=key)`, and the deployment's request router, cluster/pinning.py, keeps
the pin in Redis). A chat request with a known session may send only its new messages with
`"session": {"append": true}`: the stored history is prepended and the reply stored.
`Router` holds the state and the handlers; `make_api` gives its FastAPI app, which
cluster/app.py serves as the Serve ingress and tests call in-process.

Errors: the engine's come as wire ErrorEvents that already carry their HTTP status
(mapped once, in cluster/requests.py); the router forwards that status, and retries once a
request whose replica failed (503) before its first token.

Bad input is a 4xx with an OpenAI-style error body, never a 5xx: malformed JSON, wrong
types, unknown model, empty prompt, prompt + max_tokens over the context window (the
engine's check), a body over `max_body_bytes`, absurd parameter values. Overload is a 429
with Retry-After.
"""

import asyncio
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import keys, metrics, wire
from router.admin import Admin, Control
from router.errors import ApiError
from router.looplag import LoopLag
from router.policy import (
    RATE_LIMIT_PER_MINUTE,
    ROUTING_MODES,
    SESSION_POLICIES,
    PolicyError,
    SessionKey,
    parse_networks,
    session_key,
    stored_session,
)
from router.responses import (
    Choice,
    chunk,
    message,
    plain_event,
    usage,
    usage_chunk,
    whole,
)
from router.schema import Body, ChatBody, CompletionBody, ParamError
from router.sessions import SessionStore, SessionStoreConfig

log = logging.getLogger(__name__)
DASHBOARD_HTML = (Path(__file__).parent / "dashboard.html").read_text()  # no build step


@dataclass(frozen=True)
class RouterConfig:
    """Settings of one router; each default is defined here once."""

    model_name: str = "tpserve"
    redis_url: str | None = None  # None: TPSERVE_REDIS_URL from the environment
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # the local nginx
    session_ttl_s: int = 3600
    history_token_budget: int = 4096
    max_body_bytes: int = 1 << 20
    max_in_flight: int = 256  # per router replica; more is a 429
    # requests a minute per session key at this router replica; 0: no limit (the default,
    # router/policy.py says why)
    rate_limit_per_minute: int = RATE_LIMIT_PER_MINUTE
    retry_after_s: int = 1
    # the Ray dashboard (Serve's REST API): the cluster's control reads and scales through
    # it (cluster/app.py), and the admin page links to it
    ray_dashboard: str = "http://127.0.0.1:8265"
    max_replicas: int = 16  # the admin API refuses to scale past this
    # pinned: a session keeps its replica (the prefix cache pays); random: every request
    # goes to a random live replica (the baseline that infra/load.py measures pinning by)
    routing: str = ROUTING_MODES[0]
    # on_use: a session (pin and chat history in Redis) is stored only for a request that
    # uses one: it sends X-Session-ID, or a chat body with "session": {...} (then the
    # router makes an id and returns it in X-Session-ID). A request with neither gets no
    # X-Session-ID and leaves nothing per request in Redis (its client's pin, keyed on
    # `user` or the IP, is one key per client). always: every request gets a stored session.
    sessions: str = SESSION_POLICIES[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        parse_networks(self.trusted_proxies)  # raises on a bad CIDR
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing={self.routing!r}: use one of {ROUTING_MODES}")
        if self.sessions not in SESSION_POLICIES:
            raise ValueError(f"sessions={self.sessions!r}: use one of {SESSION_POLICIES}")
        for name in ("session_ttl_s", "history_token_budget", "max_body_bytes",
                     "max_in_flight", "max_replicas"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rate_limit_per_minute < 0:
            raise ValueError(f"rate_limit_per_minute must be >= 0 (0: no limit), got "
                             f"{self.rate_limit_per_minute}")


def count_tokens(message: dict[str, Any]) -> int:
    """Rough token count of a stored chat turn (~4 characters a token, plus the role):
    the router holds no tokenizer; the budget is a bound, not an exact figure."""
    calls = message.get("tool_calls")
    text = (message.get("content") or "") + (json.dumps(calls) if calls else "")
    return 4 + len(text) // 4


class EngineClient(Protocol):
    """The engine replicas, as the router sees them (cluster/engine.py: ServeEngine)."""

    def generate(self, request: wire.Request, session_key: str
                 ) -> AsyncGenerator[wire.Item, None]:
        """The request's Deltas, pinned by `session_key`; a failure is the stream's last
        item, an ErrorEvent with its HTTP status (never an exception)."""
        ...


def _delta(item: wire.Item | None, retry_after_s: int = 1) -> wire.Delta:
    """An item of the engine's stream; ApiError, with the status the engine boundary gave
    it, for an ErrorEvent (None: a stream that ended before its first item)."""
    if item is None:
        item = wire.ErrorEvent(503, "replica_unavailable", "the engine's stream ended "
                               "before its first item")
    if isinstance(item, wire.ErrorEvent):
        headers = {"Retry-After": str(retry_after_s)} if item.retryable else None
        raise ApiError(item.status, item.message, item.type, headers=headers)
    return item


def _event(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


class RateLimiter:
    """A token bucket per client key: `per_minute` requests, refilled continuously."""

    MAX_KEYS = 100_000  # past this, idle buckets are forgotten (bounded memory)

    def __init__(self, per_minute: int, clock: Any = time.monotonic) -> None:
        self.capacity, self.rate, self.clock = float(per_minute), per_minute / 60.0, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def take(self, key: str) -> int:
        """0 if the request may go, else the seconds to wait (for Retry-After)."""
        now = self.clock()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return math.ceil((1.0 - tokens) / self.rate)
        if len(self.buckets) >= self.MAX_KEYS and key not in self.buckets:
            self.buckets.clear()
        self.buckets[key] = (tokens - 1.0, now)
        return 0


@dataclass
class _Call:
    """One generation request on its way through the router: its choices (`n`, and on
    /v1/completions one per prompt and n), each with its own engine request."""

    route: str
    body: Body
    key: SessionKey
    session_id: str  # "" when the request uses no session (RouterConfig.sessions)
    issued: bool  # the router made the session id (the client sent none)
    choices: list[Choice]
    new_messages: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    cid: str = ""
    replica: str = ""
    prompt_tokens: int = 0
    tokens: int = 0
    pin: asyncio.Task[Any] | None = None  # an issued session's pin, claimed meanwhile

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.tokens)


class Router:
    """The router's state (config, session store, limits, totals) and its handlers."""

    def __init__(self, engine: EngineClient, config: RouterConfig | None = None,
                 control: Control | None = None) -> None:
        self.config = config or RouterConfig()
        self.trusted = parse_networks(self.config.trusted_proxies)
        self.engine = engine
        url = self.config.redis_url or os.environ.get("TPSERVE_REDIS_URL") or None
        self.sessions = SessionStore(SessionStoreConfig(
            url=url, ttl_s=self.config.session_ttl_s,
            history_token_budget=self.config.history_token_budget))
        self.sessions.warm_soon()  # (in a Serve replica, its loop runs: open them now)
        self.in_flight = 0
        self.loop_lag = LoopLag(metrics.LOOP_LAG.observe)  # (started by the first request)
        self.limiter = (RateLimiter(self.config.rate_limit_per_minute)
                        if self.config.rate_limit_per_minute else None)
        self.totals = {"requests": 0, "tokens": 0, "ttft_sum_s": 0.0, "ttft_count": 0}
        # the admin token comes from the environment, never from the (visible) Serve config
        self.admin = Admin(control, self.sessions, os.environ.get("TPSERVE_ADMIN_TOKEN") or None,
                           self.config.max_replicas, self.config.ray_dashboard, self.totals)

    # ---- routes ----

    async def healthz(self) -> dict[str, Any]:
        await self.sessions.ping()  # Redis' state now, not as the last session op saw it
        degraded = self.sessions.degraded
        metrics.DEGRADED.set(1 if degraded else 0)
        return {"status": "degraded" if degraded else "ok", "redis": not degraded,
                "in_flight": self.in_flight}

    async def prometheus(self) -> Response:
        metrics.LIVE_SESSIONS.set(await self.sessions.live_sessions())
        metrics.DEGRADED.set(1 if self.sessions.degraded else 0)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model()]}

    async def model(self, model_id: str) -> Response:
        if model_id != self.config.model_name:
            return self._no_model(model_id).response()
        return JSONResponse(self._model())

    def _no_model(self, model_id: str) -> ApiError:
        return ApiError(404, f"model {model_id!r} does not exist; GET /v1/models lists "
                        f"{self.config.model_name!r}", param="model")

    def _model(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": 0,
                "owned_by": "tpserve"}

    async def get_session(self, session_id: str) -> Response:
        stored = await self.sessions.get_session(keys.session_id(session_id))
        if stored is None:
            return ApiError(404, f"no session {session_id!r}", "not_found").response()
        return JSONResponse({"id": session_id, **stored})

    async def delete_session(self, session_id: str) -> Response:
        if not await self.sessions.delete_session(keys.session_id(session_id)):
            return ApiError(404, f"no session {session_id!r}", "not_found").response()
        return JSONResponse({"id": session_id, "deleted": True})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions", CompletionBody)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat", ChatBody)

    async def dashboard(self) -> Response:
        return HTMLResponse(DASHBOARD_HTML)

    # ---- the generation path ----

    async def _serve(self, request: Request, route: str, model: type[Body]) -> Response:
        begun = time.perf_counter()
        try:
            call = await self._admit(request, route, model)
        except ApiError as e:
            metrics.REQUESTS.labels(route, str(e.status)).inc()
            return e.response()
        self.in_flight += 1
        self.loop_lag.ensure_started()
        try:
            await self._start(call)
        except ApiError as e:
            self.in_flight -= 1
            metrics.REQUESTS.labels(route, str(e.status)).inc()
            return e.response()
        # the router's own part of the time to first token (from taking the request to
        # its first delta), for a client to tell it from the rest of the way
        headers = {"X-Replica-ID": call.replica,
                   "Server-Timing": f"router;dur={(time.perf_counter() - begun) * 1e3:.3f}"}
        if call.session_id:
            headers["X-Session-ID"] = call.session_id
        if call.body.streaming:
            return StreamingResponse(self._sse(call), headers=headers,
                                     media_type="text/event-stream")
        try:
            await _each(call.choices, self._collect)
        except ApiError as e:
            metrics.REQUESTS.labels(route, str(e.status)).inc()
            return e.response()
        finally:
            self.in_flight -= 1
            await _close(call)
        await self._finish(call)
        return JSONResponse(whole(route, call.cid, self.config.model_name, call.choices,
                                  bool(call.body.return_token_ids), call.usage()),
                            headers=headers)

    async def _admit(self, request: Request, route: str, model: type[Body]) -> _Call:
        body = await self._parse(request, model)
        if body.model is not None and body.model != self.config.model_name:
            raise self._no_model(body.model)
        peer = request.client.host if request.client else "0.0.0.0"
        try:
            key = session_key(request.headers, body.prompt_cache_key or body.user, peer,
                              self.trusted)
        except PolicyError as e:
            raise ApiError(400, str(e), param="user") from e
        self._rate_limit(key.redis_key)
        if self.in_flight >= self.config.max_in_flight:
            raise ApiError(429, "too many requests in flight; retry shortly",
                           "rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        issued = key.kind != "session"
        opens = isinstance(body, ChatBody) and body.session is not None
        session_id = stored_session(key, opens, self.config.sessions)  # "": none stored
        cid = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        n = body.choices
        if not isinstance(body, ChatBody):
            assert isinstance(body, CompletionBody)
            echo = bool(body.echo)
            choices = [Choice(i * n + j, wire.Request(body.engine_params(j), prompt=prompt,
                                                      echo=echo),
                              prompt if isinstance(prompt, str) else None)
                       for i, prompt in enumerate(body.prompts()) for j in range(n)]
            return _Call(route, body, key, session_id, issued, choices, cid=cid)
        new_messages = [m.for_template() for m in body.messages]
        history = []
        if body.session is not None and body.session.append and not issued:
            history = await self.sessions.history(key.redis_key)
        choices = [Choice(j, wire.Request(body.engine_params(j),
                                          messages=history + new_messages,
                                          tools=body.tools_spec()))
                   for j in range(n)]
        return _Call(route, body, key, session_id, issued, choices, new_messages, cid=cid)

    async def _parse(self, request: Request, model: type[Body]) -> Body:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > \
                self.config.max_body_bytes:
            raise ApiError(413, f"request body over {self.config.max_body_bytes} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > self.config.max_body_bytes:
                raise ApiError(413, f"request body over {self.config.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from e

    def _rate_limit(self, key: str) -> None:
        if self.limiter is None:
            return
        wait = self.limiter.take(key)
        if wait:
            raise ApiError(429, "rate limit exceeded for this client", "rate_limit_exceeded",
                           headers={"Retry-After": str(wait)})

    def _delta(self, item: wire.Item | None) -> wire.Delta:
        return _delta(item, self.config.retry_after_s)

    async def _open(self, call: _Call, choice: Choice) -> None:
        """Start one choice's engine stream and read its first delta; a request whose
        replica failed before the first token (a retryable ErrorEvent) is sent once more
        (the request router re-pins the session to a live replica)."""
        for attempt in (1, 2):
            start = time.perf_counter()
            choice.stream = self.engine.generate(choice.request, call.key.redis_key)
            first = await anext(choice.stream, None)
            metrics.ENGINE_FIRST.observe(time.perf_counter() - start)
            if not (attempt == 1 and isinstance(first, wire.ErrorEvent) and first.retryable):
                break
            log.warning("replica failed before the first token, retrying once: %s",
                        first.message)
            await choice.stream.aclose()
        choice.deltas.append(self._delta(first))  # ApiError: the engine refused it

    async def _start(self, call: _Call) -> None:
        """Every choice's stream, up to its first delta (ApiError, all closed, when one
        fails); the call's replica, prompt tokens, time to first token and pin."""
        try:
            await _each(call.choices, lambda c: self._open(call, c))
        except ApiError:
            await _close(call)
            raise
        first = call.choices[0].deltas[0]
        call.replica = first.replica
        n = call.body.choices  # one prompt per n choices: count each prompt once
        call.prompt_tokens = sum(c.deltas[0].prompt_tokens or 0 for c in call.choices
                                 if c.index % n == 0)
        ttft = time.perf_counter() - call.started
        metrics.TTFT.labels(call.route).observe(ttft)
        self.totals["ttft_sum_s"] += ttft
        self.totals["ttft_count"] += 1
        if call.issued and call.session_id and self.config.routing == "pinned":
            # the next turn, sent with this id, goes to the same replica: claimed while
            # the first token goes out (no Redis round trip before it) and awaited before
            # the response ends (_close): a next turn sent after this one finds the pin
            call.pin = asyncio.create_task(self.sessions.claim_pin(
                keys.session_id(call.session_id), call.replica, [call.replica]))

    async def _collect(self, choice: Choice) -> None:
        async for item in choice.stream:
            choice.deltas.append(self._delta(item))

    async def _finish(self, call: _Call) -> None:
        call.tokens = sum(len(d.token_ids) for c in call.choices for d in c.deltas)
        metrics.REQUESTS.labels(call.route, "200").inc()
        metrics.LATENCY.labels(call.route).observe(time.perf_counter() - call.started)
        metrics.TOKENS.labels("prompt").inc(call.prompt_tokens)
        metrics.TOKENS.labels("completion").inc(call.tokens)
        self.totals["requests"] += 1
        self.totals["tokens"] += call.tokens
        if call.route == "chat" and call.session_id:
            reply = message(call.choices[0])  # the first choice's
            reply["content"] = reply["content"] or ""
            with metrics.HISTORY_APPEND.time():
                await self.sessions.append_history(keys.session_id(call.session_id),
                                                   call.new_messages + [reply], count_tokens)

    async def _sse(self, call: _Call) -> AsyncIterator[str]:
        model, ids = self.config.model_name, bool(call.body.return_token_ids)

        def event(choice: Choice, item: wire.Item) -> str:
            """A later item of a choice's stream as its event (a plain token's directly)."""
            delta = self._delta(item)
            choice.deltas.append(delta)
            if not (ids or choice.logprobs or delta.tool_calls):
                return plain_event(call.route, call.cid, model, choice, delta)
            return _event(chunk(call.route, call.cid, model, choice, delta, False, ids))

        try:
            for choice in call.choices:
                yield _event(chunk(call.route, call.cid, model, choice, choice.deltas[0],
                                   True, ids))
            if len(call.choices) == 1:  # the common case, without _merged's layer
                async for item in call.choices[0].stream:
                    yield event(call.choices[0], item)
            else:
                async for choice, item in _merged(call.choices):
                    yield event(choice, item)
            await self._finish(call)
            if call.body.wants_usage():
                yield _event(usage_chunk(call.route, call.cid, model, call.usage()))
        except ApiError as error:  # the client hears of it in-band
            metrics.REQUESTS.labels(call.route, str(error.status)).inc()
            yield _event(error.body())
        finally:
            self.in_flight -= 1
            await _close(call)
        yield "data: [DONE]\n\n"


async def _each(choices: list[Choice], run: Any) -> None:
    """`run(choice)` for every choice, at once; the first error raised is raised."""
    if len(choices) == 1:
        await run(choices[0])
        return
    results = await asyncio.gather(*(run(c) for c in choices), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _close(call: _Call) -> None:
    for choice in call.choices:
        if choice.stream is not None:
            await choice.stream.aclose()
    if call.pin is not None:
        await call.pin


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, wire.Item]]:
    """The items of every choice's stream, as they come."""
    queue: asyncio.Queue[tuple[Choice, wire.Item | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for item in choice.stream:
                await queue.put((choice, item))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            choice, item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()


def _validation_error(error: ValidationError) -> ApiError:
    """A body's first validation error as a 400 that names the field."""
    err = error.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return ApiError(400, str(cause), param=cause.param)
    loc = ".".join(str(p) for p in err["loc"])
    message = str(cause) if isinstance(cause, ValueError) else err["msg"]
    param = loc or (message.split(":", 1)[0] if ":" in message else None)
    return ApiError(400, f"{loc}: {message}" if loc else message, param=param)


def make_api(router: Router) -> FastAPI:
    """The router's HTTP app: its routes bound to `router`."""
    api = FastAPI(title="tpserve", docs_url=None, redoc_url=None)
    routes: list[tuple[str, str, Any]] = [
        ("GET", "/healthz", router.healthz), ("GET", "/metrics", router.prometheus),
        ("GET", "/v1/models", router.models),
        ("GET", "/v1/models/{model_id:path}", router.model),
        ("GET", "/v1/sessions/{session_id}", router.get_session),
        ("DELETE", "/v1/sessions/{session_id}", router.delete_session),
        ("POST", "/v1/completions", router.completions),
        ("POST", "/v1/chat/completions", router.chat_completions),
        ("GET", "/dashboard", router.dashboard),
        ("GET", "/admin/replicas", router.admin.replicas),
        ("POST", "/admin/scale", router.admin.scale),
    ]
    for method, path, endpoint in routes:
        api.add_api_route(path, endpoint, methods=[method])

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        """Starlette's own answers (no such route, a method a route does not take) in
        OpenAI's error shape rather than {"detail": ...}."""
        message = (f"no route {request.method} {request.url.path}" if error.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}"
                   if error.status_code == 405 else str(error.detail))
        return ApiError(error.status_code, message, headers=dict(error.headers or {})
                        ).response()

    return api
