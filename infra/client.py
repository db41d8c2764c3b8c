"""The streaming chat client of the load, chaos and soak scripts: one turn
(`chat_turn`: an OpenAI streaming chat request with X-Session-ID, retried after a 429/503,
never raising and never waiting past its timeout), recorded as a `Turn` (status, replica,
time to first token, token arrival times, usage, error), and `run_clients`: concurrent
clients running multi-turn sessions until a shared `Budget` (deadline, request count)
ends."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# words of the tiny model's training corpus: each is one or a few tokens
WORDS = ("the quick brown fox jumps over lazy dog journey thousand miles begins with single "
         "step question glitters gold best times worst wisdom age belief server request "
         "prompt model token layer cache keys values tensor parallel router user assistant "
         "system message sea wide deep sings sailors sleep weather paris sunny warm").split()



# ---- one request and its measurements -----------------------------------------------


@dataclass
class Turn:
    """One chat request as the client saw it. Times are monotonic seconds."""

    session: str
    turn: int
    started: float
    content: str = ""  # the user message sent
    status: int = 0  # HTTP status; 0 when the connection failed before one
    replica: str = ""
    ttft_s: float | None = None
    router_s: float | None = None  # the router's part of it (its Server-Timing header)
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""  # an error event, a broken stream, a refusal, or "hang"
    retries: int = 0  # refusals (429/503) retried after their Retry-After
    done: bool = False  # [DONE] arrived
    ended: float = 0.0
    client: int = -1  # which of the run's clients sent it (`client` sets it)

    @property
    def accepted(self) -> bool:
        return self.status == 200

    @property
    def ok(self) -> bool:
        return self.accepted and self.done and not self.error

    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass(frozen=True)
class LoadConfig:
    """What one load run sends; each default exists here once (the CLI is built from it)."""

    url: str = "http://127.0.0.1:8080"
    clients: int = 4
    turns: int = 4  # turns per session; a client then starts a new session
    max_tokens: int = 16
    user_words: int = 24  # words in each user message
    duration: float = 30.0  # seconds; clients stop starting turns after it
    max_requests: int = 200  # over all clients
    request_timeout: float = 60.0  # a stream not ended by then is a hang
    retries: int = 2  # a 429/503 is retried after its Retry-After, as the openai client does
    temperature: float = 0.0
    seed: int = 0


def user_message(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def chat_turn(http: aiohttp.ClientSession, config: LoadConfig, session: str, turn: int,
                    content: str, record: Turn | None = None) -> Turn:
    """One streaming chat turn of `session`; never raises, never waits past the timeout.
    Pass `record` to watch the turn while it runs (its status, replica, first token)."""
    record = record or Turn(session, turn, time.monotonic(), content)
    body = {"model": "tpserve", "messages": [{"role": "user", "content": content}],
            "max_tokens": config.max_tokens, "temperature": config.temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "session": {"append": turn > 0}}
    try:
        await asyncio.wait_for(_attempts(http, config, body, session, record),
                               config.request_timeout)
    except TimeoutError:
        record.error = "hang"
    except (aiohttp.ClientError, OSError, ValueError) as e:
        record.error = record.error or f"{type(e).__name__}: {e}"[:200]
    record.ended = time.monotonic()
    if record.accepted and not record.done and not record.error:
        record.error = "stream ended without [DONE]"
    return record


async def _attempts(http: aiohttp.ClientSession, config: LoadConfig, body: dict[str, Any],
                    session: str, record: Turn) -> None:
    """The request, and up to config.retries more after a 429/503 (its Retry-After, at
    most 2 s): a refusal is not an accepted request, and clients retry it."""
    while True:
        wait = await _stream(http, config.url, body, session, record)
        if wait is None or record.retries >= config.retries:
            return
        record.retries += 1
        await asyncio.sleep(wait)


async def _stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], session: str,
                  record: Turn) -> float | None:
    """One attempt; the seconds to wait before retrying it, or None when it is final."""
    async with http.post(f"{url}/v1/chat/completions", json=body,
                         headers={"X-Session-ID": session}) as resp:
        record.status = resp.status
        record.replica = resp.headers.get("X-Replica-ID", "")
        record.router_s = router_seconds(resp.headers.get("Server-Timing", ""))
        if resp.status != 200:
            record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            if resp.status in (429, 503):
                retry_after = resp.headers.get("Retry-After", "1")
                return min(2.0, float(retry_after)) if retry_after.isdigit() else 1.0
            return None
        record.error = ""  # an earlier attempt's refusal
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                record.done = True
                return None
            _event(record, json.loads(line[6:]))
    return None


def router_seconds(server_timing: str) -> float | None:
    """The router's `router;dur=MS` entry of a Server-Timing header, in seconds."""
    for entry in server_timing.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        if name == "router":
            for param in params:
                key, _, value = param.partition("=")
                if key == "dur":
                    try:
                        return float(value) / 1e3
                    except ValueError:
                        return None
    return None


def _event(record: Turn, event: dict[str, Any]) -> None:
    if "error" in event:
        record.error = f"error event: {event['error'].get('message', '')}"[:200]
        return
    if event.get("usage"):
        record.prompt_tokens = event["usage"]["prompt_tokens"]
        record.completion_tokens = event["usage"]["completion_tokens"]
    if event.get("choices"):
        now = time.monotonic()
        if record.ttft_s is None:
            record.ttft_s = now - record.started
        record.token_times.append(now)


# ---- clients ------------------------------------------------------------------------


@dataclass
class Budget:
    """Shared by the clients of one run: stop at the deadline or the request count."""

    deadline: float
    left: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> bool:
        if self.stop.is_set() or self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


# one chat turn: (session, turn, user message) -> its record (`chat_turn` over HTTP)
TurnRunner = Callable[[str, int, str], Awaitable[Turn]]


async def client(run_turn: TurnRunner, config: LoadConfig, index: int, budget: Budget,
                 records: list[Turn], words: Callable[[int], int] | None = None) -> None:
    """Sessions of `config.turns` turns each, one turn at a time, until the budget ends.
    `words(turn)` sizes the user message of each turn (default: config.user_words)."""
    rng = random.Random(config.seed * 1000 + index)
    n = 0
    while True:
        session = f"load-{index}-{n}-{rng.getrandbits(32):08x}"
        for turn in range(config.turns):
            if not budget.take():
                return
            size = words(turn) if words else config.user_words
            record = await run_turn(session, turn, user_message(rng, size))
            record.client = index
            records.append(record)
        n += 1


async def run_clients(config: LoadConfig, records: list[Turn], budget: Budget | None = None,
                      words: Callable[[int], int] | None = None) -> float:
    """Run the clients until the budget ends; the wall time in seconds."""
    budget = budget or Budget(time.monotonic() + config.duration, config.max_requests)
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=max(8, 2 * config.clients))
    async with aiohttp.ClientSession(connector=connector) as http:
        async def run_turn(session: str, turn: int, content: str) -> Turn:
            return await chat_turn(http, config, session, turn, content)

        await asyncio.gather(*(client(run_turn, config, i, budget, records, words)
                               for i in range(config.clients)))
    return time.monotonic() - started
