"""What a request gets back from the engine, and how it gets there: `TokenDelta` (what
one step added), `Completion` (a whole request), and the sinks the engine's driver thread
pushes deltas into: `SyncSink` for `Engine.generate` (a thread waits on it) and
`AsyncSink` for `Engine.add_request` (an asyncio queue, fed once a step per event loop
through `DeltaPost`). `joined` makes one delta of two (a lagging reader's queued deltas)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# the most likely tokens at one position: (token id, log-probability), most likely first
TopLogprobs = list[tuple[int, float]]


@dataclass
class TokenDelta:
    """What one step added to a request's output. Log-probabilities are raw (of the
    model's logits, before penalties, bias, temperature, top-k, top-p); each field is
    None unless the request asked for it (SamplingParams)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None  # one per token (logprobs)
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    top_logprobs: list[TopLogprobs] | None = None  # one per token (logprobs, top_logprobs)
    # the first delta only (prompt_logprobs): one per prompt token, the first None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None  # (and top_logprobs)


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    # as in TokenDelta, for the whole request
    top_logprobs: list[TopLogprobs] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopLogprobs | None] | None = None


class Sink(Protocol):
    """Where the driver thread puts one request's deltas."""

    def push(self, delta: TokenDelta) -> bool:
        """Deliver a delta; returns whether anyone still listens."""
        ...

    def fail(self, error: BaseException) -> None:
        """The request failed (from any thread)."""
        ...


class SyncSink:
    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None

    def push(self, delta: TokenDelta) -> bool:
        """Deliver a delta; returns whether anyone still listens."""
        self.deltas.append(delta)
        if delta.finish_reason is not None:
            self.done.set()
        return True

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class DeltaPost:
    """Deltas on their way to the consumers' event loops, sent once a step: one
    `call_soon_threadsafe` per loop, not per token (each call takes a lock and wakes the
    loop through a pipe: ~8 us, measured on the 2-core VM, as much as the rest of a
    token's delivery)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: Any) -> None:
        with self._lock:
            self._by_loop.setdefault(loop, []).append((queue, item))

    def send(self) -> None:
        with self._lock:
            by_loop, self._by_loop = self._by_loop, {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed: nobody reads these
                pass


def joined(first: TokenDelta, then: TokenDelta) -> TokenDelta:
    """Two consecutive deltas of one request as one."""
    # (a delta without tokens, an abort's, has None for the lists: it adds nothing)
    return TokenDelta(
        first.request_id, first.token_ids + then.token_ids, first.text + then.text,
        _cat(first.logprobs, then.logprobs), then.finish_reason,
        _cat(first.top_logprobs, then.top_logprobs),
        _cat(first.prompt_logprobs, then.prompt_logprobs),  # (in one of them at most)
        _cat(first.prompt_top_logprobs, then.prompt_top_logprobs))


def _cat(first: list[Any] | None, then: list[Any] | None) -> list[Any] | None:
    return then if first is None else first if then is None else first + then


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class AsyncSink:
    def __init__(self, loop: asyncio.AbstractEventLoop, post: DeltaPost) -> None:
        self.loop, self.post = loop, post
        self.queue: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()

    def push(self, delta: TokenDelta | BaseException) -> bool:
        """Posted with the step's other deltas (`DeltaPost.send`); False when the consumer's
        event loop is gone (nobody will read on)."""
        if self.loop.is_closed():
            return False
        self.post.add(self.loop, self.queue, delta)
        return True

    def fail(self, error: BaseException) -> None:
        """From any thread; sent at once, behind the deltas posted before it."""
        self.push(error)
        self.post.send()


def join_deltas() -> bool:
    """Whether `streamed` joins a late reader's queued deltas (TPSERVE_STREAM_JOIN=0: every
    step's delta is its own message, for measuring)."""
    return os.environ.get("TPSERVE_STREAM_JOIN", "1") != "0"


async def streamed(queue: asyncio.Queue[Any], join: bool, interval: int,
                   on_first: Callable[[], None], on_left: Callable[[], None]
                   ) -> AsyncIterator[TokenDelta]:
    """A request's deltas as its queue (an AsyncSink's) receives them, until the one that
    finishes it; an exception in the queue is raised, after the tokens before it.
    `on_first` runs as the first delta goes out; `on_left` when the consumer leaves
    before the last (break, cancel, client gone: the caller aborts the request there).

    A consumer that fell behind (Serve sending the last delta on) gets the deltas queued
    meanwhile as one (`join`): one message instead of several; and after the first, a
    delta waits for `interval` tokens (stream_interval)."""
    held, first, finished = None, True, False
    try:
        while True:
            item = held if held is not None else await queue.get()
            held = None
            if isinstance(item, BaseException):
                finished = True  # (failed: nothing to abort)
                raise item
            want = 1 if first else interval
            while item.finish_reason is None and ((join and not queue.empty())
                                                  or len(item.token_ids) < want):
                queued = queue.get_nowait() if not queue.empty() else await queue.get()
                if isinstance(queued, BaseException):
                    held = queued  # raised after the tokens before it are out
                    break
                item = joined(item, queued)
            if first:
                on_first()
                first = False
            finished = item.finish_reason is not None
            yield item
            if finished:
                return
    finally:
        if not finished:
            on_left()
