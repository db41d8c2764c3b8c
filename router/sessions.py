"""The router's session store in Redis: which replica a session is pinned to, and its chat
history.

Data model (the key formats are router/keys.py's; every key starts with `key_prefix`,
"tpserve:" by default):
- the pin, a hash: `replica` (the replica id the session is pinned to) and `last_seen`
  (unix time of its last claim, touch or append);
- the history, a list of JSON-encoded chat messages, oldest first, capped to
  `history_token_budget` tokens (the oldest dropped first, the newest always kept);
- the stats each engine replica publishes, read here for the dashboard.
Pin and history carry the session TTL (`ttl_s`), refreshed by every use: an idle session
expires. A session key (`kind:value`, router/keys.py) is a session id or whatever the
router derives for a client without one.

Contract:
- `claim_pin` is one Lua script, so routers racing on a session agree: an existing pin
  whose replica is live is kept, a missing one is set (like SET NX), a dead one replaced.
- `touch` refreshes the TTL only while the pin still names the given replica: a late
  refresh never brings back a deleted or moved pin.
- One pooled client per store; each call is bounded by `op_timeout_s`.
- Degraded mode: when Redis does not answer (connection refused, timeout, wrong password)
  or no URL is set, every call returns its fallback at once and never raises, so the router
  routes by hash alone. After `retry_interval_s` the next call PINGs Redis once and, if it
  answers, leaves degraded mode. Transitions are logged once each, without the password.
  Pooled connections are closed on entering degraded mode and before each probe, so none
  that a restarted Redis has closed is reused afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router import keys

log = logging.getLogger(__name__)
T = TypeVar("T")

URL_SCHEMES = ("redis://", "rediss://", "unix://")
# errors that mean "Redis is not there": degrade instead of raising. redis' AuthenticationError
# and "Too many connections" are ConnectionErrors; asyncio's TimeoutError is an OSError.
DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
POOL_SIZE = 64  # connections per store; callers beyond it wait (bounded by op_timeout_s)
# connections a store opens ahead of its requests (`warm_soon`): under 64 streaming clients
# a connection opened on demand took ~100 ms (its handshake's round trips on the router's
# busy event loop), and the first burst after a start opened ~60 of them
WARM_CONNECTIONS = 32
SCAN_BATCH = 1000  # keys per SCAN step in live_sessions
SCAN_STEPS = 100  # live_sessions stops after this many steps (a lower bound past ~100k keys)

# KEYS: session hash, history list. ARGV: replica, ttl_s, now, live replicas...
# Returns {pinned replica, 1 if an existing pin to another replica was replaced}.
CLAIM_LUA = """
local cur = redis.call('HGET', KEYS[1], 'replica')
local moved = 0
if cur then
  for i = 4, #ARGV do
    if ARGV[i] == cur then
      redis.call('HSET', KEYS[1], 'last_seen', ARGV[3])
      redis.call('EXPIRE', KEYS[1], ARGV[2])
      redis.call('EXPIRE', KEYS[2], ARGV[2])
      return {cur, 0}
    end
  end
  if cur ~= ARGV[1] then moved = 1 end
end
redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'last_seen', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {ARGV[1], moved}
"""

# KEYS: session hash, history list. ARGV: replica, ttl_s, now. Returns 1 if refreshed.
TOUCH_LUA = """
if redis.call('HGET', KEYS[1], 'replica') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS: session hash, history list. ARGV: ttl_s, now, the token budget, the new messages'
# tokens, then the new messages (JSON). Appends them, keeps the history's token total in
# the hash (`history_tokens`) and refreshes both TTLs, in one round trip. Returns 1 when
# the history must be trimmed exactly: over budget, or a total that began before the
# list did (a history stored before the field existed); SessionStore._trim does that.
APPEND_LUA = """
local total = redis.call('HINCRBY', KEYS[1], 'history_tokens', ARGV[4])
local n = redis.call('RPUSH', KEYS[2], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'last_seen', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
if total > tonumber(ARGV[3]) then return 1 end
if n > #ARGV - 4 and total == tonumber(ARGV[4]) then return 1 end
return 0
"""


@dataclass(frozen=True)
class SessionStoreConfig:
    """Where the sessions live and how long; `url=None` runs without Redis (hash-only)."""

    url: str | None = field(default=None, repr=False)  # may hold a password: kept out of repr
    ttl_s: int = 3600
    history_token_budget: int = 4096
    key_prefix: str = keys.PREFIX
    op_timeout_s: float = 0.5
    retry_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(URL_SCHEMES):
            raise ValueError(f"session store url must start with one of {URL_SCHEMES}, "
                             f"e.g. redis://:password@127.0.0.1:6380/0")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, int) or self.ttl_s < 1:
            raise ValueError(f"ttl_s must be a whole number of seconds >= 1, got {self.ttl_s!r}")
        if self.history_token_budget < 1:
            raise ValueError(f"history_token_budget must be >= 1, got "
                             f"{self.history_token_budget}")
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty (it keeps tpserve's keys apart)")
        if self.op_timeout_s <= 0:
            raise ValueError(f"op_timeout_s must be > 0, got {self.op_timeout_s}")
        if self.retry_interval_s < 0:
            raise ValueError(f"retry_interval_s must be >= 0, got {self.retry_interval_s}")


def redact(url: str) -> str:
    """The URL without its password or query string, for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def keep_from(counts: list[int], budget: int) -> int:
    """Index of the oldest message to keep so the kept ones fit `budget` tokens; the newest
    message is always kept, even alone over budget."""
    total, start = sum(counts), 0
    while total > budget and start < len(counts) - 1:
        total -= counts[start]
        start += 1
    return start


def make_client(config: SessionStoreConfig) -> aioredis.Redis:
    """One pooled client: no retries of its own (degraded mode is the retry), socket
    timeouts of op_timeout_s, and a bounded pool where callers wait for a connection."""
    assert config.url is not None
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url, max_connections=POOL_SIZE, timeout=None, decode_responses=True,
        socket_timeout=config.op_timeout_s, socket_connect_timeout=config.op_timeout_s,
        retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_pool(pool)


class SessionStore:
    """Pins and histories of sessions in Redis, degrading to fallbacks when Redis is away."""

    def __init__(self, config: SessionStoreConfig) -> None:
        self.config = config
        self._client = make_client(config) if config.url is not None else None
        self._where = redact(config.url) if config.url is not None else "(none)"
        self._degraded = self._client is None
        self._retry_at = 0.0  # monotonic time of the next PING while degraded
        self._probe: asyncio.Future[bool] | None = None  # that PING, while it is out
        self._warming: asyncio.Future[None] | None = None  # the pool's warm-up (warm_soon)
        if self._client is None:
            log.info("session store: no Redis URL; sessions are routed by hash only")
        else:
            self._claim = self._client.register_script(CLAIM_LUA)
            self._touch = self._client.register_script(TOUCH_LUA)
            self._append = self._client.register_script(APPEND_LUA)

    @property
    def degraded(self) -> bool:
        return self._degraded

    # ---- keys and the degraded-mode guard -------------------------------------------------

    def _keys(self, key: str) -> tuple[str, str]:
        prefix = self.config.key_prefix
        return keys.pin(key, prefix), keys.history(key, prefix)

    def warm_soon(self) -> None:
        """Open WARM_CONNECTIONS pooled connections in the background, once (again after an
        outage), so that a burst of requests finds them open. Needs a running event loop;
        without one (a constructor outside it) the store's first operation starts it."""
        if self._client is None or self._warming is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._warming = loop.create_task(self._warm(self._client, WARM_CONNECTIONS))

    async def _warm(self, client: aioredis.Redis, n: int) -> None:
        """Take n connections from the pool one after another, holding them (so each is a
        new one), then give them back. One handshake at a time: the store's operations
        never wait behind a crowd of them (32 TLS handshakes at once on two cores held an
        operation past op_timeout_s). A failure only logs: the operations themselves put
        the store into degraded mode."""
        pool = client.connection_pool
        held: list[Any] = []
        try:
            for _ in range(n):
                async with asyncio.timeout(self.config.op_timeout_s):
                    held.append(await pool.get_connection())
        except (*DOWN_ERRORS, RedisError) as exc:
            log.debug("session store: warming the pool: %r", exc)
        finally:
            for connection in held:
                await pool.release(connection)

    async def _run(self, op: Callable[[aioredis.Redis], Awaitable[T]], fallback: T) -> T:
        """`op(client)` within op_timeout_s, or `fallback` while Redis is away."""
        if self._client is None or not await self._reachable(self._client):
            return fallback
        self.warm_soon()
        try:
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the op as a task
            # of its own, a turn of the busy event loop more each way)
            async with asyncio.timeout(self.config.op_timeout_s):
                return await op(self._client)
        except DOWN_ERRORS as exc:
            await self._go_degraded(exc)
            return fallback

    async def _reachable(self, client: aioredis.Redis) -> bool:
        """True unless degraded; while degraded, one PING per retry interval may end it.
        Calls that arrive while that PING is out wait for its answer (bounded by
        op_timeout_s) instead of failing: a write right after Redis returns is kept."""
        if not self._degraded:
            return True
        if self._probe is not None:
            return await asyncio.shield(self._probe)
        if time.monotonic() < self._retry_at:
            return False
        self._retry_at = time.monotonic() + self.config.retry_interval_s  # one prober
        self._probe = asyncio.ensure_future(self._ping(client))
        try:
            return await asyncio.shield(self._probe)
        finally:
            self._probe = None

    async def _ping(self, client: aioredis.Redis) -> bool:
        await self._drop_connections()  # the probe (and what follows) on a fresh connection
        try:
            await asyncio.wait_for(client.ping(), self.config.op_timeout_s)
        except DOWN_ERRORS:
            return False
        self._degraded = False
        log.warning("session store: Redis at %s answers again; sessions are pinned",
                    self._where)
        self._warming = None  # (the outage closed the pool: warm it again)
        return True

    async def _drop_connections(self) -> None:
        """Close every pooled connection: after an outage they are dead (a restarted Redis
        closed them), and each one reused would fail one op, drop a write and put the
        store back into degraded mode. The pool opens new ones on demand."""
        assert self._client is not None
        try:
            await self._client.connection_pool.disconnect()
        except Exception as exc:  # noqa: BLE001 - closing a dead socket must not raise here
            log.debug("session store: closing pooled connections: %r", exc)

    async def _go_degraded(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.config.retry_interval_s
        if not self._degraded:
            self._degraded = True
            await self._drop_connections()
            log.warning("session store: Redis at %s unreachable (%s: %s); routing by hash "
                        "only, retrying every %.1f s", self._where, type(exc).__name__, exc,
                        self.config.retry_interval_s)

    async def ping(self) -> bool:
        """Whether Redis answers now: one PING (while degraded, at most one per retry
        interval, as for any call). /healthz asks, so its status does not depend on a
        request having used the store (a request without a session does not)."""
        return bool(await self._run(lambda c: c.ping(), False))

    # ---- pins ------------------------------------------------------------------------------

    async def get_pin(self, key: str) -> str | None:
        """The replica `key` is pinned to, or None."""
        skey, _ = self._keys(key)
        return await self._run(lambda c: c.hget(skey, "replica"), None)

    async def claim_pin(self, key: str, replica: str, live: Collection[str]) -> tuple[str, bool]:
        """Keep a live pin (refreshing its TTL) or pin `key` to `replica`; returns the replica
        pinned afterwards and whether an existing pin was moved."""
        keys = self._keys(key)
        args = [replica, self.config.ttl_s, time.time(), *live]

        async def op(_: aioredis.Redis) -> tuple[str, bool]:
            pinned, moved = await self._claim(keys=keys, args=args)
            return str(pinned), bool(moved)

        return await self._run(op, (replica, False))

    async def touch(self, key: str, replica: str) -> None:
        """Slide the TTL of `key`'s session, only while it is still pinned to `replica`."""
        keys = self._keys(key)
        args = [replica, self.config.ttl_s, time.time()]
        await self._run(lambda c: self._touch(keys=keys, args=args), None)

    # ---- history ---------------------------------------------------------------------------

    async def history(self, session_id: str) -> list[dict[str, Any]]:
        """The session's chat messages, oldest first."""
        _, hkey = self._keys(session_id)
        raw: list[str] = await self._run(lambda c: c.lrange(hkey, 0, -1), [])
        return [json.loads(m) for m in raw]

    async def append_history(self, session_id: str, messages: list[dict[str, Any]],
                             count_tokens: Callable[[dict[str, Any]], int]) -> None:
        """Append `messages`, then drop the oldest until the history fits the token budget;
        refreshes the TTL and last_seen. One round trip (APPEND_LUA, the history's token
        total kept beside it); over budget, the exact trim (_trim). A turn's stream waits
        for this before its last event: the WATCH transaction every append took before
        (three round trips on a busy event loop) was 51-59 ms of each request under 64
        clients on the CPU stack (PERF.md v0.39)."""
        if not messages:
            return
        skey, hkey = self._keys(session_id)
        new = [json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in messages]
        args = [self.config.ttl_s, time.time(), self.config.history_token_budget,
                sum(count_tokens(m) for m in messages), *new]

        async def op(client: aioredis.Redis) -> None:
            if await self._append(keys=[skey, hkey], args=args):
                await self._trim(client, skey, hkey, count_tokens)

        await self._run(op, None)

    async def _trim(self, client: aioredis.Redis, skey: str, hkey: str,
                    count_tokens: Callable[[dict[str, Any]], int]) -> None:
        """Drop the oldest messages until the history fits the token budget, and set its
        exact token total. Optimistic (WATCH on both keys) so concurrent appends stay
        exact."""

        async def trim(pipe: Pipeline) -> None:
            counts = [count_tokens(json.loads(m)) for m in await pipe.lrange(hkey, 0, -1)]
            drop = keep_from(counts, self.config.history_token_budget)
            pipe.multi()
            pipe.ltrim(hkey, drop, -1)
            pipe.hset(skey, "history_tokens", sum(counts[drop:]))

        await client.transaction(trim, skey, hkey)

    # ---- whole sessions --------------------------------------------------------------------

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """{"replica", "history", "last_seen"} of a stored session, or None."""
        skey, hkey = self._keys(session_id)

        async def op(c: aioredis.Redis) -> tuple[dict[str, str], list[str]]:
            async with c.pipeline(transaction=True) as pipe:
                fields, raw = await pipe.hgetall(skey).lrange(hkey, 0, -1).execute()
            return fields, raw

        fields, raw = await self._run(op, ({}, []))
        if not fields and not raw:
            return None
        return {"replica": fields.get("replica"),
                "history": [json.loads(m) for m in raw],
                "last_seen": float(fields.get("last_seen", 0.0))}

    async def delete_session(self, session_id: str) -> bool:
        """Forget the session's pin and history; True if there was anything to forget."""
        keys = self._keys(session_id)
        return bool(await self._run(lambda c: c.delete(*keys), 0))

    async def live_sessions(self) -> int:
        """How many sessions are stored (SCAN, at most SCAN_STEPS steps)."""
        pattern = keys.pins_pattern(self.config.key_prefix)

        async def op(c: aioredis.Redis) -> int:
            cursor, count = 0, 0
            for _ in range(SCAN_STEPS):
                cursor, batch = await c.scan(cursor, match=pattern, count=SCAN_BATCH)
                count += len(batch)
                if cursor == 0:
                    break
            return count

        return await self._run(op, 0)

    async def sessions_per_replica(self) -> dict[str, int]:
        """How many stored sessions each replica holds (SCAN + HGET, bounded like
        live_sessions); {} while degraded."""
        pattern = keys.pins_pattern(self.config.key_prefix)

        async def op(c: aioredis.Redis) -> dict[str, int]:
            tally: dict[str, int] = {}
            cursor = 0
            for _ in range(SCAN_STEPS):
                cursor, batch = await c.scan(cursor, match=pattern, count=SCAN_BATCH)
                if batch:
                    async with c.pipeline(transaction=False) as pipe:
                        for key in batch:
                            pipe.hget(key, "replica")
                        for replica in await pipe.execute():
                            if replica:
                                tally[replica] = tally.get(replica, 0) + 1
                if cursor == 0:
                    break
            return tally

        return await self._run(op, {})

    async def replica_stats(self) -> dict[str, dict[str, Any]]:
        """{replica id: the stats it published} of the engine replicas (their keys expire
        a few seconds after the last beat); {} while degraded."""
        prefix = self.config.key_prefix

        async def op(c: aioredis.Redis) -> dict[str, dict[str, Any]]:
            found = [k async for k in c.scan_iter(match=keys.stats_pattern(prefix),
                                                  count=SCAN_BATCH)]
            values = await c.mget(found) if found else []
            return {keys.replica_of_stats(k, prefix): json.loads(v)
                    for k, v in zip(found, values, strict=True) if v}

        return await self._run(op, {})

    async def close(self) -> None:
        """Close the pool; the store is not used afterwards."""
        if self._warming is not None:
            self._warming.cancel()
        if self._client is not None:
            await self._client.aclose()

