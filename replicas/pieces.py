"""Steps that are not plain decode (they admit prompts or prefill chunks) replayed from
CUDA graphs in pieces: everything but attention is captured per token-count bucket, and
attention, whose work depends on each sequence's length and cached prefix, runs eagerly
between the pieces.

Why: such a step of GLM-4-9B shapes launches ~380 kernels one by one; nine 40-token
prompts (360 tokens) take 11 ms of GPU time and 19-38 ms of host time to launch
(replicas/PERF.md v0.42). In pieces it is one graph launch and one attention launch a
layer.

A step of T tokens runs in the smallest bucket of Tb >= T tokens. Piece 0 is the
embedding, the rotary tables and layer 0 up to attention (norm, qkv_proj, rotary, the
cache write); piece i (1 <= i < L) is layer i - 1 after attention (o_proj and its
all-reduce, the MLP and its all-reduce) and layer i up to attention; piece L is the last
layer after attention. Between pieces i and i + 1, layer i's attention reads the first T
rows of piece i's q (and k, v for whole fresh prompts) and writes a static buffer that
piece i + 1 reads. The logits of the rows that want them come after piece L, eagerly.

Padded rows (T..Tb) carry whatever ids, positions and attention outputs the buffers
held (0 at first, then an earlier step's real rows: valid and finite), write their keys
into the scratch block that no sequence owns, and are read by nothing. Each row of every
captured operation depends on its own row only, so the real rows are those of an eager
step. (With float16 all-reduces a padded row can overflow as a real one can: the step is
then re-run eagerly in float32, slower, never wrong.)

Memory: a bucket keeps every piece's q/k/v (the attention between pieces reads them), and
one residual stream at a time (a piece's residual is freed for the next pieces' use once
the piece after it has been captured): for GLM-4-9B at tp=1 ~370 KB a token of a bucket,
~580 MB for the buckets up to 512 (`memory_bytes` says what the captures took).

On a CPU (or with `capture` False) the same pieces run as plain calls: what the tests
compare against the eager forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from replicas import kernels
from replicas.config import MAX_PIECE_TOKENS
from replicas.kernels import RunSum, Site
from replicas.model import CausalLM, ForwardBatch

# cuBLAS tiles a matmul's rows by 64-128 anyway, so buckets 64-128 apart above 128 cost
# little padded work (360 tokens run as 384), where powers of two would cost up to 2x
BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, MAX_PIECE_TOKENS)

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class StepPieces:
    """Pieces of steps of up to `max_tokens` tokens for `model` over the KV pool `kv`."""

    def __init__(self, model: CausalLM, kv: Sequence[tuple[torch.Tensor, ...]],
                 max_tokens: int, scratch_slot: int, device: torch.device,
                 capture: bool) -> None:
        self.model, self.kv = model, list(kv)
        self.layers = list(model.model.layers)
        self.buckets = [b for b in BUCKETS if b < max_tokens] + [
            next((b for b in BUCKETS if b >= max_tokens), BUCKETS[-1])]
        n = self.buckets[-1]
        attn = self.layers[0].self_attn
        dtype = model.model.embed_tokens.weight.dtype  # (16-bit in every mode, fp8.py)
        # the pieces' inputs: their addresses are the ones the graphs read
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.scratch_slot = scratch_slot
        self.attn = torch.zeros(n, attn.heads, attn.head_dim, dtype=dtype, device=device)
        self.fast = kernels.enabled(device)
        self.steps = 0  # steps run in pieces
        # per bucket: its pieces, each piece's q/k/v, and the last piece's (x, residual)
        self.qkv: dict[int, list[QKV | None]] = {}
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._residual: dict[int, list[torch.Tensor | None]] = {}
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pieces = {tb: self._pieces(tb) for tb in self.buckets}
        self.memory_bytes = 0  # what the captures hold on the device
        if capture:
            before = torch.cuda.memory_allocated(device)
            pool = torch.cuda.graph_pool_handle()
            for tb in reversed(self.buckets):  # largest first: the others reuse its memory
                self.graphs[tb] = self._capture(tb, pool)
            self.memory_bytes = torch.cuda.memory_allocated(device) - before

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.buckets[-1]

    def _pieces(self, tb: int) -> list[Callable[[], None]]:
        model, layers, kv = self.model, self.layers, self.kv
        rotary = model.model.rotary
        self._forget(tb)  # (its q/k/v and residual slots, empty)

        def up_to_attention(i: int, x: torch.Tensor | RunSum, residual: torch.Tensor | None
                            ) -> None:
            layer = layers[i]
            qkv, residual = layer.project(x, residual)
            q, k, v = layer.self_attn.heads_of(qkv)
            q, k = layer.self_attn.place(q, k, v, self.slots[:tb], rotary, self._rope[tb],
                                         kv[i], self.fast)
            self.qkv[tb][i] = (q, k, v)
            self._residual[tb][i] = residual

        def after_attention(i: int) -> tuple[torch.Tensor | RunSum, torch.Tensor]:
            layer = layers[i]
            residual = self._residual[tb][i]
            assert residual is not None, "pieces run in order"
            o = layer.self_attn.o_proj(self.attn[:tb].view(tb, -1))
            x, residual = layer.finish(o, residual)
            # (a step of >= 2 rows sums its all-reduces; a W8A8 down_proj's runs of K may
            # be left to the next layer's norm: PERF.md v0.80)
            assert not isinstance(x, Site), "a step of >= 2 rows sums its all-reduces"
            return x, residual

        def first() -> None:
            model.comm.new_step()
            x, self._rope[tb] = model.embed(self.ids[:tb], self.positions[:tb])
            up_to_attention(0, x, None)

        def middle(i: int) -> Callable[[], None]:
            def piece() -> None:
                up_to_attention(i, *after_attention(i - 1))
            return piece

        def final() -> None:
            x, residual = after_attention(len(layers) - 1)
            self.last[tb] = (x.total() if isinstance(x, RunSum) else x, residual)

        return [first, *(middle(i) for i in range(1, len(layers))), final]

    def _capture(self, tb: int, pool: object) -> list[torch.cuda.CUDAGraph]:
        pieces = self.pieces[tb]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and allocator outside the graphs
                for piece in pieces:
                    piece()
        torch.cuda.current_stream().wait_stream(stream)
        self._forget(tb)
        graphs = []
        for i, piece in enumerate(pieces):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                piece()
            graphs.append(graph)
            if i > 0:  # its residual input is read by this piece's graph only
                self._residual[tb][i - 1] = None
        return graphs

    def _forget(self, tb: int) -> None:
        """Empty the bucket's slots (the capture's warm-up outputs dropped, so that the
        captures allocate their own)."""
        self.qkv[tb] = [None] * len(self.layers)
        self._residual[tb] = [None] * len(self.layers)
        self.last.pop(tb, None)
        self._rope.pop(tb, None)

    def run(self, b: ForwardBatch) -> torch.Tensor:
        """Next-token logits of the step `b` (its tensors as Worker.forward_batch makes
        them), as CausalLM.forward gives them."""
        t = b.input_ids.shape[0]
        tb = next(x for x in self.buckets if x >= t)
        self.steps += 1
        self.ids[:t].copy_(b.input_ids, non_blocking=True)
        self.positions[:t].copy_(b.positions, non_blocking=True)
        self.slots[:t].copy_(b.slot_mapping, non_blocking=True)
        self.slots[t:tb].fill_(self.scratch_slot)
        # each piece's graph, or (not captured) the piece itself
        runs = ([graph.replay for graph in self.graphs[tb]] if tb in self.graphs
                else self.pieces[tb])
        for i, layer in enumerate(self.layers):
            runs[i]()
            qkv = self.qkv[tb][i]
            assert qkv is not None, "piece i leaves layer i's q, k, v"
            q, k, v = (x[:t] for x in qkv)
            layer.self_attn.attend(q, k, v, b, self.kv[i], out=self.attn[:t])
        runs[-1]()
        x, residual = self.last[tb]
        return self.model.head(x, residual, b)

    def reset(self) -> None:
        """Drop the graphs (before the process group goes: they hold its kernels)."""
        for graphs in self.graphs.values():
            for graph in graphs:
                graph.reset()
        self.graphs.clear()
