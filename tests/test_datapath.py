"""The direct data path (cluster/datapath.py) in one process, over real loopback sockets:
the router's inbox, a replica's outboxes, and the router's end of it (ServeEngine with
data_path "direct") over a fake unary handle whose call runs a fake replica that sends
through a real outbox. The stack tier runs the real replica's `deliver` (test_cluster)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

pytest.importorskip("ray")
from cluster import datapath  # noqa: E402
from cluster.datapath import Inbox, Lost, Outboxes, frame, items_frame, read_frame  # noqa: E402
from cluster.engine import ServeEngine, deliver  # noqa: E402
from router import wire  # noqa: E402


def delta(i: int, finish: str | None = None) -> dict[str, Any]:
    return {"token_ids": [i], "text": f"t{i}", "finish_reason": finish, "replica": "r"}


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_turns_items_leave_as_one_frame_in_order() -> None:
    """Items sent in one turn of the replica's loop (one engine step) make one frame; each
    reaches its own stream's queue, in order; a stream the router closed drops its own."""
    frames: list[int] = []

    async def main() -> tuple[list[Any], list[Any], bool]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        take = inbox._take
        inbox._take = lambda frame, c: (  # type: ignore[method-assign]
            frames.append(len(frame["items"])), take(frame, c))
        (a, qa), (b, qb), (gone, _) = inbox.open(), inbox.open(), inbox.open()
        inbox.close(gone)
        outbox = await Outboxes().get(inbox.reply_to(a))
        for i in range(3):  # one turn: 3 steps' worth of 3 streams
            for s in (a, b, gone):
                outbox.send(s, delta(i))
        await outbox.flushed()
        outbox.send(a, delta(9, "stop"))  # the next turn: a frame of its own
        await outbox.flushed()
        got_a = [await qa.queue.get() for _ in range(4)]
        got_b = [await qb.queue.get() for _ in range(3)]
        await inbox.stop()
        return got_a, got_b, gone in inbox.streams

    got_a, got_b, gone_kept = run(main())
    assert got_a == [delta(0), delta(1), delta(2), delta(9, "stop")]
    assert got_b == [delta(0), delta(1), delta(2)]
    assert frames == [9, 1] and not gone_kept


def test_each_frames_age_is_recorded_and_a_malformed_frame_drops_its_connection() -> None:
    """The inbox hands each frame's age (the replica's stamp to its read) to `frame_age`;
    a frame that is not {sent_at, items} ends its connection (its streams get Lost)."""
    ages: list[float] = []

    async def main() -> tuple[Any, Any]:
        inbox = Inbox("127.0.0.1", ages.append)
        await inbox.start()
        stream_id, stream = inbox.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", inbox.port)
        writer.write(datapath.hello(inbox.token)
                     + items_frame([[stream_id, delta(0)]], sent_at=time.time() - 0.25)
                     + frame([[stream_id, delta(1)]]))  # (the old format: pairs alone)
        first = await asyncio.wait_for(stream.queue.get(), 5)
        second = await asyncio.wait_for(stream.queue.get(), 5)
        writer.close()
        await inbox.stop()
        return first, second

    first, second = run(main())
    assert first == delta(0) and isinstance(second, Lost)
    assert len(ages) == 1 and 0.25 <= ages[0] < 5


def test_a_connection_without_the_routers_token_is_dropped() -> None:
    async def main() -> tuple[int, bytes]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        stream_id, stream = inbox.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", inbox.port)
        writer.write(datapath.hello("not-the-token") + items_frame([[stream_id, delta(0)]]))
        end = await reader.read()  # the inbox closes it
        writer.close()
        await inbox.stop()
        return stream.queue.qsize(), end

    assert run(main()) == (0, b"")


def test_a_lost_connection_ends_its_streams_and_fails_the_replicas_sends() -> None:
    """The router's side gone: the outbox's next send raises DataPathError (the replica's
    request then aborts). The replica's side gone: the streams whose items came on that
    connection get Lost."""
    async def main() -> tuple[bool, bool, bool]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        stream_id, stream = inbox.open()
        outboxes = Outboxes()
        outbox = await outboxes.get(inbox.reply_to(stream_id))
        outbox.send(stream_id, delta(0))
        await outbox.flushed()
        assert await stream.queue.get() == delta(0)
        outbox.close()  # the replica's end closes
        lost = isinstance(await stream.queue.get(), Lost)
        # and the other way: a new connection, then the router's end closes
        other = await outboxes.get(inbox.reply_to(stream_id))
        assert other is not outbox
        for writer in list(inbox.connections):
            writer.close()
        await asyncio.sleep(0.2)
        with pytest.raises(datapath.DataPathError):
            other.send(stream_id, delta(1))
        fresh = await outboxes.get(inbox.reply_to(stream_id))  # a new one replaces it
        await inbox.stop()
        return lost, other.error is not None, fresh is not other

    assert run(main()) == (True, True, True)


# --- the router's end: ServeEngine over a fake unary handle ------------------------------

class FakeCall:
    """A unary handle call: awaitable for its answer, cancellable; it runs `replica`."""

    def __init__(self, replica: Callable[[], Awaitable[int]]) -> None:
        self.task = asyncio.ensure_future(replica())
        self.cancelled = False

    def __await__(self) -> Any:
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class FakeUnary:
    """handle.options(...).deliver.remote(request, reply) -> FakeCall of `script`."""

    def __init__(self, script: Callable[[dict[str, Any], dict[str, Any]], Awaitable[int]]
                 ) -> None:
        self.script, self.calls, self.options_seen = script, [], []
        self.deliver = self

    def options(self, **options: Any) -> FakeUnary:
        self.options_seen.append(options)
        return self

    def remote(self, request: dict[str, Any], reply: dict[str, Any]) -> FakeCall:
        call = FakeCall(lambda: self.script(request, reply))
        self.calls.append(call)
        return call


def replica_sending(items: list[dict[str, Any]], outboxes: Outboxes, *,
                    gap_s: float = 0.0, fail: BaseException | None = None
                    ) -> Callable[..., Awaitable[int]]:
    """A replica's call (EngineDeployment.deliver) whose request yields `items` gap_s
    apart, then raises `fail` if given: the real `deliver` over a real outbox."""
    async def engine_items() -> AsyncGenerator[dict[str, Any], None]:
        for item in items:
            if gap_s:
                await asyncio.sleep(gap_s)
            yield item
        if fail is not None:
            raise fail

    async def call(request: dict[str, Any], reply: dict[str, Any]) -> int:
        return await deliver(engine_items(), await outboxes.get(reply), reply["stream"], "r")
    return call


def direct_engine(unary: FakeUnary) -> ServeEngine:
    engine = ServeEngine.__new__(ServeEngine)
    engine.handle, engine.unary, engine.inbox = None, unary, Inbox("127.0.0.1")
    return engine


async def collect(engine: ServeEngine, stop_after: int | None = None) -> list[wire.Item]:
    out = []
    stream = engine.generate(wire.Request({}, prompt=[5]), "ip:1.2.3.4")
    async for item in stream:
        out.append(item)
        if stop_after is not None and len(out) == stop_after:
            await stream.aclose()
            break
    return out


def test_the_router_gets_every_item_in_order_and_pins_by_session() -> None:
    items = [delta(i) for i in range(5)] + [delta(5, "length")]

    async def main() -> tuple[list[wire.Item], FakeUnary, int]:
        unary = FakeUnary(replica_sending(items, Outboxes(), gap_s=0.001))
        engine = direct_engine(unary)
        out = await collect(engine)
        assert engine.inbox is not None
        return out, unary, len(engine.inbox.streams)

    out, unary, left = run(main())
    assert out == [wire.decode(i) for i in items]
    assert {"session_id": "ip:1.2.3.4"} in unary.options_seen
    assert not unary.calls[0].cancelled and left == 0  # ended by itself, stream forgotten


def test_a_stream_ends_at_its_end_on_the_data_path_without_waiting_for_the_answer(
        ) -> None:
    """The real `deliver` sends the stream's End after its items: the router's stream ends
    there, though the call answers only 5 s later (Serve's answer is a gRPC hop back),
    and the call is left to answer, not cancelled. A replica that sends no End (before
    it existed) still ends the stream at the answer (the test below)."""
    items = [delta(0), delta(1, "stop")]
    outboxes = Outboxes()

    async def slow_answer(request: dict[str, Any], reply: dict[str, Any]) -> int:
        async def engine_items() -> AsyncGenerator[dict[str, Any], None]:
            for item in items:
                yield item
        sent = await deliver(engine_items(), await outboxes.get(reply), reply["stream"], "r")
        await asyncio.sleep(5)
        return sent

    async def main() -> tuple[list[wire.Item], float, FakeUnary]:
        unary = FakeUnary(slow_answer)
        start = asyncio.get_running_loop().time()
        out = await collect(direct_engine(unary))
        took = asyncio.get_running_loop().time() - start
        unary.calls[0].task.cancel()  # (the test's own end, not the router's)
        return out, took, unary

    out, took, unary = run(main())
    assert out == [wire.decode(i) for i in items] and took < 2
    assert not unary.calls[0].cancelled


def test_an_end_counts_items_still_on_the_way() -> None:
    """An End names how many items the stream had: one that overtook some of them (it
    cannot on one connection, but the count is what ends the stream) waits for them."""
    async def main() -> list[Any]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        stream_id, stream = inbox.open()
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        inbox._take({"sent_at": time.time(), "items": [[stream_id, delta(0)]],
                     "ends": [[stream_id, 2]]}, 1)
        asyncio.get_running_loop().call_later(0.1, inbox._take, {
            "sent_at": time.time(), "items": [[stream_id, delta(1, "stop")]]}, 1)
        got = [item async for item in stream.items(answer)]
        answer.cancel()
        await inbox.stop()
        return got

    assert run(main()) == [delta(0), delta(1, "stop")]


def test_items_that_arrive_after_the_answer_still_reach_the_router() -> None:
    items = [delta(0), delta(1, "stop")]

    async def late(request: dict[str, Any], reply: dict[str, Any]) -> int:
        outbox = await Outboxes().get(reply)  # the answer overtakes the items
        asyncio.get_running_loop().call_later(0.2, lambda: outbox.writer.write(
            items_frame([[reply["stream"], item] for item in items])))
        return len(items)

    async def main() -> list[wire.Item]:
        return await collect(direct_engine(FakeUnary(late)))

    assert run(main()) == [wire.decode(i) for i in items]


def test_items_that_never_arrive_end_the_stream_with_a_503(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr("cluster.datapath.LATE_S", 0.3)

    async def lying(request: dict[str, Any], reply: dict[str, Any]) -> int:
        await Outboxes().get(reply)
        return 2  # says it sent two, sent none

    out = run(collect(direct_engine(FakeUnary(lying))))
    assert len(out) == 1 and isinstance(out[0], wire.ErrorEvent) and out[0].status == 503
    assert "0 of 2 items arrived" in out[0].message


def test_a_request_failing_on_the_replica_is_a_503_after_its_items() -> None:
    import ray

    out = run(collect(direct_engine(FakeUnary(replica_sending(
        [delta(0)], Outboxes(), fail=ray.exceptions.ActorDiedError())))))
    assert out[0] == wire.decode(delta(0))
    assert isinstance(out[1], wire.ErrorEvent) and out[1].status == 503
    assert out[1].replica == "r" and len(out) == 2


def test_a_call_that_fails_before_the_replica_is_a_503() -> None:
    async def unreachable(request: dict[str, Any], reply: dict[str, Any]) -> int:
        raise RuntimeError("no replica took it")

    out = run(collect(direct_engine(FakeUnary(unreachable))))
    assert len(out) == 1 and isinstance(out[0], wire.ErrorEvent) and out[0].status == 503


def test_a_replica_whose_connection_drops_mid_stream_is_a_503() -> None:
    outboxes = Outboxes()

    async def dropping(request: dict[str, Any], reply: dict[str, Any]) -> int:
        outbox = await outboxes.get(reply)
        outbox.send(reply["stream"], delta(0))
        await outbox.flushed()
        outbox.close()
        await asyncio.sleep(5)  # a replica that hangs on: the stream must not wait for it
        return 1

    async def main() -> tuple[list[wire.Item], float]:
        start = asyncio.get_running_loop().time()
        out = await collect(direct_engine(FakeUnary(dropping)))
        return out, asyncio.get_running_loop().time() - start

    out, took = run(main())
    assert out[0] == wire.decode(delta(0)) and took < 2
    assert isinstance(out[1], wire.ErrorEvent) and out[1].status == 503


def test_a_reader_that_stops_early_cancels_the_call() -> None:
    async def main() -> tuple[bool, bool]:
        unary = FakeUnary(replica_sending([delta(i) for i in range(50)], Outboxes(),
                                          gap_s=0.01))
        await collect(direct_engine(unary), stop_after=2)
        await asyncio.sleep(0)
        return unary.calls[0].cancelled, unary.calls[0].task.cancelled()

    assert run(main()) == (True, True)


def test_a_bad_data_path_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="data_path"):
        ServeEngine(None, "sideways")  # type: ignore[arg-type]


def test_frames_round_trip_and_a_huge_length_is_refused() -> None:
    """What a delta may hold goes through as Serve's pickles took it: a -inf logprob, a
    lone surrogate of a token that ends mid-character, any text."""
    odd = {**delta(0), "text": "caf\udce9 \u00e9\u4e2d\n\"",
           "logprobs": [["\udce9", float("-inf"), [["x", -1.5]]]]}

    async def main() -> tuple[Any, str]:
        reader = asyncio.StreamReader()
        reader.feed_data(frame([[1, odd]]) + (1 << 30).to_bytes(4, "big"))
        first = await read_frame(reader)
        with pytest.raises(datapath.DataPathError) as e:
            await read_frame(reader)
        return first, str(e.value)

    first, error = run(main())
    assert first == [[1, odd]] and "over" in error
    assert wire.decode(first[0][1]).logprobs[0].logprob == float("-inf")


def test_the_inbox_listens_on_the_host_it_was_given() -> None:
    async def main() -> tuple[str, int]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        await inbox.start()  # once
        with socket.create_connection(("127.0.0.1", inbox.port), timeout=5):
            pass
        reply = inbox.reply_to(7)
        await inbox.stop()
        return reply["host"], reply["stream"]

    assert run(main()) == ("127.0.0.1", 7)


def test_a_router_gone_mid_stream_aborts_the_replicas_request() -> None:
    """The router's process gone (its inbox closes): the replica's next send fails, and
    `deliver` closes the request's items (serve_request's close aborts it in the engine)
    and raises, instead of generating on for no one."""
    closed = asyncio.Event()

    async def endless() -> AsyncGenerator[dict[str, Any], None]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0.01)
                yield delta(i)
                i += 1
        finally:
            closed.set()

    async def main() -> tuple[bool, float]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        stream_id, stream = inbox.open()
        outbox = await Outboxes().get(inbox.reply_to(stream_id))
        call = asyncio.ensure_future(deliver(endless(), outbox, stream_id, "r"))
        await stream.queue.get()
        start = asyncio.get_running_loop().time()
        await inbox.stop()
        with pytest.raises(datapath.DataPathError):
            await call
        return closed.is_set(), asyncio.get_running_loop().time() - start

    aborted, took = run(main())
    assert aborted and took < 2


def test_a_router_out_of_reach_is_an_error_that_says_what_to_do() -> None:
    """A replica that cannot open the router's data connection (a port closed between
    nodes) fails the call with a message naming the address and the way out."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main() -> str:
        with pytest.raises(datapath.DataPathError) as e:
            await Outboxes().get({"host": "127.0.0.1", "port": port, "token": "t"})
        return str(e.value)

    message = run(main())
    assert f"127.0.0.1:{port}" in message and "--data-path serve" in message


# --- the head start: a request down the data connection as soon as its replica is chosen -

class EngineRuns:
    """A replica's engine: each run yields `items` gap_s apart; counts runs, notes
    which were closed (aborted) before their end."""

    def __init__(self, items: list[dict[str, Any]], gap_s: float = 0.0) -> None:
        self.items, self.gap_s = items, gap_s
        self.runs, self.aborted = 0, 0

    async def stream(self) -> AsyncGenerator[dict[str, Any], None]:
        self.runs += 1
        done = False
        try:
            for item in self.items:
                await asyncio.sleep(self.gap_s)
                yield item
            done = True
        finally:
            if not done:
                self.aborted += 1


class Replica:
    """EngineDeployment's direct path: its outboxes, its head starts, and its call."""

    def __init__(self, name: str, engine: EngineRuns) -> None:
        self.name, self.engine = name, engine
        self.heads = datapath.Heads(self._run)
        self.outboxes = Outboxes(name, self.heads.take)

    async def _run(self, request: dict[str, Any], reply: dict[str, Any],
                   outbox: datapath.Outbox) -> int:
        return await deliver(self.engine.stream(), outbox, reply["stream"], self.name)

    async def call(self, request: dict[str, Any], reply: dict[str, Any]) -> int:
        head = self.heads.claim(reply)
        if head is not None:
            return await head
        return await self._run(request, reply, await self.outboxes.get(reply))


async def connected(inbox: Inbox, replica: Replica) -> None:
    """Open `replica`'s connection to `inbox` (a first request does, through Serve)."""
    await replica.outboxes.get(inbox.reply_to(0))
    for _ in range(100):
        if replica.name in inbox.replicas:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the replica's hello never reached the inbox")


def test_a_head_started_request_runs_once_and_its_call_attaches() -> None:
    """The router sends the request as soon as it chose the replica; its items flow
    before Serve's call comes, and the call, when it comes, awaits that run: one run,
    every item once, the call's answer its count."""
    items = [delta(0), delta(1), delta(2, "stop")]

    async def main() -> tuple[bool, list[Any], int, int, int]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        replica = Replica("r1", EngineRuns(items))
        await connected(inbox, replica)
        stream_id, stream = inbox.open()
        reply = {**inbox.reply_to(stream_id), "sent_at": time.time()}
        started = datapath.start_head(({"prompt": [1]}, reply), "r1")
        got = [await stream.queue.get() for _ in range(4)]  # 3 items and the End
        answer = await replica.call({"prompt": [1]}, reply)  # Serve's call, late
        await inbox.stop()
        return started, got, answer, replica.engine.runs, replica.heads.started

    started, got, answer, runs, heads = run(main())
    assert started and got[:3] == items and got[3] == datapath.End(3)
    assert answer == 3 and runs == 1 and heads == 1


def test_a_call_that_comes_first_runs_it_and_the_start_after_it_is_ignored() -> None:
    items = [delta(0, "stop")]

    async def main() -> tuple[int, int]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        replica = Replica("r1", EngineRuns(items))
        await connected(inbox, replica)
        stream_id, stream = inbox.open()
        reply = inbox.reply_to(stream_id)
        answer = await replica.call({}, reply)
        assert inbox.start_head(reply, "r1", {})  # sent, after the call
        await asyncio.sleep(0.2)
        await inbox.stop()
        return answer, replica.engine.runs

    assert run(main()) == (1, 1)


def test_no_head_start_without_a_connection_a_stream_or_when_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is sent to a replica with no connection here yet (its first request goes
    through Serve alone), for a stream that is gone or has its head start, for arguments
    that are not a direct-path call's, or with TPSERVE_HEAD_START=0; a bad value is
    refused by name."""
    async def main() -> list[bool]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        replica = Replica("r1", EngineRuns([delta(0, "stop")]))
        stream_id, _ = inbox.open()
        reply = inbox.reply_to(stream_id)
        results = [inbox.start_head(reply, "r1", {})]  # no connection yet
        await connected(inbox, replica)
        results.append(datapath.start_head(({}, {"token": "other", "stream": 1}), "r1"))
        results.append(datapath.start_head(({},), "r1"))
        results.append(inbox.start_head(reply, "r1", {}))  # sent
        results.append(inbox.start_head(reply, "r1", {}))  # it has one
        inbox.close(stream_id)
        results.append(inbox.start_head(reply, "r1", {}))  # gone
        monkeypatch.setenv(datapath.HEAD_START_ENV, "0")
        off = Inbox("127.0.0.1")
        await off.start()
        await connected(off, replica)
        off_id, _ = off.open()
        results.append(off.start_head(off.reply_to(off_id), "r1", {}))
        await asyncio.gather(inbox.stop(), off.stop())
        return results

    assert run(main()) == [False, False, False, True, False, False, False]
    monkeypatch.setenv(datapath.HEAD_START_ENV, "yes")
    with pytest.raises(ValueError, match=datapath.HEAD_START_ENV):
        Inbox("127.0.0.1")


def test_a_dropped_head_start_is_cancelled_and_its_items_refused() -> None:
    """The chosen replica left the candidates before Serve sent the call: its run is
    cancelled (the request aborted there) and anything still coming from it is dropped;
    a stream that already had items from it fails (Lost), as a lost replica's does; a
    stream head-started again on the same replica gets the new run's items."""
    async def main() -> tuple[bool, int, bool, int]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        slow = Replica("r1", EngineRuns([delta(i) for i in range(50)], gap_s=0.05))
        await connected(inbox, slow)
        quiet_id, quiet = inbox.open()  # dropped before its first item
        datapath.start_head(({}, inbox.reply_to(quiet_id)), "r1")
        inbox.drop_head(quiet_id)
        busy_id, busy = inbox.open()  # dropped after its first item
        datapath.start_head(({}, inbox.reply_to(busy_id)), "r1")
        first = await busy.queue.get()
        assert first == delta(0) and datapath.head_of(({}, inbox.reply_to(busy_id))) == "r1"
        datapath.drop_head(({}, inbox.reply_to(busy_id)))
        lost = isinstance(await busy.queue.get(), Lost)
        await asyncio.sleep(0.3)
        refused = quiet.queue.qsize()
        # chosen again, the same replica: the new run's items come (the old one's id is
        # forgotten, not the replica)
        slow.engine.items = [delta(7, "stop")]
        assert inbox.start_head(inbox.reply_to(quiet_id), "r1", {})
        again = [await quiet.queue.get(), await quiet.queue.get()]
        assert again == [delta(7, "stop"), datapath.End(1)], again
        await inbox.stop()
        engine = slow.engine
        return (lost, refused, busy.head is None,
                engine.runs >= 2 and engine.aborted == engine.runs - 1)

    lost, refused, cleared, all_aborted = run(main())
    # (every run that began was aborted but the last: the quiet one's cancel may come
    # before it began)
    assert lost and refused == 0 and cleared and all_aborted


def test_a_reader_gone_cancels_a_head_started_run_whose_call_never_came() -> None:
    """The router's client went away before Serve's call reached the replica: closing the
    stream (ServeEngine's end) sends the cancel, and the run's request is aborted."""
    async def main() -> tuple[int, int]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        replica = Replica("r1", EngineRuns([delta(i) for i in range(50)], gap_s=0.05))
        await connected(inbox, replica)
        stream_id, stream = inbox.open()
        inbox.start_head(inbox.reply_to(stream_id), "r1", {})
        await stream.queue.get()
        inbox.close(stream_id, abort=True)
        await asyncio.sleep(0.3)
        await inbox.stop()
        return replica.engine.runs, replica.engine.aborted

    assert run(main()) == (1, 1)


def test_the_request_router_head_starts_and_keeps_the_replica_when_choosing_again() -> None:
    """PinnedRouter: the request goes down the chosen replica's connection at once;
    choosing again (Serve backed off from a full replica) returns that replica while it
    is a candidate; once it is not, its head start is dropped and the choice made anew."""
    from cluster.pinning import PinnedRouter
    from router import metrics

    class FakeReplica:
        def __init__(self, rid: str) -> None:
            self.replica_id = type("Id", (), {"unique_id": rid})()

    def starts() -> float:
        return {s.name: s.value for m in metrics.HEAD_STARTS.collect()
                for s in m.samples}["tpserve_engine_head_starts_total"]

    async def main() -> tuple[list[str], float, int]:
        inbox = Inbox("127.0.0.1")
        await inbox.start()
        engines = {n: Replica(n, EngineRuns([delta(i) for i in range(50)], gap_s=0.05))
                   for n in ("a", "b")}
        for replica in engines.values():
            await connected(inbox, replica)
        router = object.__new__(PinnedRouter)
        router.initialize_state(redis_url=None)
        stream_id, _ = inbox.open()
        args = ({"prompt": [1]}, inbox.reply_to(stream_id))
        pending = type("Pending", (), {"metadata": type("M", (), {"session_id": ""})(),
                                       "args": args, "created_at": time.time()})()
        a, b = FakeReplica("a"), FakeReplica("b")
        before = starts()
        picks = []
        for candidates in ([a, b], [b, a], [b]):
            chosen = await router.choose_replicas(candidates, pending)
            picks.append(chosen[0][0].replica_id.unique_id)
            router.in_flight["b"] += 5  # (a load that would send it elsewhere)
            await asyncio.sleep(0.1)
        await inbox.stop()
        return picks, starts() - before, sum(e.engine.runs for e in engines.values())

    picks, started, runs = run(main())
    assert picks == ["a", "a", "b"] and started == 2 and runs == 2


def test_a_replicas_head_start_records_are_forgotten_after_keep_s(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica keeps an unclaimed run's end and a call's claim KEEP_S, then forgets
    them (every call claims its stream, head starts on or off: no record may grow)."""
    monkeypatch.setattr(datapath, "KEEP_S", 0.2)

    async def main() -> tuple[int, int, int, int]:
        async def run_(request: Any, reply: Any, outbox: Any) -> int:
            return 0

        heads = datapath.Heads(run_)
        outbox = type("O", (), {"token": "t"})()
        heads.take(outbox, {"start": {"stream": 1}, "request": {}})  # never claimed
        await asyncio.sleep(0.01)
        for stream in range(2, 12):  # calls with no head start
            assert heads.claim({"token": "t", "stream": stream}) is None
        kept = len(heads._claimed), len(heads.runs)
        await asyncio.sleep(0.3)
        heads.claim({"token": "t", "stream": 99})
        return (*kept, len(heads._claimed), len(heads.runs))

    assert run(main()) == (10, 1, 1, 0)


def test_a_call_that_fails_cancels_its_head_start() -> None:
    """Serve's call fails (not the data path: Serve could not route it, say) while the
    request already runs on the replica it was head-started on: the router's stream ends
    with the error, and the run no one will read is cancelled there."""
    async def main() -> tuple[list[wire.Item], int, int, int]:
        engine_runs = EngineRuns([delta(i) for i in range(50)], gap_s=0.05)
        replica = Replica("r1", engine_runs)

        async def failing(request: dict[str, Any], reply: dict[str, Any]) -> int:
            raise RuntimeError("Serve could not route it")

        unary = FakeUnary(failing)
        engine = direct_engine(unary)
        assert engine.inbox is not None
        await engine.inbox.start()
        await connected(engine.inbox, replica)
        remote = unary.remote

        def remote_after_a_head_start(request: dict[str, Any],
                                      reply: dict[str, Any]) -> FakeCall:
            assert engine.inbox is not None and engine.inbox.start_head(reply, "r1", request)
            return remote(request, reply)

        unary.remote = remote_after_a_head_start  # type: ignore[method-assign]
        out = await collect(engine)
        await asyncio.sleep(0.3)
        await engine.inbox.stop()
        return out, engine_runs.runs, engine_runs.aborted, len(replica.heads.runs)

    out, runs, aborted, left = run(main())
    assert len(out) == 1 and isinstance(out[0], wire.ErrorEvent), out
    assert runs == aborted and left == 0  # (a run cancelled before it began: 0 and 0)
