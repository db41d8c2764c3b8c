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
        writer.write(frame(inbox.token)
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
        writer.write(frame("not-the-token") + items_frame([[stream_id, delta(0)]]))
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
