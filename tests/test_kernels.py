"""The Triton kernels (replicas/kernels/) against the PyTorch reference path.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on a GPU
compiled: the same assertions hold in both places. Attention is checked on ragged
batches (prefill chunks after a cached prefix, decode rows, sliding windows, grouped
heads, split key ranges); the engine test runs whole generations through the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import CheckpointFactory
from rowwise import rows_in_pytorch
from transformers import AutoConfig

from replicas import Engine, EngineConfig, SamplingParams, kernels, worker
from replicas.config import ModelSpec
from replicas.fp8 import quantize_rows
from replicas.kernels import tokens as tokens_module
from replicas.model import ForwardBatch, Rotary, attention_mask
from replicas.model import paged_attention as reference_attention

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.delenv("TPSERVE_KERNELS", raising=False)


def torch_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return w * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=gen).to(DEVICE, dtype)
    res = torch.randn(5, 48, generator=gen).to(DEVICE, dtype) if with_residual else None
    w = torch.randn(48, generator=gen).to(DEVICE, dtype)
    y, s = kernels.rms_norm(x, w, 1e-5, res)
    want_s = x + res if res is not None else x
    tol = 0 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(y, torch_rms(want_s, w, 1e-5), atol=tol * 4, rtol=tol + 1e-6)
    if res is not None:
        assert s is not None and torch.equal(s, want_s)
    else:
        assert s is None


def test_silu_and_mul_matches_reference() -> None:
    gu = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    gate, up = gu.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(kernels.silu_and_mul(gu), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 128256), (3, 5000), (2, 4096), (1, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torch_argmax_ties_included(shape: tuple[int, int],
                                                   dtype: torch.dtype) -> None:
    """The decode graph's greedy tokens: the first index of the largest value, also when
    the maximum repeats across the kernel's slices of the row."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    top = int(x[0].argmax())
    for at in (top + 9, top + kernels.ARGMAX_BLOCK, shape[1] - 1):  # later copies of it
        x[0, min(at, shape[1] - 1)] = x[0, top]
    x = x.to(DEVICE)
    got = kernels.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(-1))
    assert int(got[0]) == top


def test_rescore_top_takes_shorter_runs_for_a_small_vocabulary() -> None:
    assert tokens_module.top_block(151552, 16) == tokens_module.TOP_BLOCK
    assert tokens_module.top_block(75776, 1024) == 128  # 592 runs: 2,368 >= 2,048
    assert tokens_module.top_block(5000, 16) == 512  # 10 runs: 40 candidates
    assert tokens_module.top_block(7, 16) == 64


@pytest.mark.parametrize("shape", [(1, 151552), (2, 5000), (1, 7), (1, 300)])
def test_rescore_top_rewrites_each_rows_top_logits(shape: tuple[int, int]) -> None:
    """An FP8 head's rescoring (PERF.md v0.94): the `count` highest of each run of
    top_block's logits' TOP_PER_PART highest (the row's own top `count` when they are
    spread, as here in the long row) become h . w[index] rounded once to h's dtype (to a
    bfloat16 step: the kernel sums in its own order), every other logit stays; a run
    that holds more of the top keeps its TOP_PER_PART highest, the next ones come in
    instead; padding rows past the logits' end are never candidates."""
    rows, n = shape
    gen = torch.Generator().manual_seed(n)
    h = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(n + 3, 64, generator=gen).to(torch.bfloat16)  # padded as a shard
    rough = torch.randn(rows, n, generator=gen) * 4
    count = 16
    exact = (h.float() @ w.float().T).to(torch.bfloat16).float()[:, :n]
    # spread the top so that no run holds more than TOP_PER_PART of it
    if n > 16 * tokens_module.TOP_BLOCK:
        rough[0, :: tokens_module.TOP_BLOCK] += 100
    x = rough.clone().to(DEVICE)
    kernels.rescore_top(x, h.to(DEVICE), w.to(DEVICE), count)
    for r in range(rows):
        block = tokens_module.top_block(n, count)
        runs = rough[r].split(block)
        pool = torch.cat([run.topk(min(tokens_module.TOP_PER_PART, len(run))).indices
                          + i * block for i, run in enumerate(runs)])
        top = pool[rough[r, pool].topk(min(count, len(pool))).indices]
        if len(runs) > count:  # spread: the row's own top
            assert set(top.tolist()) == set(rough[r].topk(count).indices.tolist())
        want = rough[r].clone()
        want[top] = exact[r, top]
        torch.testing.assert_close(x[r].cpu(), want, rtol=2**-7, atol=1e-5)
    if n < 16 * tokens_module.TOP_BLOCK:
        return
    crowded = rough.clone()  # now the first run holds the row's 8 highest
    crowded[0, :8] += 200
    x = crowded.clone().to(DEVICE)
    kernels.rescore_top(x, h.to(DEVICE), w.to(DEVICE), count)
    order = crowded[0].argsort(descending=True)
    per_part = tokens_module.TOP_PER_PART
    chosen = torch.cat([order[:per_part], order[8:8 + count - per_part]])
    want = crowded[0].clone()
    want[chosen] = exact[0, chosen]
    torch.testing.assert_close(x[0].cpu(), want, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "glm"])  # halves; partial interleaved pairs
@pytest.mark.parametrize("t", [6, 21])  # one program of 8 tokens; two of 16
def test_rope_and_cache_matches_reference(family: str, t: int, checkpoint: CheckpointFactory
                                          ) -> None:
    hf = AutoConfig.from_pretrained(checkpoint(family))
    spec = ModelSpec.from_hf(hf)
    rotary = Rotary(hf, spec, 64).to(DEVICE)
    heads, kv_heads, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = (x.view(t, -1, d) for x in (q, k, v))
    positions = torch.tensor([0, 1, 2, 7, 30, 63, *range(40, 55)][:t], device=DEVICE)
    rope = rotary.tables(positions, q.dtype)
    want_q, want_k, want_v = rotary(q, rope), rotary(k, rope), v.clone()
    caches = [torch.zeros(8, 4, kv_heads, d, device=DEVICE) for _ in range(2)]
    slots = torch.tensor([5, 0, 15, 3, 9, 10, *range(16, 31)][:t], device=DEVICE)
    kernels.rope_and_cache(q, k, v, *rope, slots, *caches, rotary.rotary_dim,
                           rotary.interleaved)
    torch.testing.assert_close(q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, want_k, atol=1e-6, rtol=1e-6)
    flat_k, flat_v = (c.view(-1, kv_heads, d) for c in caches)
    torch.testing.assert_close(flat_k[slots], want_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(flat_v[slots], want_v)


def ragged_batch(query_lens: list[int], contexts: list[int], block_size: int,
                 num_blocks: int, window: int | None) -> ForwardBatch:
    """Each sequence's chunk is the last query_len of its context; blocks drawn at random
    from the pool (no two sequences share one)."""
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-c // block_size) for c in contexts)
    tables = torch.zeros(len(contexts), width, dtype=torch.int64)
    for i, c in enumerate(contexts):
        n = -(-c // block_size)
        tables[i, :n] = torch.tensor(order[:n])
        order = order[n:]
    lens = torch.tensor(query_lens)
    positions = torch.cat([torch.arange(c - q, c)
                           for q, c in zip(query_lens, contexts, strict=True)])
    token_seq = torch.repeat_interleave(torch.arange(len(query_lens)), lens)
    token_off = torch.arange(len(positions)) - (torch.cumsum(lens, 0) - lens)[token_seq]
    query_pos = torch.zeros(len(query_lens), int(lens.max()), dtype=torch.int64)
    query_pos[token_seq, token_off] = positions
    cu_q = torch.cumsum(torch.cat((torch.zeros(1, dtype=torch.int64), lens)), 0)
    return ForwardBatch(
        input_ids=torch.zeros(len(positions), dtype=torch.int64, device=DEVICE),
        positions=positions.to(DEVICE), slot_mapping=positions.to(DEVICE),
        block_tables=tables.to(DEVICE), token_seq=token_seq.to(DEVICE),
        token_off=token_off.to(DEVICE), query_pos=query_pos.to(DEVICE),
        logits_indices=positions.to(DEVICE),
        masks={window: attention_mask(query_pos.to(DEVICE), width * block_size, window)},
        cu_q=cu_q.to(torch.int32).to(DEVICE), max_q=int(lens.max()))


CASES = {  # name: (query lens, contexts, window, heads, kv heads, head dim, splits)
    "prefill": ([20, 7], [20, 7], None, 4, 2, 16, 1),
    "chunk after a cached prefix": ([9, 3, 1], [40, 19, 33], None, 4, 2, 16, 1),
    "chunk after a long prefix": ([20, 3], [230, 100], None, 4, 2, 16, 1),
    "sliding window": ([12, 1], [45, 30], 8, 4, 2, 16, 1),
    "decode, grouped heads": ([1, 1, 1], [1, 17, 64], None, 8, 2, 32, 1),
    # a split takes >= 256 keys: 3, 1 and 2 of the 4 splits have keys
    "decode, split keys": ([1, 1, 1], [700, 5, 300], None, 4, 1, 16, 4),
    "decode, split keys, window": ([1, 1], [70, 600], 300, 4, 2, 16, 8),
    # tl.dot needs K >= 16: a head dim of 8 runs padded to 16 (it crashed before)
    "prefill, head dim 8": ([20, 7], [20, 7], None, 4, 2, 8, 1),
    "decode, head dim 8": ([1, 1, 1], [1, 17, 64], None, 4, 2, 8, 1),
}


@pytest.mark.parametrize("cache", ["dtype", "fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(case: str, dtype: torch.dtype, cache: str) -> None:
    """The kernel against the PyTorch path; with kv_cache_dtype="fp8" both widen the
    cache's entries as they read them (model.read_cache), with "int8" times each row's
    scale."""
    query_lens, contexts, window, heads, kv_heads, d, splits = CASES[case]
    block_size, num_blocks = 4, 512
    b = ragged_batch(query_lens, contexts, block_size, num_blocks, window)
    b.splits = splits
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, d, generator=gen)
                        .to(DEVICE, dtype) for _ in range(2))
    scales: tuple[torch.Tensor, ...] = ()
    if cache == "fp8":
        k_cache, v_cache = ((c * 3).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    elif cache == "int8":
        k_cache, v_cache = ((c * 40).clamp(-127, 127).to(torch.int8) for c in (k_cache, v_cache))
        scales = tuple(torch.rand(num_blocks, block_size, kv_heads, generator=gen)
                       .to(DEVICE) / 40 for _ in range(2))
    q = torch.randn(sum(query_lens), heads, d, generator=gen).to(DEVICE, dtype)
    want = reference_attention(q, k_cache, v_cache, b, window, scales)
    assert b.cu_q is not None
    got = kernels.paged_attention(q, k_cache, v_cache, b.block_tables, b.cu_q, b.positions,
                                  window, b.max_q, b.splits, scales=scales)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


DECODE_ROTARY = 8  # decode_inputs' rotated features of each 16-wide head


def new_slots(b: ForwardBatch, block_size: int) -> torch.Tensor:
    """The cache slots of a decode batch's new tokens (their positions' blocks)."""
    blocks = b.block_tables[torch.arange(len(b.positions), device=DEVICE),
                            b.positions // block_size]
    return blocks * block_size + b.positions % block_size


def decode_inputs(contexts: list[int], window: int | None, seed: int
                  ) -> tuple[ForwardBatch, list[torch.Tensor], torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step of one token a sequence over `contexts` (blocks of 4 tokens, 2 KV
    heads of 4 query heads, head dim 16, DECODE_ROTARY of it rotated): (batch, the K and V
    caches, q, k, v, cos, sin, the new tokens' slots), random from `seed`."""
    kv_heads, heads, d = 2, 4, 16
    b = ragged_batch([1] * len(contexts), contexts, 4, 512, window)
    gen = torch.Generator().manual_seed(seed)
    caches = [torch.randn(512, 4, kv_heads, d, generator=gen).to(DEVICE) for _ in range(2)]
    q, k, v = (torch.randn(len(contexts), h, d, generator=gen).to(DEVICE)
               for h in (heads, kv_heads, kv_heads))
    angles = torch.rand(len(contexts), 1, DECODE_ROTARY, generator=gen).to(DEVICE) * 6
    return b, caches, q, k, v, angles.cos(), angles.sin(), new_slots(b, 4)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_rotates_and_caches_the_new_keys(interleaved: bool, splits: int
                                                          ) -> None:
    """Decode attention given the step's unrotated q, k, v (NewKeys) equals rope_and_cache
    then attention, and leaves the same cache (bit for bit in the interpreter). The
    outputs agree to float32's rounding: the fused kernel adds the new token's column
    after the cached keys' tiles, the other kernel within its tile."""
    window = 40 if splits == 1 else None  # (split: 3 of 4 have keys at 300)
    b, caches, q, k, v, cos, sin, slots = decode_inputs([300, 5, 70], window, seed=12)
    assert b.cu_q is not None
    rotary_dim = DECODE_ROTARY
    new = kernels.NewKeys(k, v, cos, sin, slots, rotary_dim, interleaved)
    k_fused, v_fused = (c.clone() for c in caches)
    got = kernels.paged_attention(q.clone(), k_fused, v_fused, b.block_tables, b.cu_q,
                                  b.positions, window, 1, splits, new)
    q2, k2 = q.clone(), k.clone()
    kernels.rope_and_cache(q2, k2, v, cos, sin, slots, caches[0], caches[1], rotary_dim,
                           interleaved)
    want = kernels.paged_attention(q2, caches[0], caches[1], b.block_tables, b.cu_q,
                                   b.positions, window, 1, splits)
    # (compiled, the rotation's multiply-adds may fuse differently in the two kernels)
    exact = 0 if DEVICE == "cpu" else 1e-5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_fused, caches[0], atol=exact, rtol=exact)
    assert torch.equal(v_fused, caches[1])


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_in_other_tiles_is_the_same_attention(splits: int) -> None:
    """The decode kernel in other tiles (`decode_tile`: the attention probe's variants)
    gives the engine's tile's result, and writes the same cache: tiles of 16 and 32 keys
    over contexts of 1 to 300."""
    b, caches, q, k, v, cos, sin, slots = decode_inputs([300, 5, 70, 33], None, seed=13)
    assert b.cu_q is not None
    new = kernels.NewKeys(k, v, cos, sin, slots, DECODE_ROTARY, False)
    runs = {}
    for tile in [kernels.DECODE_TILE, (16, 4), (32, 4), (32, 4, 0, 1)]:
        cache = [c.clone() for c in caches]
        runs[tile] = (kernels.paged_attention(q.clone(), *cache, b.block_tables, b.cu_q,
                                              b.positions, None, 1, splits, new,
                                              decode_tile=tile), cache)
    want, want_cache = runs[kernels.DECODE_TILE]
    for tile, (got, cache) in runs.items():
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6, msg=str(tile))
        assert all(torch.equal(g, w) for g, w in zip(cache, want_cache, strict=True))


@pytest.mark.parametrize("cache", ["int8", "fp8"])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_in_float16_dots_is_the_same_attention(cache: str, splits: int
                                                                ) -> None:
    """`decode_tile`'s f16 (PERF.md v0.70: an 8-bit cache's entries widened exactly to
    float16, both dots in float16, int8 row scales on the scores and probabilities) with
    bf16 queries is within bf16's rounding of the engine's tile with the same queries in
    float32 (whose entries are widened in float32), also for a sequence whose queries
    are past float16's range (scaled in by a power of two, not inf) and int8 rows of
    tiny scales; it writes the same cache as the engine's bf16 tile, and refuses a
    16-bit cache and float32 queries. (The bf16 tile itself is no reference in
    Triton's interpreter: it multiplies bf16 dots' bit patterns, triton-lang/triton
    issue 11584.)"""
    b, caches, q, k, v, cos, sin, slots = decode_inputs([300, 5, 70, 33], None, seed=14)
    assert b.cu_q is not None
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    q[0] *= 4e4  # (|q| up to ~1.5e5: float16 would give inf)
    scales: list[torch.Tensor] = []
    if cache == "int8":
        caches = [(c * 40).clamp(-127, 127).to(torch.int8) for c in caches]
        gen = torch.Generator().manual_seed(15)
        scales = [(torch.rand(512, 4, 2, generator=gen) * 1e-4).to(DEVICE) for _ in range(2)]
    else:
        caches = [(c * 3).to(torch.float8_e4m3fn) for c in caches]

    def run(tile: tuple[int, ...], dtype: torch.dtype = torch.bfloat16
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = [c.clone() for c in caches + scales]
        new = kernels.NewKeys(k.to(dtype), v.to(dtype), cos, sin, slots, DECODE_ROTARY, False)
        out = kernels.paged_attention(q.to(dtype), state[0], state[1], b.block_tables,
                                      b.cu_q, b.positions, None, 1, splits, new, state[2:],
                                      decode_tile=tile)
        return out.float(), state

    exact = run(kernels.DECODE_TILE, torch.float32)[0]  # (the entries widened in float32)
    want_state = run(kernels.DECODE_TILE)[1]
    scale = exact.abs().amax(dim=(1, 2), keepdim=True)  # (each sequence's own)
    for tile in [(*kernels.DECODE_TILE, 1), (16, 4, 1)]:
        got, state = run(tile)
        assert torch.isfinite(got).all(), tile
        # (~0.006-0.014 here: the bf16 run's q and new key rotated and rounded to bf16)
        error = ((got - exact).abs() / scale).amax().item()
        assert error < 2e-2, (tile, error)
        assert all(torch.equal(g.view(torch.uint8) if g.element_size() == 1 else g,
                               w.view(torch.uint8) if w.element_size() == 1 else w)
                   for g, w in zip(state, want_state, strict=True))
    with pytest.raises(ValueError, match="float16 dots"):
        run((16, 4, 1), torch.float32)
    wide = decode_inputs([300, 5, 70, 33], None, seed=14)[1]
    caches, scales = [c.to(torch.bfloat16) for c in wide], []
    with pytest.raises(ValueError, match="float16 dots"):  # a 16-bit cache
        run((16, 4, 1))


def test_fp8_cache_writes_round_and_saturate_as_the_reference() -> None:
    """rope_and_cache and decode attention write an FP8 cache as model.write_cache does:
    each entry rounded to e4m3, and past +-448 saturated (a plain cast would give NaN)."""
    from replicas.model import write_cache

    t, kv_heads, heads, d, rotary_dim = 3, 2, 4, 16, 8
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(DEVICE) * 4 for h in (heads, kv_heads,
                                                                              kv_heads))
    v[0, 0, :3] = torch.tensor([1000.0, -1000.0, 448.5])
    angles = torch.rand(t, 1, rotary_dim, generator=gen).to(DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([5, 0, 9], device=DEVICE)
    caches = [torch.zeros(4, 4, kv_heads, d, device=DEVICE).to(torch.float8_e4m3fn)
              for _ in range(2)]
    k_rot = k.clone()
    kernels.rope_and_cache(q, k_rot, v, cos, sin, slots, *caches, rotary_dim, False)
    want = [torch.zeros_like(c) for c in caches]
    write_cache(want[0], slots, k_rot)
    write_cache(want[1], slots, v)
    for got, ref in zip(caches, want, strict=True):
        same_fp8(got, ref)
    flat_v = caches[1].view(-1, kv_heads, d).float()
    assert flat_v[5, 0, :3].tolist() == [448.0, -448.0, 448.0]
    assert bool(torch.isfinite(flat_v).all())
    # decode writes the new token's key and value the same way
    b = ragged_batch([1, 1, 1], [10, 1, 6], 4, 8, None)
    assert b.cu_q is not None
    slots = new_slots(b, 4)
    fused = [torch.zeros(8, 4, kv_heads, d, device=DEVICE).to(torch.float8_e4m3fn)
             for _ in range(2)]
    k2 = k.clone()
    kernels.paged_attention(q.clone(), *fused, b.block_tables, b.cu_q, b.positions, None, 1,
                            1, kernels.NewKeys(k2, v, cos, sin, slots, rotary_dim, False))
    apart = [torch.zeros_like(c) for c in fused]
    kernels.rope_and_cache(q.clone(), k.clone(), v, cos, sin, slots, *apart, rotary_dim, False)
    for got, ref in zip(fused, apart, strict=True):
        same_fp8(got, ref)


def test_int8_cache_writes_rows_and_scales_as_the_reference() -> None:
    """rope_and_cache and decode attention write an int8 cache as model.write_cache does
    (kv_cache.int8_rows): each (token, head) row over max|row| / 127, rounded half up,
    and its float32 scale beside it; a zero row keeps scale 1. The two kernels write the
    same; int8_rows' extremes land on +-127."""
    from replicas.kv_cache import int8_rows
    from replicas.model import write_cache

    t, kv_heads, heads, d, rotary_dim = 3, 2, 4, 16, 8
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(DEVICE) * 4 for h in (heads, kv_heads,
                                                                              kv_heads))
    v[1, 1] = 0.0
    angles = torch.rand(t, 1, rotary_dim, generator=gen).to(DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([5, 0, 9], device=DEVICE)

    def pool(blocks: int) -> list[torch.Tensor]:  # (K, V, K scales, V scales)
        return [torch.zeros(blocks, 4, kv_heads, d, dtype=torch.int8, device=DEVICE)
                for _ in range(2)] + [torch.zeros(blocks, 4, kv_heads, device=DEVICE)
                                      for _ in range(2)]

    got, want = pool(4), pool(4)
    k_rot = k.clone()
    kernels.rope_and_cache(q, k_rot, v, cos, sin, slots, *got[:2], rotary_dim, False, got[2:])
    write_cache(want[0], slots, k_rot, want[2])
    write_cache(want[1], slots, v, want[3])
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    rows, scale = int8_rows(v)
    assert rows.abs().amax(-1).tolist() == [[127, 127], [127, 0], [127, 127]]
    assert scale[1, 1] == 1.0 and got[3].view(-1, kv_heads)[0, 1] == 1.0
    # decode writes the new token's key and value the same way
    b = ragged_batch([1, 1, 1], [10, 1, 6], 4, 8, None)
    assert b.cu_q is not None
    slots = new_slots(b, 4)
    fused, apart = pool(8), pool(8)
    kernels.paged_attention(q.clone(), *fused[:2], b.block_tables, b.cu_q, b.positions, None,
                            1, 1, kernels.NewKeys(k.clone(), v, cos, sin, slots, rotary_dim,
                                                  False), fused[2:])
    kernels.rope_and_cache(q.clone(), k.clone(), v, cos, sin, slots, *apart[:2], rotary_dim,
                           False, apart[2:])
    for g, w in zip(fused, apart, strict=True):
        if DEVICE == "cpu":
            assert torch.equal(g, w)
        else:  # (the two kernels' rotations may fuse their multiply-adds differently)
            assert (g.float() - w.float()).abs().max() <= (1 if g.dtype == torch.int8
                                                           else 1e-5)


@pytest.mark.parametrize("mode", ["fp8", "int8", "quant", "gemv", "rest"])
def test_kernels_compile_for_hopper(mode: str, tmp_path: Path) -> None:
    """The cache-writing and attention kernels with an 8-bit cache, FP8 weights' one-pass
    kernels (and SwiGLU quantized in one pass), the FP8 GEMV's new tiles and the folded
    all-reduce's GEMVs compile to PTX for an H200 (sm_90) (tests/hopper_ptx.py, in a
    process of its own, with no GPU), and
    those that must round as PyTorch does divide exactly: a kernel that only ever ran in
    the interpreter here does not first fail, or round otherwise, on a lent GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TPSERVE_TRITON_CPU")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not found in a cache
    script = Path(__file__).with_name("hopper_ptx.py")
    # (a bound on a hang only: int8's 34 s of CPU alone took 193 s in a slow run of the
    # fast tier beside the other, at nice 19)
    done = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    if mode == "gemv":
        assert f"{len(kernels.FP8_GEMV_CONFIGS) + 3} GEMVs compiled for sm_90" in done.stdout
    else:
        # (rest: W8A8 per token three times and the weight-only matmul three, one of each
        # in slices of K, the two FP8 terms' product, SwiGLU plain and of two rows, the
        # norm quantizing in two terms, the bench's read kernel, the LM head's rescoring
        # two; quant: a
        # row's quantization and SwiGLU's, two each, two FP8 terms twice, the widening; an
        # 8-bit cache: the cache write, decode attention plain and F16, prefill)
        count = {"quant": 7, "rest": 22}.get(mode, 4)
        assert done.stdout.count("compiled for sm_90") == count


def test_every_kernel_is_compiled_for_hopper() -> None:
    """tests/hopper_ptx.py names every Triton kernel of replicas/kernels (a new kernel
    joins that check, or this fails)."""
    import re

    root = Path(kernels.__file__).parent
    defined = {name for f in root.glob("*.py")
               for name in re.findall(r"def (_\w+_kernel)\(", f.read_text())}
    checked = set(re.findall(r"\.(_\w+_kernel)\b",
                             Path(__file__).with_name("hopper_ptx.py").read_text()))
    assert len(defined) >= 14 and defined <= checked, sorted(defined - checked)


def same_fp8(got: torch.Tensor, want: torch.Tensor) -> None:
    """Two FP8 caches hold the same entries, up to rounding: an entry may be one e4m3 step
    off where the values rounded were computed apart (two kernels' rotations fuse their
    multiply-adds differently on a GPU; a conversion may round through float16), and in
    Triton's interpreter, whose e4m3 rounding loses a mantissa carry (1.96 -> 1.0 where
    PyTorch and the GPU give 2.0), a power of two may come out halved. At most 1 entry in
    20 differs."""
    g, w = got.float(), want.float()
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    step = torch.exp2(torch.floor(torch.log2(w.abs().clamp(min=2.0 ** -6))) - 3)
    near = (g - w).abs() <= step
    if DEVICE == "cpu":
        near |= g * 2 == w
    assert bool(near[differ].all()) and int(differ.sum()) <= differ.numel() // 20


def replays_equal(run: Callable[[], torch.Tensor], times: int) -> torch.Tensor:
    """`run`'s output once, then `run` captured in a CUDA graph and replayed `times`
    times, each replay's output equal to it; returns it."""
    first = run().clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(times):
        graph.replay()
        assert torch.equal(out, first)
    return first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="races show on a GPU only")
def test_split_merge_by_the_last_split_holds_under_replay() -> None:
    """The split that finishes last merges the others' results (a counter per sequence
    and kv head): 300 replays of a captured decode attention over 64 sequences x 16
    splits, each equal to the first and to the reference, and the counters back at 0."""
    contexts = [40 + 37 * i for i in range(64)]
    b = ragged_batch([1] * 64, contexts, 16, 8192, None)
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache = (torch.randn(8192, 16, 4, 64, generator=gen).to(DEVICE, torch.bfloat16)
                        for _ in range(2))
    q = torch.randn(64, 16, 64, generator=gen).to(DEVICE, torch.bfloat16)
    want = reference_attention(q, k_cache, v_cache, b, None)

    def run() -> torch.Tensor:
        assert b.cu_q is not None
        return kernels.paged_attention(q, k_cache, v_cache, b.block_tables, b.cu_q,
                                       b.positions, None, 1, 16)

    first = replays_equal(run, 300)
    torch.testing.assert_close(first, want, atol=2e-2, rtol=2e-2)
    assert int(kernels._COUNTERS[q.device].abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])  # blocks divide it; they do not
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(dtype: torch.dtype, shape: tuple[int, int],
                             with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    x = torch.randn(1, shape[1], generator=gen).to(DEVICE, dtype)
    bias = torch.randn(shape[0], generator=gen).to(DEVICE, dtype) if with_bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else
                                      bias.float())
    for config in [(8, 64, 4, 2), (16, 128, 4, 3)]:
        got = kernels.gemv(x, w, bias, config)
        assert got.dtype == dtype and got.shape == (1, shape[0])
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])
def test_gated_gemv_is_silu_and_mul_then_gemv(dtype: torch.dtype, shape: tuple[int, int]
                                               ) -> None:
    """SwiGLU fused into the down GEMV equals the separate kernel, then the GEMV: the
    activation is rounded alike, so the results agree to the last bit."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    gate_up = torch.randn(1, 2 * shape[1], generator=gen).to(DEVICE, dtype)
    for config in [(8, 64, 4, 2), (16, 128, 4, 3)]:
        got = kernels.gemv(gate_up, w, None, config, gated=True)
        want = kernels.gemv(kernels.silu_and_mul(gate_up), w, None, config)
        assert got.shape == (1, shape[0])
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_in_the_gemv_is_rms_norm_then_gemv(dtype: torch.dtype, shape: tuple[int, int],
                                                 with_residual: bool) -> None:
    """The decoder layer's RMSNorm done inside its projection's GEMV: the same output,
    bit for bit, and the same residual sum as the norm kernel, then the GEMV."""
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(shape[0], generator=gen).to(DEVICE, dtype)
    x, residual = (torch.randn(1, shape[1], generator=gen).to(DEVICE, dtype) for _ in range(2))
    norm_w = (1 + torch.randn(shape[1], generator=gen) / 4).to(DEVICE, dtype)
    res = residual if with_residual else None
    for config in [(8, 64, 4, 2), (16, 128, 4, 3)]:
        got, got_sum = kernels.gemv_norm(x, res, norm_w, 1e-5, w, bias, config)
        h, want_sum = kernels.rms_norm(x, norm_w, 1e-5, res)
        want = kernels.gemv(h, w, bias, config)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(got_sum, x if want_sum is None else want_sum, atol=0,
                                   rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(128, 256), (80, 200)])  # [gate; up]: blocks divide it or not
def test_swiglu_in_the_norm_gemv_is_the_norm_gemv_then_silu_and_mul(
        dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """PERF.md v0.77: gate_up's GEMV with SwiGLU on its output (its rows' gate and up
    halves in one program) equals the norm GEMV, then silu_and_mul, to the last bit, with
    a bias and a residual; so does an FP8 weight with its row scales."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(shape[0], generator=gen).to(DEVICE, dtype)
    x, residual = (torch.randn(1, shape[1], generator=gen).to(DEVICE, dtype) for _ in range(2))
    norm_w = (1 + torch.randn(shape[1], generator=gen) / 4).to(DEVICE, dtype)
    w8, scale = quantize_rows(w.float())
    for weight, s in ((w, None), (w8, scale)):
        for config in [(8, 64, 4, 2), (16, 128, 4, 3), (8, 64, 4, 2, 0, 1)]:  # (+ RED, v0.85)
            got, got_sum = kernels.gemv_norm(x, residual, norm_w, 1e-5, weight, bias, config,
                                             s, swiglu=True)
            full, want_sum = kernels.gemv_norm(x, residual, norm_w, 1e-5, weight, bias,
                                               config, s)
            assert got.shape == (1, shape[0] // 2)
            torch.testing.assert_close(got, kernels.silu_and_mul(full), atol=0, rtol=0)
            torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="times kernels on a GPU")
def test_tuned_gemv_keeps_bf16_decode_close(tmp_path: Path) -> None:
    """On GLM-4-9B's layer shapes: every GEMV config agrees with cuBLAS (pick_gemv checks)
    and the pick is measured, not assumed (an empty pick cache: nothing kept is read)."""
    from replicas.parallel import ColumnParallelLinear, Comm, RowParallelLinear, tune_gemv

    comm = Comm()
    layers = torch.nn.ModuleList([ColumnParallelLinear(4096, [4096, 256, 256], True, comm),
                                  RowParallelLinear(13696, 4096, False, comm),
                                  ColumnParallelLinear(4096, [4096, 256, 256], True, comm),
                                  RowParallelLinear(13696, 4096, False, comm)])
    layers[2].gemv_kind, layers[3].gemv_kind = "norm", "gated"  # as a decoder layer has them
    layers.to("cuda", torch.bfloat16)
    for p in layers.parameters():
        p.data.normal_(0, 0.02)
    report = tune_gemv(layers, tmp_path / "gemv_picks.json")
    assert len(report) == 4  # each kind timed on its own
    for times in report.values():
        assert "cached" not in times and times["cublas"] > 0 and times["chosen"] in ["cublas", *map(
            str, kernels.GEMV_CONFIGS)]


def test_decode_splits_fill_the_gpu_within_bounds() -> None:
    assert kernels.decode_splits(1, 2, 8192) == 16  # 2 programs alone would idle the GPU
    assert kernels.decode_splits(1, 2, 128) == 2  # no split under 64 keys
    assert kernels.decode_splits(256, 2, 8192) == 1  # enough programs already
    # at most two programs an SM (the H200's probe, PERF.md v0.65): 16, 32, 64 sequences
    assert [kernels.decode_splits(n, 2, 512) for n in (16, 32, 64, 128)] == [8, 4, 2, 1]


@pytest.mark.parametrize("flash_from", [4, 10**6])  # whole prompts through SDPA, or not
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "glm"])
def test_engine_tokens_equal_through_the_kernels(family: str, flash_from: int,
                                                 checkpoint: CheckpointFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole generations (prefill in chunks, prefix-cache hits, decode) through the
    kernels give the PyTorch path's greedy tokens."""
    monkeypatch.setattr(worker, "FLASH_MIN_TOKENS", flash_from)
    if flash_from < 10**6:  # (the norms and SwiGLU: the other run's, tests/rowwise.py)
        rows_in_pytorch(monkeypatch)
    ckpt = checkpoint(family)
    config = EngineConfig(model=ckpt, device=DEVICE, dtype="float32",
                          max_num_batched_tokens=16, block_size=4)
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 200, (13,), generator=gen).tolist()
    prompts = [shared + [5, 6], shared + [7], torch.randint(3, 200, (30,), generator=gen)
               .tolist()]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TPSERVE_KERNELS", flag)
        with Engine(config) as engine:
            first = engine.generate(prompts[:1], params)  # its blocks then serve the rest
            runs[flag] = [o.token_ids for o in first + engine.generate(prompts[1:], params)]
            if flag == "1":
                assert engine.stats()["prefix_cache_hit_blocks"] > 0
    assert runs["1"] == runs["0"]


@pytest.mark.parametrize("kv", ["fp8", "int8"])
@pytest.mark.parametrize("flash_from", [4, 10**6])
def test_engine_caches_alike_through_the_kernels_in_8_bits(
        flash_from: int, kv: str, checkpoint: CheckpointFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache_dtype="fp8" or "int8": the kernels and the PyTorch path write the cache
    alike (chunked prefill, a prefix-cache hit): the first layer's cache, whose inputs
    both paths compute alike, holds the same entries (see same_fp8; int8: the same, or
    one step apart where a rotation rounded differently, and the same row scales), and
    decoding over the cache runs (its writes: the two cache-write tests above). Later
    layers' inputs differ by the interpreter's rounding, so the tokens of a tiny random
    model may too: on a GPU tests/test_gpu.py holds the accuracy bar."""
    monkeypatch.setattr(worker, "FLASH_MIN_TOKENS", flash_from)
    # a small pool: the caches are cloned and compared whole (a GPU's default pool would
    # take tens of GB in float)
    config = EngineConfig(model=checkpoint("llama"), device=DEVICE, dtype="float32",
                          max_num_batched_tokens=16, block_size=4, kv_cache_dtype=kv,
                          num_kv_blocks=64, max_model_len=256)
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 200, (13,), generator=gen).tolist()
    prompts = [shared + [5, 6], shared + [7]]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    caches = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TPSERVE_KERNELS", flag)
        with Engine(config) as engine:
            layer = engine.worker.kv[0]
            assert layer[0].dtype == (torch.int8 if kv == "int8" else torch.float8_e4m3fn)
            assert len(layer) == (4 if kv == "int8" else 2)  # (K, V[, their row scales])
            engine.generate(prompts[:1], params)
            engine.generate(prompts[1:], params)  # (its prefix from the cache)
            assert engine.stats()["prefix_cache_hit_blocks"] > 0
            # (all but the scratch block, the last: padded rows and the start-up's
            # warm-up steps write it, Worker._warm_up where the kernels run)
            caches[flag] = tuple(x[:-1].clone() for x in layer)
            out = engine.generate([[9, 8, 7]], SamplingParams(max_tokens=5, temperature=0.0,
                                                              ignore_eos=True))
            assert len(out[0].token_ids) == 5
    for got, want in zip(caches["1"], caches["0"], strict=True):
        if got.dtype == torch.float8_e4m3fn:
            same_fp8(got, want)
        elif got.dtype == torch.int8:
            differ = got != want
            assert int(differ.sum()) <= differ.numel() // 20
            assert int((got.int() - want.int()).abs().max()) <= 1
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("family", "epilogue"), [("llama", "1"), ("glm", "1"), ("glm", "0")])
def test_decode_through_the_gemvs_equals_the_matmuls(family: str, epilogue: str,
                                                     checkpoint: CheckpointFactory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch-1 decode with every projection on the GEMV (the layer norms inside the qkv
    and gate_up GEMVs, SwiGLU on gate_up's output, or with TPSERVE_SWIGLU_EPILOGUE=0
    inside the down GEMV, the LM head too) gives the tokens and, to float32 rounding,
    the log-probabilities of the matmul path. On a GPU the GEMV is only chosen where it
    wins; here it is set on every layer. (GLM: biased qkv, fused gate_up.)"""
    monkeypatch.setenv("TPSERVE_SWIGLU_EPILOGUE", epilogue)
    ckpt = checkpoint(family)
    config = EngineConfig(model=ckpt, device=DEVICE, dtype="float32", cuda_graphs=False)
    prompt = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    runs = {}
    with Engine(config) as engine:
        for on in (False, True):
            for module in engine.worker.model.modules():
                if hasattr(module, "gemv"):
                    # 16 rows a program (the interpreter's time goes by programs): still
                    # several programs a layer, K in 2+ blocks, and the LM head's 1000
                    # rows end in a masked program (1000 = 62 x 16 + 8)
                    module.gemv = (16, 32, 4, 1) if on else None
            runs[on] = engine.generate([prompt], params)[0]
        kinds = {m.gemv_kind for m in engine.worker.model.modules() if hasattr(m, "gemv")}
    assert ("norm_swiglu" in kinds) == (epilogue == "1") and ("gated" in kinds) == (
        epilogue == "0")
    assert runs[True].token_ids == runs[False].token_ids
    assert runs[True].logprobs is not None and runs[False].logprobs is not None
    torch.testing.assert_close(torch.tensor(runs[True].logprobs),
                               torch.tensor(runs[False].logprobs), atol=1e-4, rtol=1e-4)


def test_wide_decode_steps_take_the_tiles_timed_fastest_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.74, v0.76, v0.84: decode attention runs DECODE_TILE, but from
    WIDE_DECODE_SEQS sequences 32-key tiles on a 16-bit cache and from WIDE_F16_SEQS (128)
    DECODE_TILE's F16 form on an 8-bit one (not with float32 queries, which F16 does not
    take), from WIDE_DECODE_SEQS on an 8-bit cache with one stage and 128 registers;
    TPSERVE_WIDE_DECODE_TILES=0 keeps DECODE_TILE everywhere; a tile written out there is
    the wide steps' (PERF.md v0.84's A/B), and anything else is refused."""
    from replicas.kernels.attention import WIDE_DECODE_SEQS, WIDE_F16_SEQS, engine_decode_tile

    bf16, f32 = torch.bfloat16, torch.float32
    assert WIDE_F16_SEQS == 128 < WIDE_DECODE_SEQS
    for seqs in (1, 64, WIDE_F16_SEQS - 1):
        for cache in (bf16, torch.int8, torch.float8_e4m3fn):
            assert engine_decode_tile(seqs, cache, bf16) == kernels.DECODE_TILE
    for seqs in (WIDE_F16_SEQS, WIDE_DECODE_SEQS - 1):
        assert engine_decode_tile(seqs, bf16, bf16) == kernels.DECODE_TILE
        for cache in (torch.int8, torch.float8_e4m3fn):
            assert engine_decode_tile(seqs, cache, bf16) == (*kernels.DECODE_TILE, 1)
            assert engine_decode_tile(seqs, cache, f32) == kernels.DECODE_TILE
    wide = WIDE_DECODE_SEQS
    assert engine_decode_tile(wide, bf16, bf16) == (32, 4)
    assert engine_decode_tile(wide, torch.float16, torch.float16) == (32, 4)
    for cache in (torch.int8, torch.float8_e4m3fn):  # (v0.84, v0.87)
        assert engine_decode_tile(wide, cache, bf16) == (*kernels.DECODE_TILE, 1, 1, 128)
    for cache in (torch.int8, torch.float8_e4m3fn):
        assert engine_decode_tile(wide, cache, f32) == kernels.DECODE_TILE
    monkeypatch.setenv("TPSERVE_WIDE_DECODE_TILES", "0")
    assert engine_decode_tile(wide, bf16, bf16) == kernels.DECODE_TILE
    monkeypatch.setenv("TPSERVE_WIDE_DECODE_TILES", "64,4,1,1,128")
    assert engine_decode_tile(WIDE_F16_SEQS, torch.float8_e4m3fn, bf16) == (64, 4, 1, 1, 128)
    assert engine_decode_tile(wide, bf16, bf16) == (64, 4, 1, 1, 128)
    assert engine_decode_tile(WIDE_F16_SEQS - 1, torch.int8, bf16) == kernels.DECODE_TILE
    assert engine_decode_tile(wide - 1, bf16, bf16) == kernels.DECODE_TILE
    monkeypatch.setenv("TPSERVE_WIDE_DECODE_TILES", "wide")
    with pytest.raises(ValueError, match="TPSERVE_WIDE_DECODE_TILES"):
        engine_decode_tile(wide, bf16, bf16)


def test_the_mlp_gemv_kinds_follow_the_weights_dtype(checkpoint: CheckpointFactory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.77: once loaded (tune_gemv calls gemv_kinds again), an MLP with FP8
    weights runs SwiGLU on gate_up's GEMV and a plain down GEMV, one with 16-bit weights
    SwiGLU inside the down GEMV; TPSERVE_SWIGLU_EPILOGUE=1 / 0 forces either, another
    value is refused by name."""
    from replicas.model import MLP

    ckpt = checkpoint("llama")
    kinds = {}
    for quantization in ("none", "fp8"):
        config = EngineConfig(model=ckpt, device=DEVICE, dtype="bfloat16",
                              quantization=quantization, cuda_graphs=False)
        with Engine(config) as engine:
            mlps = [m for m in engine.worker.model.modules() if isinstance(m, MLP)]
            for mode in ("fp8", "1", "0"):
                monkeypatch.setenv("TPSERVE_SWIGLU_EPILOGUE", mode)
                for mlp in mlps:
                    mlp.gemv_kinds()
                kinds[quantization, mode] = {(m.gate_up_proj.gemv_kind,
                                              m.down_proj.gemv_kind) for m in mlps}
            monkeypatch.setenv("TPSERVE_SWIGLU_EPILOGUE", "yes")
            with pytest.raises(ValueError, match="TPSERVE_SWIGLU_EPILOGUE"):
                mlps[0].gemv_kinds()
            monkeypatch.delenv("TPSERVE_SWIGLU_EPILOGUE")
    fused, inside = {("norm_swiglu", "plain")}, {("norm", "gated")}
    assert kinds["none", "fp8"] == inside and kinds["fp8", "fp8"] == fused
    assert kinds["none", "1"] == kinds["fp8", "1"] == fused
    assert kinds["none", "0"] == kinds["fp8", "0"] == inside
