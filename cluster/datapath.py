"""The direct data path: an engine replica's deltas go back to a router over a connection
of our own, beside Serve's, all of one engine step's deltas for that router in one frame.

Through Serve alone, each delta of each stream is its own message (pickled, sent, read,
handed to a task on both event loops): under 64 streams ~10k messages a second, and a
new request's way in and its first token queue behind them (replicas/PERF.md, issue 19).
On the direct path the request still goes through Serve, which keeps choosing the
replica (the pinning request router), counting its ongoing requests, health-checking
it and cancelling the call when the client goes; but the call is unary: it answers,
once the request has ended, with the number of items the replica sent. The items travel
over one TCP connection per (router process, engine replica), which the replica opens to
the address the request carries.

Frames: a 4-byte big-endian length, then JSON. A replica's first frame on a connection
is {"token": the router's token, which the request carried through Serve (a connection
that does not open with it is dropped), "replica": its id}; each later frame is
{"sent_at": the replica's wall clock as it wrote the frame, "items": a list of [stream,
item] pairs, and "ends": a list of [stream, count] pairs, streams whose last item is in
this frame or an earlier one}, the items being router/wire.py's dicts (`items_frame`;
the router records each frame's age as it reads it: the way back, on one host's clock).
The router ends a stream once `count` items arrived after its end, or once the call
answered and that many items arrived, whichever comes first: the end on the data path
spares a finished stream the wait for Serve's answer, a gRPC hop back (replicas/PERF.md
v0.41). A connection lost mid-stream, or items that do not arrive within LATE_S of the
answer, end the stream with a 503 ErrorEvent, as a failed replica does.

The head start (PERF.md v0.64): once a replica's connection to a router is open, the
router's request router (cluster/pinning.py) sends a request down it as soon as it has
chosen that replica, a frame {"start": the call's reply dict, "request": the wire
Request}, and the replica starts it at once; Serve's call, which follows over gRPC,
attaches to that run and answers with its count as before. Under 64 clients on an H200
the gRPC hop took 7.5 ms mean while this connection's frames took 0.35 (PERF.md, the
stack's one-client TTFT). A request router that must choose again for a head-started
request keeps its replica while that replica is a candidate; when it is not, the head
start is cancelled ({"cancel": stream}) and its items dropped (they come under an id of
their own, "as", which the router then forgets), and a stream that had items from it
fails as a lost replica's does. A call that reaches the replica first runs the request
itself, and a start that comes after it is ignored. TPSERVE_HEAD_START=0 turns head
starts off (for measuring: `AB_ENV=TPSERVE_HEAD_START=0 bash infra/device_stack.sh
measure`).

- `Inbox`: the router's side; one per router process, listening on the node's address.
- `Outboxes`: the replica's side; one connection per inbox, opened on first use.
- `Heads`: the replica's head-started runs, which Serve's calls attach to.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import struct
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# how items travel back from an engine replica to the router (cluster/engine.py's
# ServeEngine): this module's connections (the default, first), or through Serve's
# handle, a message each
DATA_PATHS = ("direct", "serve")
_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 << 20  # bytes; a longer length is a broken or foreign peer
# after the call answered, its last items may still be on the way (another connection)
LATE_S = 10.0
CONNECT_S = 10.0  # a replica reaching a router's inbox (a failed call: the router retries)
# a replica keeps a finished head-started run's count (and a call's claim on a stream)
# this long for the call (or the start) still on its way
KEEP_S = 60.0
HEAD_START_ENV = "TPSERVE_HEAD_START"


def head_start_on() -> bool:
    """TPSERVE_HEAD_START: 1 (the default) sends a request down the data connection
    as soon as its replica is chosen; 0 leaves it to Serve's call."""
    value = os.environ.get(HEAD_START_ENV, "1").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{HEAD_START_ENV}={value}: give 1 (head start) or 0")
    return value == "1"


class DataPathError(ConnectionError):
    """The data connection between a replica and a router failed (or lost items)."""


def checked(data_path: str) -> str:
    """`data_path` if it is one of DATA_PATHS, else a ValueError that lists them."""
    if data_path not in DATA_PATHS:
        raise ValueError(f"data_path must be one of {DATA_PATHS}, got {data_path!r}")
    return data_path


def frame(payload: Any) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def hello(token: str, replica: str = "") -> bytes:
    """A replica's first frame on a connection: the router's token, and the replica's id
    (the router's head starts go to it by that id)."""
    return frame({"token": token, "replica": replica})


def items_frame(pairs: list[list[Any]], sent_at: float | None = None,
                ends: list[list[int]] | None = None) -> bytes:
    """A frame of [stream, item] pairs, stamped with the wall clock (or `sent_at`), and
    the [stream, count] ends of streams whose items are all sent."""
    payload: dict[str, Any] = {"sent_at": time.time() if sent_at is None else sent_at,
                               "items": pairs}
    if ends:
        payload["ends"] = ends
    return frame(payload)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's payload; IncompleteReadError at the end of the stream."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME:
        raise DataPathError(f"a frame of {length} bytes is over {MAX_FRAME}")
    return json.loads(await reader.readexactly(length))


class Lost:
    """Put into a stream's queue when the connection its items came on is gone."""


@dataclass(frozen=True)
class End:
    """Put into a stream's queue after its last item: how many items the replica sent."""

    count: int


@dataclass
class Stream:
    """One request's items as they arrive (`queue`), and the connection they came on."""

    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    connection: int | None = None
    head: str | None = None  # the replica its request was head-started on
    head_id: int | None = None  # the id the head-started run's items come under
    from_head: bool = False  # whether any came

    async def items(self, answer: asyncio.Future[int]) -> AsyncGenerator[Any, None]:
        """The items, until the stream's End or `answer` (the replica's call) says how
        many were sent and that many came. Raises the call's failure (if it came first),
        or DataPathError when the connection they came on failed or the last ones are
        LATE_S late. Ended by its End, the stream leaves `answer` to come on its own."""
        answer.add_done_callback(lambda _: _answered(answer, self.queue))
        received, sent = 0, None
        while sent is None or received < sent:
            try:
                entry = await (self.queue.get() if sent is None else
                               asyncio.wait_for(self.queue.get(), LATE_S))
            except TimeoutError:
                entry = Lost()
            if isinstance(entry, End):
                sent = entry.count if sent is None else sent
            elif entry is answer:
                if answer.cancelled():  # (by Serve: the caller's own cancel ends the loop)
                    raise DataPathError("the replica's call was cancelled")
                sent = answer.result()
            elif isinstance(entry, Lost):
                raise DataPathError(
                    f"{received} of {'some' if sent is None else sent} items arrived: the "
                    f"replica's data connection failed, or they are over {LATE_S} s late")
            else:
                received += 1
                yield entry


def _answered(answer: asyncio.Future[int], queue: asyncio.Queue[Any]) -> None:
    """The call's answer, into its stream's queue after the items that came before it;
    its failure is read here, so a stream left early (the call cancelled) logs nothing."""
    if not answer.cancelled():
        answer.exception()
    queue.put_nowait(answer)


# this process's inboxes by token: a request router finds a request's stream by its reply
_INBOXES: weakref.WeakValueDictionary[str, Inbox] = weakref.WeakValueDictionary()


def _stream_of(args: Any) -> tuple[Inbox, dict[str, Any]] | None:
    """The inbox and reply dict of a direct-path call's arguments (request, reply)."""
    if not (isinstance(args, (tuple, list)) and len(args) == 2):
        return None
    reply = args[1]
    inbox = _INBOXES.get(reply.get("token")) if isinstance(reply, dict) else None
    return None if inbox is None else (inbox, reply)


def head_of(args: Any) -> str | None:
    """The replica a direct-path call's request was head-started on (None: none)."""
    found = _stream_of(args)
    if found is None:
        return None
    stream = found[0].streams.get(found[1].get("stream"))  # type: ignore[arg-type]
    return None if stream is None else stream.head


def start_head(args: Any, replica: str) -> bool:
    """Head-start a direct-path call's request on `replica` (Inbox.start_head)."""
    found = _stream_of(args)
    return found is not None and found[0].start_head(found[1], replica, args[0])


def drop_head(args: Any) -> None:
    """Cancel a direct-path call's head start (Inbox.drop_head)."""
    found = _stream_of(args)
    if found is not None:
        found[0].drop_head(found[1]["stream"])


class Inbox:
    """The router's side: a listening socket whose connections (one per engine replica
    that serves this router) carry the items of many streams."""

    def __init__(self, host: str, frame_age: Callable[[float], None] | None = None) -> None:
        """`frame_age`: given each frame's age (seconds) as it is read."""
        self.host, self.port = host, 0
        self.frame_age = frame_age
        self.token = secrets.token_hex(16)
        self.streams: dict[int, Stream] = {}
        self._next = 0
        self._server: asyncio.Server | None = None
        self.connections: set[asyncio.StreamWriter] = set()  # one per replica
        self.replicas: dict[str, asyncio.StreamWriter] = {}  # by the replica's id
        self._starting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.head_start = head_start_on()
        _INBOXES[self.token] = self

    async def start(self) -> None:
        """Listen (once; later calls return at once)."""
        if self._server is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is None:
                server = await asyncio.start_server(self._serve, self.host, 0)
                self.port = server.sockets[0].getsockname()[1]
                self._loop = asyncio.get_running_loop()
                self._server = server

    def open(self) -> tuple[int, Stream]:
        """A new stream's id and its queue; `reply_to(id)` is what the replica needs."""
        self._next += 1
        stream = self.streams[self._next] = Stream()
        return self._next, stream

    def reply_to(self, stream: int) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": self.token, "stream": stream}

    def close(self, stream: int, abort: bool = False) -> None:
        """Forget a stream: items still arriving for it are dropped. `abort`: it did not
        end (its reader went away, or it failed): a head start of it is cancelled."""
        gone = self.streams.pop(stream, None)
        if gone is not None and gone.head_id is not None:
            self.streams.pop(gone.head_id, None)
            if abort and gone.head is not None:
                self._cancel_head(stream, gone.head)

    def start_head(self, reply: dict[str, Any], replica: str, request: Any) -> bool:
        """Send the request of the stream `reply` names to `replica` over its data
        connection, now (the head start); False, sending nothing, when head starts are
        off, the stream has one already or is gone, `replica` has no open connection
        here, this is not the inbox's event loop, or the request is not JSON. The run's
        items come under an id of their own (`as`), which dropping the head forgets."""
        stream = self.streams.get(reply.get("stream"))  # type: ignore[arg-type]
        writer = self.replicas.get(replica)
        if (not self.head_start or stream is None or stream.head is not None
                or writer is None or writer.is_closing() or not self._on_loop()):
            return False
        head_id = self._next + 1
        try:
            data = frame({"start": reply, "request": request, "as": head_id})
        except (TypeError, ValueError):
            return False
        self._next = head_id
        self.streams[head_id] = stream
        writer.write(data)
        stream.head, stream.head_id = replica, head_id
        return True

    def drop_head(self, stream_id: int) -> None:
        """The stream's head-start replica is no longer a candidate: cancel its run and
        forget its items' id (what still comes under it is dropped); a stream that
        already had items from it gets Lost."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.head is None or not self._on_loop():
            return
        self._cancel_head(stream_id, stream.head)
        if stream.head_id is not None:
            self.streams.pop(stream.head_id, None)
        stream.head = stream.head_id = None
        if stream.from_head:
            stream.queue.put_nowait(Lost())

    def _cancel_head(self, stream: int, replica: str) -> None:
        writer = self.replicas.get(replica)
        if writer is not None and not writer.is_closing() and self._on_loop():
            writer.write(frame({"cancel": stream}))

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def stop(self) -> None:
        """Stop listening and close the replicas' connections (their streams get Lost)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self.connections):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        connection = id(writer)
        self.connections.add(writer)
        try:
            hello = await asyncio.wait_for(read_frame(reader), LATE_S)
            token = hello.get("token") if isinstance(hello, dict) else None
            if not (isinstance(token, str) and hmac.compare_digest(token, self.token)):
                log.warning("data path: a connection without this router's token, dropped")
                return
            if isinstance(replica := hello.get("replica"), str) and replica:
                self.replicas[replica] = writer  # (a newer connection replaces an older)
            while True:
                self._take(await read_frame(reader), connection)
        except (asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the replica closed it; or this loop is ending (3.11's streams would
            # log a handler task that ends cancelled)
        except (ConnectionError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.warning("data path: connection from a replica failed: %r", e)
        finally:
            self.connections.discard(writer)
            for replica in [r for r, w in self.replicas.items() if w is writer]:
                del self.replicas[replica]
            writer.close()
            # (a head-started stream is here twice: under its id and its run's)
            for stream in {id(s): s for s in self.streams.values()}.values():
                if stream.connection == connection:
                    stream.queue.put_nowait(Lost())

    def _take(self, payload: dict[str, Any], connection: int) -> None:
        if self.frame_age is not None:
            self.frame_age(max(0.0, time.time() - payload["sent_at"]))
        streams = self.streams
        for stream_id, item in payload["items"]:
            stream = streams.get(stream_id)
            if stream is not None:  # else the router stopped reading it
                if stream_id == stream.head_id:
                    stream.from_head = True
                stream.connection = connection
                stream.queue.put_nowait(item)
        for stream_id, count in payload.get("ends", ()):
            stream = streams.get(stream_id)
            if stream is not None:
                stream.queue.put_nowait(End(int(count)))


class Outbox:
    """The replica's side of one connection to an inbox. Items sent during one turn of
    the event loop (one engine step's deltas, as the engine hands them out together)
    leave as one frame at the end of that turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_lost: Callable[[Outbox], None],
                 on_frame: Callable[[Outbox, Any], None] | None = None,
                 token: str = "") -> None:
        """`on_frame`: given each frame the router sends (head starts, their cancels)."""
        self.writer, self._on_lost, self._on_frame = writer, on_lost, on_frame
        self.token = token
        self.error: DataPathError | None = None
        self._pending: list[list[Any]] = []
        self._ends: list[list[int]] = []
        self._loop = asyncio.get_running_loop()
        self._watch = asyncio.ensure_future(self._read(reader))

    def send(self, stream: int, item: dict[str, Any]) -> None:
        """Queue an item for the end of this turn; raises DataPathError once the
        connection is gone."""
        self._flush_later()
        self._pending.append([stream, item])

    def end(self, stream: int, count: int) -> None:
        """Say, in this turn's frame (after its items), that `stream` had `count` items:
        the router ends the stream at it, without waiting for the call's answer."""
        self._flush_later()
        self._ends.append([stream, count])

    def _flush_later(self) -> None:
        """Raise if the connection is gone; else, with nothing queued yet this turn, have
        the turn's frame written at its end."""
        if self.error is not None:
            raise self.error
        if not (self._pending or self._ends):
            self._loop.call_soon(self._flush)

    async def flushed(self) -> None:
        """Return once everything sent so far is written to the socket (raises
        DataPathError if the connection is gone)."""
        self._flush()
        try:
            await self.writer.drain()
        except ConnectionError as e:
            self._fail(e)
        if self.error is not None:
            raise self.error

    def close(self, cause: BaseException | None = None) -> None:
        """End the connection: later sends raise, Outboxes opens a new one."""
        self._fail(cause or DataPathError("closed by the replica"))
        if self._watch is not asyncio.current_task():
            self._watch.cancel()
        self.writer.close()
        self._on_lost(self)

    def _flush(self) -> None:
        if (self._pending or self._ends) and self.error is None:
            pending, ends, self._pending, self._ends = self._pending, self._ends, [], []
            self.writer.write(items_frame(pending, ends=ends))

    def _fail(self, cause: BaseException | None) -> None:
        if self.error is None:
            self.error = DataPathError(f"the router's data connection is gone: {cause!r}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """The router's frames, to `on_frame`, until the connection ends (or a frame is
        malformed, or comes with no one to take it): then the outbox closes."""
        cause: BaseException
        try:
            while True:
                payload = await read_frame(reader)
                if self._on_frame is None:
                    raise DataPathError("the router sent a frame; none expected")
                self._on_frame(self, payload)
        except asyncio.IncompleteReadError:
            cause = DataPathError("closed by the router")
        except (ConnectionError, ValueError, KeyError, TypeError) as e:
            cause = e
        self.close(cause)


class Outboxes:
    """A replica's connections, one per router inbox, opened on first use. `replica`
    names this replica to the routers (their head starts go to it by that name);
    `on_frame` takes what routers send (Heads.take)."""

    def __init__(self, replica: str = "",
                 on_frame: Callable[[Outbox, Any], None] | None = None) -> None:
        self.replica, self._on_frame = replica, on_frame
        self._open: dict[tuple[str, int, str], Outbox] = {}
        self._opening: dict[tuple[str, int, str], asyncio.Lock] = {}

    async def get(self, reply: dict[str, Any]) -> Outbox:
        key = (reply["host"], int(reply["port"]), reply["token"])
        outbox = self._open.get(key)
        if outbox is not None:
            return outbox
        async with self._opening.setdefault(key, asyncio.Lock()):
            if key not in self._open:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(key[0], key[1]), CONNECT_S)
                except (OSError, TimeoutError) as e:
                    raise DataPathError(
                        f"this engine replica cannot reach the router's data path at "
                        f"{key[0]}:{key[1]} ({e!r}): the nodes of a cluster must reach "
                        "each other on any port, or start it with --data-path serve") from e
                writer.write(hello(key[2], self.replica))
                self._open[key] = Outbox(reader, writer, lambda o, k=key: self._lost(k, o),
                                         self._on_frame, key[2])
            return self._open[key]

    def _lost(self, key: tuple[str, int, str], outbox: Outbox) -> None:
        if self._open.get(key) is outbox:
            del self._open[key]


HeadRun = Callable[[dict[str, Any], dict[str, Any], Outbox], Awaitable[int]]


class Heads:
    """A replica's head-started requests, by (router token, stream): `run(request, reply,
    outbox)` sends a request's items through the outbox its start came on and returns
    their count (cluster/engine.py: the same `deliver` as a call's). Serve's call for the
    stream then `claim`s the run and awaits it; a call that comes first claims the stream,
    and a start after it is ignored. A run the router cancels stops (its request aborted);
    a run whose call never comes ends with its request (its count kept KEEP_S)."""

    def __init__(self, run: HeadRun) -> None:
        self._run = run
        self.runs: dict[tuple[str, int], asyncio.Task[int]] = {}
        self._ended: dict[tuple[str, int], float] = {}  # runs ended, when (monotonic)
        self._claimed: dict[tuple[str, int], float] = {}  # calls that came first, when
        self.started = 0  # head starts taken, for the replica's stats

    def take(self, outbox: Outbox, payload: Any) -> None:
        """A frame from a router: {"start": reply, "request": ...} or {"cancel": stream}."""
        if "cancel" in payload:
            task = self.runs.pop((outbox.token, int(payload["cancel"])), None)
            if task is not None:
                task.cancel()
            return
        reply, request = payload["start"], payload["request"]
        key = (outbox.token, int(reply["stream"]))
        self._forget_old()
        if key in self.runs or key in self._claimed:
            self._claimed.pop(key, None)
            return
        # (the items go under the id the router gave the run)
        to = {**reply, "stream": int(payload.get("as", reply["stream"]))}
        task = asyncio.ensure_future(self._run(request, to, outbox))
        self.runs[key] = task
        self.started += 1
        task.add_done_callback(lambda t, k=key: self._ended_run(k, t))

    def claim(self, reply: dict[str, Any]) -> asyncio.Task[int] | None:
        """The head-started run of the stream `reply` names, for its call to await
        (cancelling the call cancels it); None: the call runs the request itself."""
        key = (str(reply.get("token")), int(reply["stream"]))
        self._forget_old()
        task = self.runs.pop(key, None)
        self._ended.pop(key, None)
        if task is None:
            self._claimed[key] = time.monotonic()
        return task

    def _ended_run(self, key: tuple[str, int], task: asyncio.Task[int]) -> None:
        if not task.cancelled():
            task.exception()  # (read: a run no call claims logs nothing at its end)
        if self.runs.get(key) is task:
            self._ended[key] = time.monotonic()

    def _forget_old(self) -> None:
        """Drop ended runs and claims older than KEEP_S (dicts keep insertion order)."""
        old = time.monotonic() - KEEP_S
        for marks, drop in ((self._ended, self.runs), (self._claimed, None)):
            while marks:
                key, at = next(iter(marks.items()))
                if at > old:
                    break
                del marks[key]
                if drop is not None:
                    drop.pop(key, None)
