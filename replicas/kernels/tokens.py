"""Tokens on the device between steps: the sampled tokens fed into the next
step's ids, the greedy argmax of a decode graph, and an FP8 LM head's top logits
computed again from its 16-bit rows (`rescore_top`, PERF.md v0.94)."""

from __future__ import annotations

import torch

from replicas.kernels.common import STEP_SHAPED, _launch, _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit(do_not_specialize=STEP_SHAPED["_feed_kernel"])
    def _feed_kernel(IDS, FEED, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        v = tl.load(IDS + i, mask=ok, other=0)
        fed = tl.load(FEED + (-v - 1), mask=ok & (v < 0), other=0)
        tl.store(IDS + i, tl.where(v < 0, fed, v), mask=ok)

    @triton.jit
    def _argmax_part_kernel(X, PV, PI, n, sx, parts, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Per (row, part): the largest of BLOCK logits and its first index."""
        row, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        _pdl_enter(PDL)
        x = tl.load(X + row * sx + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        tl.store(PV + row * parts + part, tl.max(x, axis=0))
        tl.store(PI + row * parts + part, part * BLOCK + tl.argmax(x, axis=0))

    @triton.jit
    def _argmax_merge_kernel(PV, PI, OUT, parts, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
        """Per row: the first part holding the largest value gives the first index of it."""
        row = tl.program_id(0)
        at = tl.arange(0, BLOCK_P)
        _pdl_enter(PDL)
        v = tl.load(PV + row * parts + at, mask=at < parts, other=float("-inf"))
        best = tl.argmax(v, axis=0)
        tl.store(OUT + row, tl.load(PI + row * parts + best).to(tl.int64))


    @triton.jit
    def _top_part_kernel(X, PV, PI, n, sx, cands, K: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        """Per (row, part): the K largest of BLOCK logits, largest first, and their
        indices (first index among equals; -inf past the row's end)."""
        row, part = tl.program_id(0), tl.program_id(1)
        at = tl.arange(0, BLOCK)
        cols = part * BLOCK + at
        _pdl_enter(PDL)
        x = tl.load(X + row * sx + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        for k in tl.static_range(K):
            best = tl.argmax(x, axis=0)
            tl.store(PV + row * cands + part * K + k, tl.max(x, axis=0))
            tl.store(PI + row * cands + part * K + k, part * BLOCK + best)
            x = tl.where(at == best, float("-inf"), x)

    @triton.jit
    def _rescore_kernel(X, PV, PI, H, W, n, sx, sh, sw, cands, dim, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """Per (row, j): the j-th largest of the row's part candidates (first among
        equals), its logit computed again as h . W[index] (float32 sums, rounded once to
        h's dtype) and written over it."""
        row, j = tl.program_id(0), tl.program_id(1)
        at = tl.arange(0, BLOCK_P)
        _pdl_enter(PDL)
        v = tl.load(PV + row * cands + at, mask=at < cands, other=float("-inf"))
        best = tl.argmax(v, axis=0)
        for _ in range(j):  # the j candidates before drop out
            v = tl.where(at == best, float("-inf"), v)
            best = tl.argmax(v, axis=0)
        idx = tl.load(PI + row * cands + best).to(tl.int64)
        if (tl.max(v, axis=0) > float("-inf")) & (idx < n):
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                h = tl.load(H + row * sh + d, mask=d < dim, other=0.0).to(tl.float32)
                w = tl.load(W + idx * sw + d, mask=d < dim, other=0.0).to(tl.float32)
                acc += h * w
            y = tl.sum(acc, axis=0).to(H.dtype.element_ty).to(tl.float32)
            tl.store(X + row * sx + idx, y)


FEED_BLOCK = 256


def feed_tokens(ids: torch.Tensor, feed: torch.Tensor) -> None:
    """In place: each id -(j + 1) of ids [T] becomes feed[j] (tokens sampled on the
    device by the step before); other ids stay."""
    # (one block size for every step: a size that followed the step's tokens would
    # compile a variant for each power of two of them, in the middle of serving)
    _feed_kernel[(triton.cdiv(ids.numel(), FEED_BLOCK),)](ids, feed, ids.numel(),
                                                          BLOCK=FEED_BLOCK, num_warps=4)


ARGMAX_BLOCK = 4096


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, the first index of each row's largest value (as
    torch.argmax for rows without NaN): many programs take a slice of the row each, then
    one per row picks among their answers. A decode graph's greedy tokens, in it."""
    rows, n = x.shape
    parts = triton.cdiv(n, ARGMAX_BLOCK)
    values = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    where = torch.empty(rows, parts, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _argmax_part_kernel[(rows, parts)](x, values, where, n, x.stride(0), parts,
                                       BLOCK=ARGMAX_BLOCK, num_warps=8, **_launch(x))
    _argmax_merge_kernel[(rows,)](values, where, out, parts, BLOCK_P=_pow2(parts),
                                  num_warps=1, **_launch(x))
    return out


TOP_BLOCK, TOP_PER_PART = 2048, 4  # rescore_top's runs: 74 x 4 candidates for 151,552
RESCORE_BLOCK_D = 1024


def top_block(n: int, count: int) -> int:
    """rescore_top's run of logits for rows of n and `count` rescored: TOP_BLOCK, or
    shorter (a power of two, 64 at least) where TOP_PER_PART a run would give fewer than
    2 x count candidates (a small vocabulary, or a shard of one)."""
    fits = n * TOP_PER_PART // (2 * count)
    return max(64, min(TOP_BLOCK, 1 << max(0, fits.bit_length() - 1)))


def rescore_top(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, count: int
                ) -> None:
    """In place, x [N, V] float32 (logits of h [N, D] by rough rows of `weight` [V', D],
    V <= V'): each row's `count` highest logits among the TOP_PER_PART highest of each
    run of `top_block(V, count)`, computed again as h . weight[index] in float32, rounded
    once to h's dtype. The set is the row's top `count` unless a run holds more than
    TOP_PER_PART of them (then the next ones in); the row's top TOP_PER_PART always. Two
    kernels."""
    rows, n = x.shape
    block = top_block(n, count)
    cands = triton.cdiv(n, block) * TOP_PER_PART
    values = torch.empty(rows, cands, dtype=torch.float32, device=x.device)
    where = torch.empty(rows, cands, dtype=torch.int32, device=x.device)
    _top_part_kernel[(rows, cands // TOP_PER_PART)](
        x, values, where, n, x.stride(0), cands, K=TOP_PER_PART, BLOCK=block,
        num_warps=8 if block >= 1024 else 4, **_launch(x))
    _rescore_kernel[(rows, min(count, cands))](
        x, values, where, h, weight, n, x.stride(0), h.stride(0), weight.stride(0), cands,
        h.shape[1], BLOCK_P=_pow2(cands), BLOCK_D=RESCORE_BLOCK_D, num_warps=4,
        **_launch(x))
