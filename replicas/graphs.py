"""CUDA graphs of the decode step: when every scheduled sequence adds one token, the
step's shapes depend only on the batch size, so the whole forward pass (embedding, every
layer's kernels and all-reduces, the LM head) is captured once per batch bucket and
replayed with its inputs copied into static buffers: one launch instead of thousands.

Static shapes: a batch is padded to the next bucket; padded rows read and write only a
scratch KV block that no sequence owns (the pool has one block more than the scheduler
sees); every block table is padded to the width of max_model_len.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from replicas import kernels
from replicas.model import ForwardBatch, attention_mask, feed_tokens
from replicas.step_inputs import split_step, step_size, write_step

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch`."""

    def __init__(self, run: Callable[[ForwardBatch], torch.Tensor], windows: set[int | None],
                 max_batch: int, width: int, block_size: int, scratch_block: int,
                 kv_heads: int, device: torch.device) -> None:
        self.buckets = [b for b in BUCKETS if b < max_batch] + [
            next(b for b in BUCKETS if b >= max_batch)]
        self.width, self.block_size, self.scratch = width, block_size, scratch_block
        n = self.buckets[-1]
        # all inputs of a step in one buffer (step_inputs.py's layout, n tokens and rows),
        # so a step is one host-to-device copy; two of them, taken in turn: a step may be
        # prepared while the copy of the one before is queued
        self.staging = [torch.zeros(step_size(n, n, width), dtype=torch.int64).pin_memory()
                        for _ in range(2)]
        self.turn = 0
        self.inputs = torch.zeros_like(self.staging[0], device=device)
        # views of self.inputs: their addresses are the ones the graphs read
        self.ids, self.positions, self.slots, self.tables = split_step(self.inputs, n, n,
                                                                       width)
        self.tables.fill_(scratch_block)
        self.rows = torch.arange(n, device=device)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.fast, self.kv_heads = kernels.enabled(device), kv_heads
        self.windows = set() if self.fast else windows
        # per bucket: the graph, its logits and their greedy tokens (argmax, in the graph)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: the others reuse its memory
            self.graphs[b] = self._capture(run, b, pool)

    def _batch(self, b: int) -> ForwardBatch:
        query_pos = self.positions[:b, None]  # [b, 1]
        keys = self.width * self.block_size
        return ForwardBatch(
            input_ids=self.ids[:b], positions=self.positions[:b], slot_mapping=self.slots[:b],
            block_tables=self.tables[:b], token_seq=self.rows[:b],
            token_off=torch.zeros_like(self.rows[:b]), query_pos=query_pos,
            logits_indices=self.rows[:b], every_row=True,
            masks={w: attention_mask(query_pos, keys, w) for w in self.windows},
            cu_q=self.cu_q[: b + 1] if self.fast else None, max_q=1,
            splits=kernels.decode_splits(b, self.kv_heads, keys))

    def _capture(self, run: Callable[[ForwardBatch], torch.Tensor], b: int, pool: object
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        def step() -> tuple[torch.Tensor, torch.Tensor]:
            logits = run(self._batch(b))
            return logits, (kernels.argmax_rows(logits) if self.fast else logits.argmax(-1))

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the graph
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits, greedy = step()
        return graph, logits, greedy

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def replay(self, ids: list[int], positions: list[int], tables: list[tuple[int, ...]],
               feed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [len(ids), vocab] of one decode step and their argmax [len(ids)]; an id
        -(j + 1) is feed[j] (see Worker.execute)."""
        n, size, cap = len(ids), self.block_size, self.buckets[-1]
        b = next(x for x in self.buckets if x >= n)
        staging = self.staging[self.turn]
        self.turn ^= 1
        host = split_step(staging.numpy(), cap, cap, self.width)
        host.ids[n:b] = 0  # padded rows: token 0 at position 0, writing the scratch block
        host.positions[n:b] = 0
        host.tables[n:b] = self.scratch
        host.slots[n:b] = self.scratch * size + np.arange(b - n) % size
        write_step(host, ids, positions, tables, size, pad_block=self.scratch)
        self.inputs.copy_(staging, non_blocking=True)  # one copy, ordered before replay
        if feed is not None:
            feed_tokens(self.ids[:n], feed)
        graph, logits, greedy = self.graphs[b]
        graph.replay()
        return logits[:n], greedy[:n]
