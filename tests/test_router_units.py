"""Pure pieces of the router: the rate limiter, config validation, request models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router import wire
from router.app import ApiError, RateLimiter, RouterConfig, _delta
from router.schema import ChatBody, CompletionBody


def test_rate_limiter_refuses_past_the_budget_and_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(limiter.take("a") == 0 for _ in range(60))
    assert limiter.take("a") == 1  # empty: wait a second
    assert limiter.take("b") == 0  # another client is not affected
    now[0] += 1.0
    assert limiter.take("a") == 0
    assert limiter.take("a") >= 1


def test_router_config_validation() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        RouterConfig(max_in_flight=0)
    with pytest.raises(ValueError, match="max_replicas"):  # (no count could be scaled to)
        RouterConfig(max_replicas=0)
    with pytest.raises(ValueError):
        RouterConfig(trusted_proxies=("not-a-network",))
    with pytest.raises(ValueError, match="sessions"):
        RouterConfig(sessions="never")
    with pytest.raises(ValueError, match="rate_limit_per_minute"):
        RouterConfig(rate_limit_per_minute=-1)


def test_defaults_store_sessions_on_use_and_limit_no_client() -> None:
    config = RouterConfig()
    assert (config.sessions, config.rate_limit_per_minute) == ("on_use", 0)
    assert RouterConfig(rate_limit_per_minute=600).rate_limit_per_minute == 600


def test_an_engine_refusal_item_is_the_clients_error() -> None:
    delta = wire.decode({"token_ids": [5], "text": "a", "finish_reason": None,
                         "replica": "r"})
    assert _delta(delta) is delta
    refused = wire.decode({"error": {"status": 400, "type": "invalid_request_error",
                                     "message": "the prompt is empty"}, "replica": "r"})
    with pytest.raises(ApiError) as err:
        _delta(refused)
    assert (err.value.status, err.value.kind, err.value.message) == (
        400, "invalid_request_error", "the prompt is empty")
    assert err.value.headers is None  # the client's fault: no Retry-After
    failed = wire.ErrorEvent(503, "replica_unavailable", "the replica died", "r")
    with pytest.raises(ApiError) as err:
        _delta(failed, retry_after_s=2)
    assert (err.value.status, err.value.headers) == (503, {"Retry-After": "2"})


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": []}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": "3"}, {"prompt": "x", "temperature": float("inf")},
    {"prompt": "x", "n": 17}, {"prompt": ["x"] * 9, "n": 15}, {"prompt": ["x"] * 65},
    {"prompt": "x", "top_p": 0}, {"prompt": "x", "stop": ["a"] * 5},
    {"prompt": "x", "stream": "yes"},
])
def test_completion_bodies_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionBody.model_validate(body)


def test_chat_body_and_session_options() -> None:
    body = ChatBody.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                    "session": {"append": True}, "stop": "END"})
    assert body.session is not None and body.session.append
    assert body.engine_params()["stop"] == ["END"]
    with pytest.raises(ValidationError):
        ChatBody.model_validate({"messages": []})
    with pytest.raises(ValidationError):
        ChatBody.model_validate({"messages": [{"role": "robot", "content": "x"}]})
    with pytest.raises(ValidationError):
        ChatBody.model_validate({"messages": [{"role": "user", "content": "x"}],
                                 "session": {"append": True, "other": 1}})


def test_routing_mode_is_validated() -> None:
    assert RouterConfig().routing == "pinned"
    with pytest.raises(ValueError, match="routing"):
        RouterConfig(routing="round-robin")


class _FakeReplica:
    def __init__(self, rid: str) -> None:
        self.replica_id = type("Id", (), {"unique_id": rid})()


def _router(routing: str, refresh_s: float = 0.0) -> object:
    pytest.importorskip("ray")
    from cluster.pinning import PinnedRouter

    router = object.__new__(PinnedRouter)  # no Serve machinery: only the routing state
    router.initialize_state(redis_url=None, routing=routing, refresh_s=refresh_s)
    return router


def test_random_routing_spreads_one_session_over_replicas() -> None:
    import asyncio

    pending = _pending("s-1")
    replicas = [_FakeReplica(r) for r in ("a", "b", "c")]

    async def picks(routing: str) -> set[str]:
        router = _router(routing)
        chosen = [await router.choose_replicas(replicas, pending) for _ in range(60)]
        return {c[0][0].replica_id.unique_id for c in chosen}

    assert len(asyncio.run(picks("random"))) == 3
    assert len(asyncio.run(picks("pinned"))) == 1  # Redis off: the hash alone pins it
    with pytest.raises(ValueError, match="routing"):
        _router("sticky")


class _FakeStore:
    """claim_pin as the Lua script does it (a live pin wins), counting the calls; a call
    after the first waits on `gate` while it is clear (a slow Redis)."""

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}
        self.calls = 0
        self.gate = __import__("asyncio").Event()
        self.degraded = False

    async def claim_pin(self, key: str, replica: str, live: object) -> tuple[str, bool]:
        self.calls += 1
        if self.calls > 1:
            await self.gate.wait()
        cur = self.pins.get(key)
        if cur is not None and cur in live:  # type: ignore[operator]
            return cur, False
        self.pins[key] = replica
        return replica, cur is not None


def _pinned_with(store: _FakeStore, refresh_s: float = 0.0) -> object:
    router = _router("pinned", refresh_s)
    router.store = store  # type: ignore[attr-defined]
    return router


def _pending(session: str, created_at: float | None = None,
             messages: list[dict[str, str]] | None = None) -> object:
    """Serve's PendingRequest as the request router sees it: its session, the wall time
    the handle call made it, and (with `messages`) its arguments: a chat request."""
    import time

    metadata = type("Metadata", (), {"session_id": session})()
    args = () if messages is None else ({"params": {}, "messages": messages},)
    return type("Pending", (), {"metadata": metadata, "args": args,
                                "created_at": time.time() if created_at is None
                                else created_at})()


def test_a_chats_first_turn_is_routed_without_waiting_for_its_claim() -> None:
    """A chat's first turn (no assistant message yet: no replica caches its prefix) goes to
    the hash's choice at once, its Redis claim in the background, and later turns follow
    the pin the claim left; a later turn the router has no pin for waits for its claim
    (another router may have pinned the session where its history is cached)."""
    import asyncio

    from cluster.pinning import opens_session

    user = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    later = [*user, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    assert opens_session(_pending("s", messages=user))
    assert not opens_session(_pending("s", messages=later))
    assert not opens_session(_pending("s")) and not opens_session(None)  # (a prompt: unknown)

    async def run() -> None:
        store = _FakeStore()
        store.calls = 1  # every claim now waits on the gate (a slow Redis)
        router = _pinned_with(store)
        replicas = [_FakeReplica(r) for r in ("a", "b", "c")]
        first = await asyncio.wait_for(
            router.choose_replicas(replicas, _pending("s1", messages=user)), 1)
        assert store.calls == 2 and "s1" not in store.pins  # its claim: still out
        store.gate.set()
        await asyncio.sleep(0.01)
        assert store.pins["s1"] == first[0][0].replica_id.unique_id
        again = await router.choose_replicas(replicas, _pending("s1", messages=later))
        assert again[0][0] is first[0][0] and store.calls == 2  # the cached pin
        store.gate.clear()
        waiting = asyncio.ensure_future(
            router.choose_replicas(replicas, _pending("s2", messages=later)))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # a later turn waits for its claim
        store.gate.set()
        assert (await asyncio.wait_for(waiting, 1))[0][0].replica_id.unique_id \
            == store.pins["s2"]

    asyncio.run(run())


def test_the_request_router_times_each_choice_and_counts_each_send() -> None:
    """tpserve_engine_routing_seconds: from the handle call to each choice of replicas (a
    request chosen again: Serve backed off). A replica's load counts each request sent to
    it until it completes (one it refused too: Serve completes every request it sent)."""
    import asyncio
    import time

    from router import metrics

    def total() -> tuple[float, float]:
        values = {s.name: s.value for m in metrics.ROUTING.collect() for s in m.samples}
        return (values["tpserve_engine_routing_seconds_sum"],
                values["tpserve_engine_routing_seconds_count"])

    router = _router("pinned")
    router._use_replica_queue_len_cache = False  # (Serve's own cache: not set up here)
    replicas = [_FakeReplica(r) for r in ("a", "b")]
    pending = _pending("s-timed", created_at=time.time() - 0.25)
    def choices() -> float:
        return {s.name: s.value for m in metrics.CHOICE.collect()
                for s in m.samples}["tpserve_engine_choice_seconds_count"]

    (s0, n0), c0 = total(), choices()
    for _ in range(2):  # chosen twice (the first replica refused it)
        asyncio.run(router.choose_replicas(replicas, pending))
    (s1, n1) = total()
    assert n1 - n0 == 2 and 0.5 <= s1 - s0 < 1.0
    assert choices() - c0 == 2  # (and each choice's own time)
    a = replicas[0].replica_id
    router.on_send_request(a)
    router.on_send_request(a)
    assert router.in_flight["a"] == 2
    router.on_request_completed(a, "refused")
    router.on_request_completed(a, "done")
    assert router.in_flight["a"] == 0


def test_the_request_router_times_serves_queue_length_probes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """tpserve_engine_queue_probe_seconds: each probe Serve makes of the chosen replicas'
    queue lengths (its cache counted them full) is timed with the answer it gave; a call
    with no replica to probe is not counted."""
    import asyncio

    from ray.serve._private.request_router.request_router import RequestRouter

    from router import metrics

    async def probe(self: object, replicas: list, backoff_index: int) -> list:
        await asyncio.sleep(0.05)
        return [(r, 3) for r in replicas]

    monkeypatch.setattr(RequestRouter, "_probe_queue_lens", probe)

    def total() -> tuple[float, float]:
        values = {s.name: s.value for m in metrics.QUEUE_PROBE.collect() for s in m.samples}
        return (values["tpserve_engine_queue_probe_seconds_sum"],
                values["tpserve_engine_queue_probe_seconds_count"])

    router = _router("pinned")
    replica = _FakeReplica("a")
    (s0, n0) = total()
    assert asyncio.run(router._probe_queue_lens([replica], 0)) == [(replica, 3)]
    assert asyncio.run(router._probe_queue_lens([], 0)) == []
    (s1, n1) = total()
    assert n1 - n0 == 1 and 0.05 <= s1 - s0 < 1.0


def test_a_known_pin_routes_without_waiting_for_redis_and_is_refreshed() -> None:
    import asyncio

    async def run() -> None:
        store = _FakeStore()
        router = _pinned_with(store)
        replicas = [_FakeReplica(r) for r in ("a", "b", "c")]
        first = (await router.choose_replicas(replicas, _pending("s")))[0][0]
        assert store.calls == 1 and store.pins["s"] == first.replica_id.unique_id
        # Redis is now slow (gate closed): the next requests must not wait for it
        for _ in range(3):
            again = await asyncio.wait_for(router.choose_replicas(replicas, _pending("s")), 1)
            assert again[0][0] is first
        assert store.calls == 2  # one background refresh in flight, not one per request
        store.gate.set()
        await asyncio.sleep(0.01)
        assert not router.refreshing
        # another router moved the pin (it saw `first` die): the refresh brings it here
        other = next(r for r in replicas if r is not first)
        store.pins["s"] = other.replica_id.unique_id
        await router.choose_replicas(replicas, _pending("s"))  # still the cached one...
        await asyncio.sleep(0.01)
        moved = await router.choose_replicas(replicas, _pending("s"))
        assert moved[0][0] is other  # ...and the next request follows the move

    asyncio.run(run())


def test_a_cached_pin_is_claimed_again_at_most_once_per_refresh_period() -> None:
    import asyncio

    async def run() -> None:
        store = _FakeStore()
        store.gate.set()
        router = _pinned_with(store, refresh_s=0.2)
        replicas = [_FakeReplica(r) for r in ("a", "b", "c")]
        for _ in range(20):
            await router.choose_replicas(replicas, _pending("s"))
            await asyncio.sleep(0)
        assert store.calls == 1  # the first claim; no refresh within 0.2 s
        await asyncio.sleep(0.25)
        for _ in range(20):
            await router.choose_replicas(replicas, _pending("s"))
            await asyncio.sleep(0)
        assert store.calls == 2  # one refresh once the period is over

    asyncio.run(run())


def test_a_cached_pin_to_a_gone_replica_waits_for_a_new_claim() -> None:
    import asyncio

    async def run() -> None:
        store = _FakeStore()
        store.gate.set()
        router = _pinned_with(store)
        replicas = [_FakeReplica(r) for r in ("a", "b", "c")]
        first = (await router.choose_replicas(replicas, _pending("s")))[0][0]
        left = [r for r in replicas if r is not first]
        again = (await router.choose_replicas(left, _pending("s")))[0][0]
        assert again in left and store.pins["s"] == again.replica_id.unique_id
        assert store.calls == 2

    asyncio.run(run())


def test_pins_are_not_cached_while_redis_is_away() -> None:
    import asyncio

    async def run() -> None:
        store = _FakeStore()
        store.gate.set()
        store.degraded = True
        router = _pinned_with(store)
        replicas = [_FakeReplica(r) for r in ("a", "b")]
        for _ in range(3):
            await router.choose_replicas(replicas, _pending("s"))
        assert store.calls == 3 and not router.pins  # every request asks (the hash rules)

    asyncio.run(run())


def test_the_readme_lists_every_request_field_as_the_router_treats_it() -> None:
    from pathlib import Path

    from router.schema import REFUSED, ChatBody, CompletionBody, field_status, table

    assert table() in (Path(__file__).parents[1] / "README.md").read_text()
    for route in ("chat", "completions"):
        rows = field_status(route)
        assert all(status != "honoured" or how != "?" for _, status, how in rows), rows
        assert {name for name, status, _ in rows if status == "refused"} <= set(REFUSED)
        model = ChatBody if route == "chat" else CompletionBody
        taken = {name for name, status, _ in rows if status != "refused"}
        assert taken <= set(model.model_fields), taken - set(model.model_fields)


def test_router_cpu_measures_the_streamed_path(tmp_path: object, capsys: pytest.CaptureFixture
                                               ) -> None:
    import json
    from pathlib import Path

    from infra import router_cpu

    out = Path(str(tmp_path)) / "cpu.jsonl"
    assert router_cpu.main(["--tokens", "8", "--requests", "4", "--rounds", "1",
                            "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["tokens_per_request"] == 8 and 0 < row["cpu_us_per_token"] < 10_000
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=12), reason=st.sampled_from([None, "stop", "length"]),
       route=st.sampled_from(["chat", "completions"]), index=st.integers(0, 20))
def test_a_plain_token_event_is_the_chunks_json_byte_for_byte(
        text: str, reason: str | None, route: str, index: int) -> None:
    import json
    from unittest import mock

    from router.app import _event
    from router.responses import Choice, chunk, plain_event

    choice = Choice(index, wire.Request({}, prompt="x"))
    delta = wire.Delta([7], text, reason, "r")
    with mock.patch("time.time", return_value=1_700_000_000.5):
        fast = plain_event(route, "cmpl-1", 'tp"serve', choice, delta)
        slow = _event(chunk(route, "cmpl-1", 'tp"serve', choice, delta, False, False))
    assert fast == slow and json.loads(fast[6:])["choices"][0]["index"] == index


def test_loop_lag_records_how_long_the_loop_was_kept_from_its_timers() -> None:
    """A loop kept busy for 150 ms (a blocking call on it) shows a lag of about that;
    idle, its samples stay well under it; started twice, it samples once."""
    import asyncio
    import time

    from router.looplag import LoopLag

    lags: list[float] = []

    async def main() -> int:
        lag = LoopLag(lags.append, period_s=0.005)
        lag.ensure_started()
        lag.ensure_started()
        await asyncio.sleep(0.1)
        idle = len(lags)
        time.sleep(0.15)  # noqa: ASYNC251 - the point: the loop can run nothing meanwhile
        await asyncio.sleep(0.05)
        lag.stop()
        await asyncio.sleep(0)
        return idle

    idle = asyncio.run(main())
    assert 3 <= idle <= 21  # one sampler, a sample per 5 ms at most
    assert max(lags) >= 0.14
    assert sorted(lags[:idle])[idle // 2] < 0.05


def test_routing_tasks_are_serves_cap_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """TPSERVE_ROUTING_TASKS: a count of requests routed at once, 0 for Serve's own rule
    (two a replica), unset for Serve's cap; anything else refused by name."""
    def tasks(value: str | None) -> int:
        if value is None:
            monkeypatch.delenv("TPSERVE_ROUTING_TASKS", raising=False)
        else:
            monkeypatch.setenv("TPSERVE_ROUTING_TASKS", value)
        router = _router("pinned")  # (read as the router starts)
        router._replicas = {"a": _FakeReplica("a")}  # (Serve's: one replica)
        return router.max_num_routing_tasks

    assert [tasks(None), tasks("0"), tasks("7")] == [50, 2, 7]
    with pytest.raises(ValueError, match="TPSERVE_ROUTING_TASKS=many"):
        tasks("many")
