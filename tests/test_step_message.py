"""The rank-to-rank step message: `StepBatch.encode` / `decode` round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.worker import (
    PING,
    PING_BATCH,
    REPLAY,
    SHUTDOWN,
    SHUTDOWN_BATCH,
    STEP,
    StepBatch,
    replay_batch,
)


def round_trip(batch: StepBatch) -> StepBatch:
    flat = batch.encode()
    assert flat.dtype == torch.int64 and flat.dim() == 1
    # what the receiver gets: a fresh tensor of the broadcast size
    received = torch.empty(flat.numel(), dtype=torch.int64)
    received.copy_(flat)
    return StepBatch.decode(received)


CASES = {
    "prefill and decode": StepBatch(
        input_ids=(5, 6, 7, 8, 9), positions=(0, 1, 2, 3, 17), query_lens=(4, 1),
        block_tables=((3,), (0, 1, 2)), logits_indices=(3, 4),
    ),
    "ragged tables": StepBatch(
        input_ids=(1, 2, 3), positions=(40, 9, 0), query_lens=(1, 1, 1),
        block_tables=((7, 8, 9, 10, 11), (4,), (0, 12)), logits_indices=(0, 1, 2),
    ),
    "empty tables": StepBatch(
        input_ids=(1, 2), positions=(0, 1), query_lens=(1, 1), block_tables=((), ()),
        logits_indices=(),
    ),
    "one empty table among full ones": StepBatch(
        input_ids=(1, 2, 3), positions=(0, 0, 5), query_lens=(1, 1, 1),
        block_tables=((2, 3), (), (0,)), logits_indices=(2,),
    ),
    "block 0 everywhere": StepBatch(
        input_ids=(0,), positions=(0,), query_lens=(1,), block_tables=((0, 0, 0),),
        logits_indices=(0,),
    ),
    "large values": StepBatch(
        input_ids=(2**40, 151_935), positions=(2**20, 2**20 + 1), query_lens=(2,),
        block_tables=((2**31 + 5, 2**33),), logits_indices=(1,),
    ),
    "scoring: logits at every token": StepBatch(
        input_ids=tuple(range(10, 20)), positions=tuple(range(10)), query_lens=(10,),
        block_tables=((0, 1, 2),), logits_indices=tuple(range(10)),
    ),
    "shutdown": SHUTDOWN_BATCH,
    "heartbeat": PING_BATCH,
    "replay the batch-1 graph": replay_batch(51),
    "placeholders of tokens still on the device": StepBatch(
        input_ids=(-1, -2, 9), positions=(30, 12, 0), query_lens=(1, 1, 1),
        block_tables=((1, 2), (3,), (4,)), logits_indices=(0, 1, 2),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name: str) -> None:
    batch = CASES[name]
    assert round_trip(batch) == batch


def test_decoded_fields_are_tuples_of_ints() -> None:
    out = round_trip(CASES["ragged tables"])
    for value in (out.input_ids, out.positions, out.query_lens, out.logits_indices,
                  *out.block_tables):
        assert type(value) is tuple and all(type(x) is int for x in value)
    assert type(out.block_tables) is tuple


def test_shutdown_is_a_command_not_a_step() -> None:
    out = round_trip(SHUTDOWN_BATCH)
    assert out.command == SHUTDOWN != STEP
    assert out.input_ids == () and out.block_tables == ()
    assert CASES["prefill and decode"].command == STEP


def test_heartbeat_and_replay_are_commands_with_their_count() -> None:
    assert round_trip(PING_BATCH).command == PING
    replay = round_trip(replay_batch(7))
    assert replay.command == REPLAY and replay.logits_indices == (7,)
    assert len({STEP, SHUTDOWN, PING, REPLAY}) == 4


def test_layout_of_the_header() -> None:
    flat = CASES["ragged tables"].encode().tolist()
    # [command, T, B, max_blocks, N]
    assert flat[:5] == [STEP, 3, 3, 5, 3]
    assert len(flat) == 5 + 3 + 3 + 3 + 3 * 5 + 3


def test_the_receiver_needs_only_the_message() -> None:
    """Decoding must not depend on anything but the tensor (no shared state)."""
    flat = CASES["prefill and decode"].encode()
    again = StepBatch.decode(flat.clone())
    assert again == StepBatch.decode(flat) == CASES["prefill and decode"]


ids = st.integers(min_value=0, max_value=2**62)


@st.composite
def step_batches(draw: st.DrawFn) -> StepBatch:
    num_seqs = draw(st.integers(0, 6))
    query_lens = draw(st.lists(st.integers(1, 9), min_size=num_seqs, max_size=num_seqs))
    total = sum(query_lens)
    input_ids = draw(st.lists(ids, min_size=total, max_size=total))
    positions = draw(st.lists(st.integers(0, 2**20), min_size=total, max_size=total))
    tables = draw(st.lists(st.lists(ids, max_size=7).map(tuple), min_size=num_seqs,
                           max_size=num_seqs))
    logits = draw(st.lists(st.integers(0, max(total - 1, 0)), max_size=total))
    command = draw(st.sampled_from([STEP, SHUTDOWN, PING, REPLAY]))
    return StepBatch(tuple(input_ids), tuple(positions), tuple(query_lens), tuple(tables),
                     tuple(logits), command)


@settings(max_examples=300, deadline=None, database=None)
@given(step_batches())
def test_round_trip_property(batch: StepBatch) -> None:
    assert round_trip(batch) == batch
