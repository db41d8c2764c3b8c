"""step_inputs: the one writer of a step's int64 inputs (eager path and decode graphs)."""

from __future__ import annotations

import numpy as np
import torch

from replicas.step_inputs import split_step, step_size, write_step


def test_views_share_one_buffer_in_the_documented_order() -> None:
    flat = torch.arange(step_size(3, 2, 4))
    step = split_step(flat, 3, 2, 4)
    # (3 tokens: each section padded to 4, so every view starts 16-byte aligned)
    assert [v.data_ptr() for v in step] == [flat.data_ptr() + 8 * k for k in (0, 4, 8, 12)]
    assert [len(v) for v in step[:3]] == [3, 3, 3]
    assert step.tables.shape == (2, 4) and step.tables.is_contiguous()
    assert step_size(3, 2, 4) == 12 + 8 and step_size(4, 2, 4) == 12 + 8


def test_a_chunked_step_gets_each_tokens_slot_from_its_own_sequence() -> None:
    # two sequences: 3 tokens of the first (positions 4..6, blocks 7 and 9 of size 4),
    # 1 token of the second (position 1, block 5)
    flat = np.full(step_size(4, 2, 3), -1, dtype=np.int64)
    host = split_step(flat, 4, 2, 3)
    token_seq = write_step(host, [10, 11, 12, 13], [4, 5, 6, 1], [(7, 9), (5,)], 4,
                           pad_block=0, query_lens=[3, 1])
    assert token_seq.tolist() == [0, 0, 0, 1]
    assert host.tables.tolist() == [[7, 9, 0], [5, 0, 0]]
    assert host.slots.tolist() == [9 * 4 + 0, 9 * 4 + 1, 9 * 4 + 2, 5 * 4 + 1]
    assert host.ids.tolist() == [10, 11, 12, 13] and host.positions.tolist() == [4, 5, 6, 1]


def test_a_decode_step_fills_only_its_rows_of_a_larger_buffer() -> None:
    flat = np.full(step_size(4, 4, 2), -1, dtype=np.int64)
    host = split_step(flat, 4, 4, 2)
    write_step(host, [3, 8], [0, 5], [(2,), (6, 1)], 4, pad_block=99)
    assert host.tables[:2].tolist() == [[2, 99], [6, 1]]
    assert host.slots[:2].tolist() == [2 * 4, 1 * 4 + 1]
    assert (host.ids[2:] == -1).all() and (host.tables[2:] == -1).all()  # the caller's
