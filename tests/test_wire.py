"""The router <-> engine message (router/wire.py): every kind survives a JSON round trip,
and a malformed one is a WireError, never a wrong value."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import wire

texts = st.text(max_size=30)
ids = st.lists(st.integers(0, 2**31 - 1), max_size=8)
requests = st.builds(
    wire.Request,
    params=st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(1, 4096), "temperature": st.floats(0, 2),
        "stop": st.lists(texts, max_size=4), "seed": st.none() | st.integers(0, 2**63 - 1),
        "ignore_eos": st.booleans()}),
    prompt=st.one_of(texts, ids), messages=st.none(),
    request_id=st.none() | texts, echo=st.booleans(),
    tools=st.none() | st.fixed_dictionaries({
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": (
            st.fixed_dictionaries({"name": texts}))}), max_size=2),
        "choice": st.sampled_from(["auto", "required"]), "parallel": st.booleans()}),
) | st.builds(
    wire.Request, params=st.just({}), prompt=st.none(),
    messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                             "content": texts}), min_size=1, max_size=3))
logprob = st.floats(-1e4, 0)
token_logprobs = st.lists(st.builds(
    wire.TokenLogprob, token=texts, logprob=st.none() | logprob,
    top=st.lists(st.tuples(texts, logprob), max_size=3)), max_size=4)
deltas = st.builds(wire.Delta, token_ids=ids, text=texts,
                   finish_reason=st.sampled_from([None, "stop", "length", "abort"]),
                   replica=texts, prompt_tokens=st.none() | st.integers(0, 10**6),
                   logprobs=st.none() | token_logprobs, prompt_text=st.none() | texts,
                   prompt_logprobs=st.none() | token_logprobs,
                   tool_calls=st.none() | st.lists(st.builds(wire.ToolCall, texts, texts, texts),
                                                   max_size=2))
errors = st.builds(wire.ErrorEvent, status=st.integers(400, 599), type=texts, message=texts,
                   replica=texts)


def through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


@given(requests)
def test_a_request_round_trips(request: wire.Request) -> None:
    assert wire.Request.from_dict(through_json(request.to_dict())) == request


@given(st.one_of(deltas, errors))
def test_a_stream_item_round_trips(item: wire.Item) -> None:
    assert wire.decode(through_json(wire.encode(item))) == item


def test_an_error_event_is_retryable_only_when_the_replica_failed() -> None:
    assert wire.ErrorEvent(503, "replica_unavailable", "gone").retryable
    assert not wire.ErrorEvent(400, "invalid_request_error", "empty prompt").retryable


def test_the_dict_shapes_the_engine_handle_speaks() -> None:
    # what a caller of the engine deployment's handle sends and reads (tests/test_cluster.py)
    assert wire.Request.from_dict({"prompt": [5, 6], "params": {"max_tokens": 3}}) == \
        wire.Request({"max_tokens": 3}, [5, 6])
    assert wire.Delta(
        [5], "a", None, "r", 2).to_dict() == {"token_ids": [5], "text": "a",
                                              "finish_reason": None, "replica": "r",
                                              "prompt_tokens": 2}
    assert wire.ErrorEvent(400, "invalid_request_error", "no", "r").to_dict() == {
        "error": {"status": 400, "type": "invalid_request_error", "message": "no"},
        "replica": "r"}


@pytest.mark.parametrize("data", [
    None, [], {"params": {}}, {"prompt": "x", "messages": [{"role": "user"}]},
    {"prompt": [1, "2"]}, {"prompt": [True]}, {"prompt": 5}, {"prompt": "x", "params": []},
    {"messages": ["hi"]}, {"prompt": "x", "request_id": 7},
    {"messages": [{"role": "user"}], "tools": {"choice": "auto"}},
])
def test_a_malformed_request_is_a_wire_error(data: object) -> None:
    with pytest.raises(wire.WireError):
        wire.Request.from_dict(data)


@pytest.mark.parametrize("data", [
    None, {}, {"token_ids": [1], "text": "a", "finish_reason": None},
    {"token_ids": "1", "text": "a", "finish_reason": None, "replica": "r"},
    {"token_ids": [1], "text": "a", "finish_reason": None, "replica": "r",
     "prompt_tokens": True},
    {"error": "boom"}, {"error": {"status": 200, "type": "x", "message": "y"}},
    {"error": {"status": "503", "type": "x", "message": "y"}},
    {"token_ids": [1], "text": "a", "finish_reason": None, "replica": "r",
     "logprobs": [["a", -1.0]]},
    {"token_ids": [1], "text": "a", "finish_reason": None, "replica": "r",
     "logprobs": [["a", "-1", []]]},
    {"token_ids": [1], "text": "a", "finish_reason": None, "replica": "r",
     "prompt_logprobs": [["a", None, [["b"]]]]},
    {"token_ids": [1], "text": "a", "finish_reason": None, "replica": "r",
     "tool_calls": [["id", "f"]]},
])
def test_a_malformed_item_is_a_wire_error(data: object) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(data)
