"""The int64 inputs of one step, built on the host in one place for both ways a step runs.

Layout: one flat int64 buffer, the same on the host and on the device, so that a step's
inputs reach the device in one copy:

    [ids (tokens) | positions (tokens) | slots (tokens) | block tables (rows x width)]

each per-token section padded to an even length, so that every view starts 16-byte
aligned (Triton keys a kernel on its pointers' alignment: views at odd offsets would
compile a second variant of each kernel that reads them, in the middle of serving).

- The eager path (`Worker.forward_batch`) makes a new buffer of the step's own sizes
  each step (tokens = T, rows = B, width = the longest block table; tables padded with
  block 0) and copies it to the device.
- The decode graphs (`DecodeGraphs.replay`) write into one of their two pinned staging
  buffers, sized for the largest bucket (tokens = rows = that bucket, width = the blocks
  of max_model_len; tables padded with the scratch block), and copy it in place into the
  static device buffer that their captured graphs read.

`write_step` fills the first T tokens and B rows; what lies past them (the graphs' padded
rows) is the caller's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class StepInputs(NamedTuple, Generic[Array]):
    """Views of one flat step buffer (numpy on the host, a tensor on either side)."""

    ids: Array  # [tokens] token ids
    positions: Array  # [tokens] absolute position of each token
    slots: Array  # [tokens] flat KV slot each token writes
    tables: Array  # [rows, width] KV blocks of each sequence, padded


def _section(tokens: int) -> int:
    """Elements of a per-token section: `tokens`, rounded up to even (16 bytes)."""
    return tokens + tokens % 2


def step_size(tokens: int, rows: int, width: int) -> int:
    """Elements of a flat step buffer."""
    return 3 * _section(tokens) + rows * width


def split_step(flat: Array, tokens: int, rows: int, width: int) -> StepInputs[Array]:
    """`flat` (step_size(tokens, rows, width) elements) as its four views; no copy."""
    section = _section(tokens)
    ids, positions, slots = flat[: 3 * section].reshape(3, section)[:, :tokens]
    tables = flat[3 * section : step_size(tokens, rows, width)].reshape(rows, width)
    return StepInputs(ids, positions, slots, tables)


def pad_tables(tables: Sequence[Sequence[int]], width: int, pad: int) -> np.ndarray:
    """[len(tables), width] int64: each table, then `pad` to the width. In a few array
    operations (a row at a time costs ~2 us a sequence in Python: 0.5 ms of a 256-row
    decode step)."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    out = np.full((len(tables), width), pad, dtype=np.int64)
    # row-major boolean assignment takes the values in the tables' concatenated order
    out[np.arange(width) < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    return out


def write_step(host: StepInputs[np.ndarray], ids: Sequence[int], positions: Sequence[int],
               block_tables: Sequence[Sequence[int]], block_size: int, pad_block: int,
               query_lens: Sequence[int] | None = None) -> np.ndarray:
    """Write a step's T tokens and B sequences into the first T tokens and B rows of
    `host`: ids and positions as given, each block table padded with `pad_block` to the
    buffer's width, and each token's KV slot (its sequence's block at position //
    block_size, offset position % block_size). `query_lens`: the tokens of each sequence,
    in order; None for one each (a decode step). Returns the sequence of each token [T]."""
    t, b = len(ids), len(block_tables)
    host.ids[:t] = ids
    host.positions[:t] = positions
    host.tables[:b] = pad_tables(block_tables, host.tables.shape[1], pad_block)
    rows = np.arange(b)
    token_seq = rows if query_lens is None else np.repeat(rows, query_lens)  # [T]
    pos = host.positions[:t]
    host.slots[:t] = host.tables[token_seq, pos // block_size] * block_size + pos % block_size
    return token_seq
