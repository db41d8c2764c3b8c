"""Pure pieces of the router: the rate limiter, config validation, request models."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
from pydantic import ValidationError  # noqa: E402

from router.app import ChatBody, CompletionBody, RateLimiter, RouterConfig  # noqa: E402


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
    with pytest.raises(ValueError):
        RouterConfig(trusted_proxies=("not-a-network",))


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": []}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": "3"}, {"prompt": "x", "temperature": float("inf")},
    {"prompt": "x", "n": 2}, {"prompt": "x", "top_p": 0}, {"prompt": "x", "stop": ["a"] * 5},
    {"prompt": "x", "stream": "yes"},
])
def test_completion_bodies_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionBody.model_validate(body)


def test_chat_body_and_session_options() -> None:
    body = ChatBody.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                    "session": {"append": True}, "stop": "END"})
    assert body.session is not None and body.session.append
    assert body.params()["stop"] == ["END"]
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


def _router(routing: str) -> object:
    from router.pinning import PinnedRouter

    router = object.__new__(PinnedRouter)  # no Serve machinery: only the routing state
    router.initialize_state(redis_url=None, routing=routing)
    return router


def test_random_routing_spreads_one_session_over_replicas() -> None:
    import asyncio

    metadata = type("Metadata", (), {"session_id": "s-1"})()
    pending = type("Pending", (), {"metadata": metadata})()
    replicas = [_FakeReplica(r) for r in ("a", "b", "c")]

    async def picks(routing: str) -> set[str]:
        router = _router(routing)
        chosen = [await router.choose_replicas(replicas, pending) for _ in range(60)]
        return {c[0][0].replica_id.unique_id for c in chosen}

    assert len(asyncio.run(picks("random"))) == 3
    assert len(asyncio.run(picks("pinned"))) == 1  # Redis off: the hash alone pins it
    with pytest.raises(ValueError, match="routing"):
        _router("sticky")
