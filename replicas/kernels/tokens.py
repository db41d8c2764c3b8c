"""Tokens on the device between steps: the sampled tokens fed into the next
step's ids, and the greedy argmax of a decode graph."""

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
