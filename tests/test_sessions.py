"""The Redis session store against a real redis-server (password set, loopback, free port):
pins (SET NX semantics, races between two routers, dead pins replaced), the sliding TTL,
history capped to a token budget, and degraded mode while Redis is stopped or hung."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redisserver import REDIS_SERVER, RedisServer, running

from replicas.ranks import free_port
from router.sessions import SessionStore, SessionStoreConfig, keep_from, redact


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with running() as srv:
        yield srv


@pytest.fixture
def make_store(server: RedisServer) -> Callable[..., SessionStore]:
    """Stores on the server; every test gets its own key prefix (so counts are its own)."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"

    def make(**overrides: Any) -> SessionStore:
        options: dict[str, Any] = {"url": server.url(), "key_prefix": prefix, **overrides}
        return SessionStore(SessionStoreConfig(**options))

    return make


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


async def timed(call: Awaitable[Any], limit_s: float = 1.0) -> Any:
    start = time.monotonic()
    result = await call
    assert time.monotonic() - start < limit_s
    return result


def words(message: dict[str, Any]) -> int:
    return len(message["content"].split())


def msg(text: str, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": text}


# ---- pure helpers and config ---------------------------------------------------------------


def test_keep_from_drops_oldest_keeps_newest() -> None:
    assert keep_from([3, 3, 3], 9) == 0
    assert keep_from([3, 3, 3], 6) == 1
    assert keep_from([3, 3, 10], 6) == 2  # the newest alone over budget is still kept
    assert keep_from([], 6) == 0


def test_config_validation_and_redaction() -> None:
    for bad in ({"url": "http://x"}, {"ttl_s": 0}, {"ttl_s": 1.5}, {"key_prefix": ""},
                {"op_timeout_s": 0}, {"history_token_budget": 0}, {"retry_interval_s": -1}):
        with pytest.raises(ValueError):
            SessionStoreConfig(**bad)
    config = SessionStoreConfig(url="rediss://user:hunter2@h:6380/1?password=hunter2")
    assert "hunter2" not in repr(config)
    assert redact(config.url or "") == "rediss://user:***@h:6380/1"
    assert redact("redis://h:6380/0") == "redis://h:6380/0"


# ---- pins ---------------------------------------------------------------------------------


def test_claim_pins_new_session_like_set_nx(make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store()
        assert await store.get_pin("s1") is None
        assert await store.claim_pin("s1", "r1", {"r1", "r2"}) == ("r1", False)
        assert await store.get_pin("s1") == "r1"
        # another router's choice loses to the live pin
        assert await store.claim_pin("s1", "r2", {"r1", "r2"}) == ("r1", False)
        assert not store.degraded
        await store.close()

    run(main)


def test_two_routers_racing_agree(make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        a, b = make_store(), make_store()
        live = ["r1", "r2"]
        for i in range(20):
            (pa, ma), (pb, mb) = await asyncio.gather(a.claim_pin(f"race{i}", "r1", live),
                                                      b.claim_pin(f"race{i}", "r2", live))
            assert pa == pb and not ma and not mb
        await a.close()
        await b.close()

    run(main)


def test_dead_pin_is_replaced_and_reported_moved(
        make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store()
        await store.claim_pin("s", "r1", {"r1", "r2"})
        assert await store.claim_pin("s", "r2", {"r2", "r3"}) == ("r2", True)
        assert await store.get_pin("s") == "r2"
        assert await store.claim_pin("s", "r3", {"r2", "r3"}) == ("r2", False)
        await store.close()

    run(main)


def test_touch_slides_ttl_only_for_the_pinned_replica(
        server: RedisServer, make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store(ttl_s=60)
        skey, hkey = store._keys("s")
        await store.claim_pin("s", "r1", {"r1"})
        await store.append_history("s", [msg("hi")], words)
        with server.client() as c:
            for key in (skey, hkey):
                c.pexpire(key, 5000)
            await store.touch("s", "r2")  # not the pinned replica: no refresh
            assert all(c.pttl(k) <= 5000 for k in (skey, hkey))
            await store.touch("s", "r1")
            assert all(c.pttl(k) > 50_000 for k in (skey, hkey))
            # a late touch never resurrects a deleted session ...
            assert await store.delete_session("s")
            await store.touch("s", "r1")
            assert c.exists(skey, hkey) == 0
            # ... nor extends one that was re-pinned elsewhere
            await store.claim_pin("s", "r1", {"r1"})
            await store.claim_pin("s", "r2", {"r2"})
            c.pexpire(skey, 5000)
            await store.touch("s", "r1")
            assert c.pttl(skey) <= 5000 and c.hget(skey, "replica") == "r2"
        await store.close()

    run(main)


def test_claim_sets_ttl(server: RedisServer, make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store(ttl_s=30)
        await store.claim_pin("s", "r1", {"r1"})
        with server.client() as c:
            assert 25_000 < c.pttl(store._keys("s")[0]) <= 30_000
        await store.close()

    run(main)


# ---- history and sessions ------------------------------------------------------------------


def test_history_is_capped_to_the_token_budget(make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store(history_token_budget=6)
        assert await store.history("s") == []
        await store.append_history("s", [msg("one two"), msg("three four", "assistant")], words)
        assert [m["content"] for m in await store.history("s")] == ["one two", "three four"]
        await store.append_history("s", [msg("five six seven")], words)  # 7 tokens: drop 1
        assert [m["content"] for m in await store.history("s")] == ["three four",
                                                                   "five six seven"]
        await store.append_history("s", [msg("é " * 9)], words)  # alone over budget: kept
        assert await store.history("s") == [msg("é " * 9)]
        await store.append_history("s", [], words)
        assert len(await store.history("s")) == 1
        await store.close()

    run(main)


def test_history_keeps_its_token_total_and_trims_exactly_when_over_or_unknown(
        server: RedisServer, make_store: Callable[..., SessionStore]) -> None:
    """An append is one script that keeps the history's token total beside it
    (`history_tokens`); over budget, or for a history stored before the total existed,
    the exact trim runs and sets the total again; concurrent appends stay exact."""
    async def main() -> None:
        store = make_store(history_token_budget=6)
        skey, hkey = store._keys("s")

        def total() -> int:
            with server.client() as c:
                return int(c.hget(skey, "history_tokens"))

        await store.append_history("s", [msg("one two")], words)
        await store.append_history("s", [msg("three four", "assistant")], words)
        assert total() == 4
        await store.append_history("s", [msg("five six seven")], words)  # 7: trimmed
        assert total() == 5 and len(await store.history("s")) == 2
        # a history written before the total existed: 8 tokens, no field
        with server.client() as c:
            c.delete(skey, hkey)
            c.rpush(hkey, *(json.dumps(msg(t)) for t in ("a b c", "d e f", "g h")))
        await store.append_history("s", [msg("i")], words)  # the total was unknown: exact
        assert [m["content"] for m in await store.history("s")] == ["d e f", "g h", "i"]
        assert total() == 6
        # concurrent appends of one session: the kept ones fit, and the total is theirs
        await asyncio.gather(*(store.append_history("s", [msg(f"w{i} x")], words)
                               for i in range(8)))
        kept = await store.history("s")
        assert sum(words(m) for m in kept) == total() <= 6 and len(kept) == 3
        await store.close()

    run(main)


def test_get_delete_and_count_sessions(make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store()
        assert await store.get_session("s") is None
        assert await store.live_sessions() == 0
        before = time.time()
        await store.claim_pin("s", "r1", {"r1"})
        await store.append_history("s", [msg("hi")], words)
        await store.append_history("other", [msg("hello")], words)
        session = await store.get_session("s")
        assert session is not None
        assert session["replica"] == "r1" and session["history"] == [msg("hi")]
        assert before <= session["last_seen"] <= time.time()
        assert await store.live_sessions() == 2
        assert await store.delete_session("s")
        assert not await store.delete_session("s")
        assert await store.get_session("s") is None
        assert await store.live_sessions() == 1
        await store.close()

    run(main)


def test_router_restart_loses_nothing(make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        first = make_store()
        await first.claim_pin("s", "r1", {"r1", "r2"})
        await first.append_history("s", [msg("remember me")], words)
        await first.close()
        second = make_store()
        assert await second.claim_pin("s", "r2", {"r1", "r2"}) == ("r1", False)
        assert await second.history("s") == [msg("remember me")]
        await second.close()

    run(main)


# ---- degraded mode --------------------------------------------------------------------------


async def assert_fallbacks(store: SessionStore) -> None:
    """Every call returns its fallback within a second, and nothing raises."""
    assert await timed(store.get_pin("s")) is None
    assert await timed(store.claim_pin("s", "r9", {"r9"})) == ("r9", False)
    assert await timed(store.touch("s", "r9")) is None
    assert await timed(store.history("s")) == []
    assert await timed(store.append_history("s", [msg("x")], words)) is None
    assert await timed(store.get_session("s")) is None
    assert await timed(store.delete_session("s")) is False
    assert await timed(store.live_sessions()) == 0
    assert store.degraded


def test_no_url_is_hash_only() -> None:
    async def main() -> None:
        store = SessionStore(SessionStoreConfig(url=None))
        assert store.degraded
        await assert_fallbacks(store)
        await store.close()

    run(main)


def test_wrong_or_missing_password_degrades(server: RedisServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        for url in (server.url("wrong-" + server.password), f"redis://127.0.0.1:{server.port}"):
            store = SessionStore(SessionStoreConfig(url=url, retry_interval_s=0.1))
            await assert_fallbacks(store)
            await asyncio.sleep(0.15)
            await assert_fallbacks(store)  # the retry PING fails the same way
            await store.close()

    with caplog.at_level(logging.INFO, logger="router.sessions"):
        run(main)
    assert len(caplog.records) == 2  # one transition per store, logged once
    assert server.password not in caplog.text and ":***@" in caplog.text


def test_unreachable_port_degrades_at_once() -> None:
    async def main() -> None:
        store = SessionStore(SessionStoreConfig(url=f"redis://127.0.0.1:{free_port()}/0"))
        await assert_fallbacks(store)
        await store.close()

    run(main)


def test_stop_and_restart_redis(server: RedisServer, make_store: Callable[..., SessionStore],
                                caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = make_store(retry_interval_s=0.2)
        assert await store.claim_pin("s", "r1", {"r1"}) == ("r1", False)
        server.stop()
        try:
            await assert_fallbacks(store)
        finally:
            server.start()  # same port, empty (no persistence)
        assert store.degraded  # still within retry_interval_s: no new attempt yet
        await asyncio.sleep(0.25)
        assert await store.claim_pin("s", "r2", {"r2"}) == ("r2", False)
        assert not store.degraded
        assert await store.get_pin("s") == "r2"
        await store.append_history("s", [msg("back")], words)
        assert await store.history("s") == [msg("back")]
        await store.close()

    with caplog.at_level(logging.INFO, logger="router.sessions"):
        run(main)
    messages = [r.getMessage() for r in caplog.records]  # each transition logged once
    assert len(messages) == 2 and "unreachable" in messages[0] and "again" in messages[1]
    assert server.password not in caplog.text


def test_ping_sees_an_outage_and_the_return_without_any_session_op(
        server: RedisServer, make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store(retry_interval_s=0.2)
        assert await store.ping() and not store.degraded
        server.stop()
        try:
            assert not await store.ping() and store.degraded
        finally:
            server.start()
        await asyncio.sleep(0.25)
        assert await store.ping() and not store.degraded
        await store.close()

    run(main)
    assert not asyncio.run(_ping_without_redis())


async def _ping_without_redis() -> bool:
    store = SessionStore(SessionStoreConfig(url=None))
    return await store.ping()


def test_restart_leaves_no_stale_pooled_connection(
        server: RedisServer, make_store: Callable[..., SessionStore],
        caplog: pytest.LogCaptureFixture) -> None:
    """Connections pooled before a Redis restart are dead after it: none may be reused (each
    would fail one op, drop a write and flip the store back to degraded)."""
    async def main() -> None:
        store = make_store(retry_interval_s=0.2)
        await asyncio.gather(*(store.claim_pin(f"s{i}", "r1", {"r1"}) for i in range(8)))
        server.stop()
        try:
            await assert_fallbacks(store)
        finally:
            server.start()
        await asyncio.sleep(0.25)
        for _ in range(3):  # every pooled connection gets used
            await asyncio.gather(*(store.append_history(f"s{i}", [msg("after")], words)
                                   for i in range(8)))
            assert not store.degraded
        assert [len(await store.history(f"s{i}")) for i in range(8)] == [3] * 8
        await store.close()

    with caplog.at_level(logging.INFO, logger="router.sessions"):
        run(main)
    assert [r.getMessage() for r in caplog.records][-1].endswith("sessions are pinned")


def test_hung_redis_is_bounded_by_op_timeout(server: RedisServer,
                                             make_store: Callable[..., SessionStore]) -> None:
    async def main() -> None:
        store = make_store(op_timeout_s=0.2, retry_interval_s=0.2)
        await store.claim_pin("s", "r1", {"r1"})
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
        try:
            assert await timed(store.get_pin("s"), 0.6) is None
            assert store.degraded
            await assert_fallbacks(store)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.25)
        assert await store.get_pin("s") == "r1"
        assert not store.degraded
        await store.close()

    run(main)


def test_tls_with_password(tmp_path: Path) -> None:
    if not os.path.exists(REDIS_SERVER) or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", tmp_path / "key.pem", "-out", tmp_path / "cert.pem",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = RedisServer(tls_dir=str(tmp_path))

    async def main() -> None:
        store = SessionStore(SessionStoreConfig(url=server.url()))
        assert await store.claim_pin("s", "r1", {"r1"}) == ("r1", False)
        assert await store.get_pin("s") == "r1" and not store.degraded
        await store.close()
        # without the CA the certificate is not trusted: degraded, not crashing
        untrusted = SessionStore(SessionStoreConfig(url=server.url().split("?")[0]))
        assert await untrusted.get_pin("s") is None and untrusted.degraded
        await untrusted.close()

    try:
        server.start()
        run(main)
    finally:
        server.stop()


def test_a_store_opens_its_pool_ahead_of_a_burst(make_store: Callable[..., SessionStore],
                                                 server: RedisServer) -> None:
    """warm_soon (at a router's start, or a store's first operation) opens WARM_CONNECTIONS
    pooled connections in the background: a burst of requests then finds them open
    instead of paying each one's handshake on a busy loop (PERF.md v0.43)."""
    from router.sessions import WARM_CONNECTIONS

    async def main() -> tuple[int, int]:
        store = make_store()
        assert store._client is not None
        pool = store._client.connection_pool
        store.warm_soon()
        store.warm_soon()  # once
        assert store._warming is not None
        await store._warming
        opened = len(pool._available_connections) + len(pool._in_use_connections)
        await store.history("someone")  # an operation now takes an open connection
        after = len(pool._available_connections) + len(pool._in_use_connections)
        await store._client.aclose()
        return opened, after

    assert run(main) == (WARM_CONNECTIONS, WARM_CONNECTIONS)
    # outside a running loop it waits for the first operation
    store = make_store()
    store.warm_soon()
    assert store._warming is None
