"""x @ W.T for FP8 weights.

- `w8a16`: 16-bit (or float32) activations; the weight tiles are widened to the
  activations' dtype in registers and multiplied on the 16-bit tensor cores, each output
  column scaled once at the end (`replicas/fp8.py`'s weight-only path for more than one
  row; the batch-1 GEMV does the same for one row). Reads half a 16-bit weight's bytes,
  and rounds only the weights.
- `w8a8_groups`: FP8 activations with a scale per token and run of `group` input columns
  (`fp8.quantize_groups`), on the FP8 tensor cores: each run's partial product is scaled
  by its rows' scales as it is added, the weight's row scales once at the end. The
  rounding that keeps W8A8 nearest the 16-bit model with qkv left 16-bit
  (replicas/w8a8_formats.py: groups of 32); the engine's `w8a8_group`. `--suite w8a16`
  times it against per-token W8A8 (`torch._scaled_mm`) and bf16 cuBLAS.
- `w8a8_per_token`: FP8 activations with one scale per token: what `torch._scaled_mm`
  computes, in narrower tiles for a decode step's few rows (PERF.md v0.62), each 128
  FP8 products added into float32 (v0.67).
- `w8a8_cublas`: the same product through `torch._scaled_mm`, K in runs side by side on
  CUDA streams, or transposed: candidates `--suite w8a8` times (v0.71)."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from replicas.kernels.attention import _kept, _precision
from replicas.kernels.common import STEP_SHAPED, _launch

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _slices_total(acc, P, C, at, ok, ps, tile, mn, SPLIT: tl.constexpr):
        """K in SPLIT slices, a program each (PERF.md v0.98): this slice's float32 sums
        `acc` into P [SPLIT, m * n] (at its elements' `at`, where `ok`), then a count in
        C[tile]. Returns (whether this program is the tile's last slice to arrive, and then
        the slices' sums added in their order: the same sums whichever arrives last). The
        last sets C[tile] back to 0 for the next product."""
        tl.store(P + ps * mn + at, acc, mask=ok)
        tl.debug_barrier()  # every thread's sums stored before the count (release)
        last = tl.atomic_add(C + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
        total = tl.zeros_like(acc)
        if last:
            for i in tl.static_range(SPLIT):  # past L1, which other SMs' stores miss
                total += tl.load(P + i * mn + at, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(C + tile, 0, sem="relaxed", scope="gpu")
        return last, total

    @triton.jit
    def _tile_at(rm, rn, m_ok, n_ok, stride, SWAP: tl.constexpr):
        """A tile's element offsets in a row-major [m, n] array whose rows are `stride`
        apart, and where they lie in it, laid out as the tile's sums are ([BLOCK_M,
        BLOCK_N], or [BLOCK_N, BLOCK_M] with SWAP)."""
        if SWAP:
            at, ok = rm[None, :] * stride + rn[:, None], n_ok[:, None] & m_ok[None, :]
        else:
            at, ok = rm[:, None] * stride + rn[None, :], m_ok[:, None] & n_ok[None, :]
        return at, ok

    @triton.jit
    def _w8a16_out(acc, S, B, Y, rm, rn, m_ok, n_ok, sym, HAS_BIAS: tl.constexpr,
                   SWAP: tl.constexpr):
        """A tile's float32 sums (acc [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with SWAP)
        times W's row scales, plus the bias, rounded into y."""
        s = tl.load(S + rn, mask=n_ok, other=0.0)
        if HAS_BIAS:
            b = tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)
        else:
            b = tl.zeros_like(s)
        if SWAP:
            y = acc * s[:, None] + b[:, None]
        else:
            y = acc * s[None, :] + b[None, :]
        at, ok = _tile_at(rm, rn, m_ok, n_ok, sym, SWAP)
        tl.store(Y + at, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=STEP_SHAPED["_w8a16_kernel"])
    def _w8a16_kernel(X, W, S, B, Y, P, C, m, n, k, sxm, swn, sym, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SWAP: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                      SPLIT: tl.constexpr = 1):
        """Program (BLOCK_M rows of x, BLOCK_N rows of W): the tile of y, K streamed in
        BLOCK_K steps, float32 accumulation, then W's row scales and the bias. SWAP
        computes the tile of y^T = W x^T instead: the widened weight tile is then the
        dot's first operand, which Hopper's wgmma may take from registers (with x^T from
        shared memory), and BLOCK_N weight rows fill its 64-row side while a decode
        batch's few rows of x are its narrow side. SPLIT > 1: K in SPLIT slices, a program
        each (grid axis 2), the tile's last to arrive writes y (_slices_total)."""
        _pdl_enter(PDL)
        if SWAP:
            pn, pm = tl.program_id(0), tl.program_id(1)
        else:
            pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < m, rn < n
        if SPLIT > 1:
            ps = tl.program_id(2)
            span = tl.cdiv(tl.cdiv(k, BLOCK_K), SPLIT) * BLOCK_K
            k_lo = ps * span
            k_hi = tl.minimum(k, k_lo + span)
        else:
            k_lo = 0
            k_hi = k
        if SWAP:  # acc[BLOCK_N, BLOCK_M], stored transposed into y
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k_ok = (k0 + rk) < k_hi
                w = tl.load(W + rn[:, None] * swn + (k0 + rk)[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x_t = tl.load(X + rm[None, :] * sxm + (k0 + rk)[:, None],
                              mask=k_ok[:, None] & m_ok[None, :], other=0.0)
                acc += tl.dot(w.to(x_t.dtype), x_t, input_precision=PREC)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k_ok = (k0 + rk) < k_hi
                a = tl.load(X + rm[:, None] * sxm + (k0 + rk)[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(W + rn[:, None] * swn + (k0 + rk)[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision=PREC)
        if SPLIT > 1:
            at, ok = _tile_at(rm, rn, m_ok, n_ok, n, SWAP)
            last, total = _slices_total(acc, P, C, at, ok, ps, pm * tl.cdiv(n, BLOCK_N) + pn,
                                        m * n, SPLIT)
            if last:
                _w8a16_out(total, S, B, Y, rm, rn, m_ok, n_ok, sym, HAS_BIAS, SWAP)
        else:
            _w8a16_out(acc, S, B, Y, rm, rn, m_ok, n_ok, sym, HAS_BIAS, SWAP)

    @triton.jit
    def _w8a8_out(acc, XS, WS, B, Y, rm, rn, m_ok, n_ok, sxs, sym, HAS_BIAS: tl.constexpr,
                  TOKENS: tl.constexpr, SWAP: tl.constexpr):
        """A tile's float32 sums (acc [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with SWAP)
        times W's row scales (and with TOKENS, x's), plus the bias, rounded into y."""
        ws = tl.load(WS + rn, mask=n_ok, other=0.0)
        if TOKENS:
            xs = tl.load(XS + rm * sxs, mask=m_ok, other=0.0)
        else:
            xs = tl.full(rm.shape, 1.0, tl.float32)
        if SWAP:
            acc = acc * ws[:, None] * xs[None, :]
            if HAS_BIAS:
                acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        else:
            acc = acc * xs[:, None] * ws[None, :]
            if HAS_BIAS:
                acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        at, ok = _tile_at(rm, rn, m_ok, n_ok, sym, SWAP)
        tl.store(Y + at, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=STEP_SHAPED["_w8a8_groups_kernel"])
    def _w8a8_groups_kernel(X, XS, W, WS, B, Y, P, C, m, n, k, sxm, sxs, swn, sym,
                            HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                            TOKENS: tl.constexpr = False, SWAP: tl.constexpr = False,
                            IMPRECISE: tl.constexpr = None, SPLIT: tl.constexpr = 1):
        """Program (BLOCK_M rows of x, BLOCK_N rows of W): K in runs of GROUP, each run's
        FP8 product (float32) times its rows' scales added to the tile; then W's row
        scales and the bias. TOKENS: one scale per token (XS [M, 1]), K in steps of
        GROUP (the last one masked), the rows' scales applied once with W's at the end.
        SWAP computes the tile of y^T = W x^T (the weight tile the dot's 64-row side, a
        few rows of x its narrow side). IMPRECISE: the dot's max_num_imprecise_acc, the
        products the FP8 tensor cores add in their narrower accumulator before adding
        into float32 (None: Triton's default, all of a step's GROUP). SPLIT > 1: the runs
        in SPLIT slices, a program each (grid axis 2), the tile's last to arrive writes y
        (_slices_total; PERF.md v0.99)."""
        _pdl_enter(PDL)
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, GROUP)
        m_ok, n_ok = rm < m, rn < n
        runs = tl.cdiv(k, GROUP)
        if SPLIT > 1:
            ps = tl.program_id(2)
            span = tl.cdiv(runs, SPLIT)
            g_lo = ps * span
            g_hi = tl.minimum(runs, g_lo + span)
        else:
            g_lo = 0
            g_hi = runs
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in tl.range(g_lo, g_hi):
            cols = g * GROUP + rk
            k_ok = cols < k  # (all true but in a per-token product's last step)
            a = tl.load(X + rm[:, None] * sxm + cols[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + rn[:, None] * swn + cols[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if SWAP:
                part = tl.dot(w, tl.trans(a), max_num_imprecise_acc=IMPRECISE)
            else:
                part = tl.dot(a, tl.trans(w), max_num_imprecise_acc=IMPRECISE)
            if TOKENS:
                acc += part
            else:
                s = tl.load(XS + rm * sxs + g, mask=m_ok, other=0.0)
                acc += part * (s[None, :] if SWAP else s[:, None])
        if SPLIT > 1:
            at, ok = _tile_at(rm, rn, m_ok, n_ok, n, SWAP)
            last, total = _slices_total(acc, P, C, at, ok, ps, pm * tl.cdiv(n, BLOCK_N) + pn,
                                        m * n, SPLIT)
            if last:
                _w8a8_out(total, XS, WS, B, Y, rm, rn, m_ok, n_ok, sxs, sym, HAS_BIAS,
                          TOKENS, SWAP)
        else:
            _w8a8_out(acc, XS, WS, B, Y, rm, rn, m_ok, n_ok, sxs, sym, HAS_BIAS, TOKENS,
                      SWAP)

    @triton.jit(do_not_specialize=STEP_SHAPED["_two_terms_kernel"])
    def _two_terms_kernel(X, XS, W, WS, B, Y, m, n, k, sxm, sxs, swn, sym,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                          IMPRECISE: tl.constexpr = None):
        """Program (BLOCK_M rows of y, BLOCK_N rows of W): x's two FP8 terms (X [2M, K]:
        rows 0..M-1 each token's rounding, M.. its residual's; XS [2M, 1] their scales),
        two FP8 dots a step on the one weight tile, a float32 sum each; in the epilogue
        each sum times its rows' scales, the two added, W's row scales, the bias, one
        rounding."""
        _pdl_enter(PDL)
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < m, rn < n
        rk = tl.arange(0, BLOCK_K)
        hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in tl.range(0, tl.cdiv(k, BLOCK_K)):
            cols = g * BLOCK_K + rk
            k_ok = cols < k
            at = rm[:, None] * sxm + cols[None, :]
            ok = m_ok[:, None] & k_ok[None, :]
            w = tl.trans(tl.load(W + rn[:, None] * swn + cols[None, :],
                                 mask=n_ok[:, None] & k_ok[None, :], other=0.0))
            hi += tl.dot(tl.load(X + at, mask=ok, other=0.0), w,
                         max_num_imprecise_acc=IMPRECISE)
            lo += tl.dot(tl.load(X + m * sxm + at, mask=ok, other=0.0), w,
                         max_num_imprecise_acc=IMPRECISE)
        y = (hi * tl.load(XS + rm * sxs, mask=m_ok, other=0.0)[:, None]
             + lo * tl.load(XS + (m + rm) * sxs, mask=m_ok, other=0.0)[:, None])
        # (W's scales, the bias, the rounding: the rows' scales are in y already)
        _w8a8_out(y, XS, WS, B, Y, rm, rn, m_ok, n_ok, sxs, sym, HAS_BIAS, False, False)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap[, split]): the configs the fp8 suite's
# probe times against the default (w8a16_config) on the GPU, to replace the first guess
# with measured picks (replicas/bench.py w8a16_suite); swap: the kernel's SWAP (y^T = W
# x^T); split: K in that many slices (the kernel's SPLIT; 0: as w8a16_split chooses;
# absent: W8A16_SPLIT's), PERF.md v0.98
W8A16Config = tuple[int, ...]
W8A16_CONFIGS: tuple[W8A16Config, ...] = (
    (16, 32, 128, 4, 4, False), (16, 64, 128, 4, 4, False), (32, 64, 128, 4, 4, False),
    (64, 64, 128, 4, 3, False), (64, 128, 64, 4, 3, False), (128, 64, 64, 4, 3, False),
    (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False),
    (16, 64, 128, 4, 4, True), (16, 128, 128, 4, 4, True), (32, 128, 128, 4, 4, True),
    (64, 64, 128, 4, 4, True), (64, 128, 64, 4, 3, True), (64, 128, 128, 8, 3, True),
    (128, 128, 64, 8, 3, True), (256, 128, 64, 8, 3, True))


# the default config by rows of x, measured on the H200 (`--suite w8a16`,
# replicas/results/w8a16_h200.jsonl): of W8A16_CONFIGS, the one with the least time
# summed over GLM-4-9B's four layer shapes. At b7e4e52 (16, 64, 256 rows): per layer
# 107.5, 197.2, 420.9 µs against the first guess's 189.1, 254.0, 517.7 (PERF.md v0.32).
# At e08b4a2, with 128 rows probed too: the swapped (64, 64, 128) 268.1 µs at 128 rows
# against the (128, 64, 64) 346.2 it replaces there; at 256 rows both lose to widening
# then cuBLAS (327.2 against 422.3: fp8.DEQUANT_ROWS; PERF.md v0.36)
# PERF.md v0.98: with K in slices (W8A16_SPLIT), (32, 64, 128) at 17-32 rows: 17.4, 12.3,
# 55.8, 30.6 us against the swapped (64, 64, 128)'s 22.3, 22.2, 65.8, 69.5 unsliced (qkv,
# o, gate_up, down at 32 rows on an H100, results/w8a16_split_h100.jsonl)
W8A16_PICKS: tuple[tuple[int, W8A16Config], ...] = (
    (16, (16, 32, 128, 4, 4, False)), (32, (32, 64, 128, 4, 4, False)))
W8A16_MANY_ROWS: W8A16Config = (64, 64, 128, 4, 4, True)  # beyond the last pick's rows
# the FP8 LM head's (parallel.ParallelLMHead, steps of up to parallel.FP8_HEAD_ROWS rows):
# GLM-4-9B's 151,552 x 4,096 head, timed on an H100 in two calls (`bench.lm_head_rows`,
# replicas/results/w8a16_h100.jsonl; PERF.md v0.96-v0.97): (16, 64, 128) 225-234 us at
# 2-16 rows against W8A16_PICKS' 233-240, (32, 64, 128) 237 at 32 rows against
# W8A16_MANY_ROWS' 289-291, which stays the best at 64 rows (288)
W8A16_HEAD_PICKS: tuple[tuple[int, W8A16Config], ...] = (
    (16, (16, 64, 128, 4, 4, False)), (32, (32, 64, 128, 4, 4, False)))


# weights this wide (GLM-4-9B's gate_up, N = 27,392) past 64 rows: wider tiles, the probe's
# best on both GPUs: at 128 rows (128, 128, 64) 88.0 us against W8A16_MANY_ROWS' 121.4 on
# an H100 (results/w8a16_h100.jsonl, f4c7ca0) and 84.2 against 122.4 on the H200
# (w8a16_h200.jsonl, e08b4a2); at 256 rows (256, 128, 64) 131.7 against 216.8 and 130.4
# against 218.8 (past DEQUANT_ROWS: a measure for when it rises). K
# whole, as measured (the rule would slice (128, 128)'s 214 tiles at 128 rows: not yet
# timed). Narrower weights keep W8A16_MANY_ROWS, the best at 128 rows on both (PERF.md
# v1.00)
W8A16_WIDE_N = 16384
W8A16_WIDE_PICKS: tuple[tuple[int, W8A16Config], ...] = (
    (128, (128, 128, 64, 8, 3, True, 1)), (1 << 30, (256, 128, 64, 8, 3, True, 1)))
# and the narrower ones past 64 rows by K (PERF.md v1.01; an H100's probe at 5791d5b,
# results/w8a16_split_h100.jsonl): a K this long (down's 13,696) in wide tiles in slices,
# at 128 rows (128, 128, 64) 63.7 us against W8A16_MANY_ROWS' 67.7, at 256 (256, 128,
# 64) 91.5 against 128.8; a shorter K (qkv's and o's 4,096) whole in W8A16_MANY_ROWS'
# tiles, o 22.7 against 26.3 us at 128 rows and 33.6 against 48.6 at 256, qkv 34.1
# against 35.1 and 55.8 against 55.8 (the rule's 4 slices lose there)
W8A16_LONG_K = 8192
W8A16_LONG_K_PICKS: tuple[tuple[int, W8A16Config], ...] = (
    (128, (128, 128, 64, 8, 3, True, 0)), (1 << 30, (256, 128, 64, 8, 3, True, 0)))
W8A16_SHORT_K_MANY_ROWS: W8A16Config = (64, 64, 128, 4, 4, True, 1)


def w8a16_config(m: int, picks: tuple[tuple[int, W8A16Config], ...] | None = None,
                 n: int = 0, k: int = 0) -> W8A16Config:
    """The default config for `m` rows of x times a weight of `n` rows and `k` columns (0:
    not said): the first of `picks` (rows, config; where None, W8A16_PICKS as it is at
    the call) whose rows hold m; else, past 64 rows, for n of at least W8A16_WIDE_N
    W8A16_WIDE_PICKS', for k of at least W8A16_LONG_K W8A16_LONG_K_PICKS', for a
    shorter k W8A16_SHORT_K_MANY_ROWS; else W8A16_MANY_ROWS."""
    picked = next((config for rows, config in (W8A16_PICKS if picks is None else picks)
                   if m <= rows), None)
    if picked is not None:
        return picked
    if m > 64 and (n >= W8A16_WIDE_N or k >= W8A16_LONG_K):
        table = W8A16_WIDE_PICKS if n >= W8A16_WIDE_N else W8A16_LONG_K_PICKS
        return next(config for rows, config in table if m <= rows)
    if m > 64 and k:
        return W8A16_SHORT_K_MANY_ROWS
    return W8A16_MANY_ROWS


# a config without a split of its own: 0, w8a16_split's choice; 1, K whole in each
# program. PERF.md v0.98: few tiles (o, qkv and down at 2-64 rows: 64-144 programs on
# 132 SMs) streamed their whole K each at a third to a half of the copy rate; in 4
# slices, o 12.6 -> 9.7 us, qkv 15.6 -> 11.3, down 38.8 -> 24.6 at 4 rows, while gate_up's
# 428-856 tiles gained little or lost (an H100's `bench.w8a16_split_probe`,
# results/w8a16_split_h100.jsonl). 2 slices lost in the swapped config on every shape,
# 5 and 8 less than 4 gained: 4 it is, where tiles are fewer than 2 an SM
W8A16_SPLIT = 0
W8A16_SLICES = 4
W8A16_SPLIT_TILES_PER_SM = 2
W8A16_SLICE_STEPS = 4  # and each slice at least this many BLOCK_K steps


def w8a16_parts(config: W8A16Config) -> tuple[int, int, int, int, int, bool, int]:
    """A config in full: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap, split), its
    split W8A16_SPLIT where it names none."""
    block_m, block_n, block_k, warps, stages, swap, *more = config
    return block_m, block_n, block_k, warps, stages, bool(swap), (*more, W8A16_SPLIT)[0]


def w8a16_split(split: int, tiles: int, steps: int, sms: int) -> int:
    """The slices of K for a product of `tiles` output tiles whose K is `steps` BLOCK_K
    steps, on `sms` SMs: `split` where it is not 0; for 0, W8A16_SLICES where the tiles
    are fewer than W8A16_SPLIT_TILES_PER_SM an SM and each slice has at least
    W8A16_SLICE_STEPS steps, else 1. Never more slices than steps (a last slice may
    still be left empty by the rounding of steps to slices: it adds zeros)."""
    if split == 0:
        few = tiles < W8A16_SPLIT_TILES_PER_SM * sms
        split = W8A16_SLICES if few and steps >= W8A16_SLICES * W8A16_SLICE_STEPS else 1
    return max(1, min(split, steps))


@functools.cache
def _sms(device: torch.device) -> int:
    """The device's SMs (a CPU, for the interpreter's tests: 8)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The sliced kernels' count per output tile, zeros between launches (the last slice
    of a tile sets its count back): one buffer a device, as decode attention's counts
    (attention._kept), made in an eager call (the warm-up before CUDA graphs are
    captured): one made while capturing would be the graph's. Sliced products on one
    device must not run concurrently (one stream)."""
    have = _COUNTERS.get(device)
    if (have is None or have.numel() < tiles) and device.type == "cuda" and (
            torch.cuda.is_current_stream_capturing()):
        raise RuntimeError(
            f"a product in slices of K over {tiles} tiles is first met while a CUDA "
            "graph is being captured; run the step eagerly once before capturing it")
    return _kept(_COUNTERS, device, tiles, torch.int32)


def _slices(split: int, grid: tuple[int, int], steps: int, x: torch.Tensor, n: int,
            unread: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A product's slices of K (w8a16_split's, for a grid of output tiles and K in
    `steps`), and the kernel's P and C: float32 sums [slices * m * n] and the device's
    counts (`unread`, any tensor, for both when K is whole)."""
    split = w8a16_split(split, grid[0] * grid[1], steps, _sms(x.device))
    if split == 1:
        return 1, unread, unread
    return (split, torch.empty(split * x.shape[0] * n, dtype=torch.float32, device=x.device),
            _split_counters(x.device, grid[0] * grid[1]))


def w8a16(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
          bias: torch.Tensor | None = None, config: W8A16Config | None = None
          ) -> torch.Tensor:
    """x [M, K] @ (w8 [N, K] FP8 * scale [N])^T (+ bias) -> [M, N] in x's dtype; `config`
    (one of W8A16_CONFIGS, or with a split of K) in place of the default."""
    m, k = x.shape
    n = w8.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages, swap, split = w8a16_parts(
        config or w8a16_config(m, n=n, k=k))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    split, partial, counts = _slices(split, grid, triton.cdiv(k, block_k), x, n, scale)
    _w8a16_kernel[(*(grid[::-1] if swap else grid), split)](
        x, w8, scale, bias if bias is not None else scale, y, partial, counts, m, n, k,
        x.stride(0), w8.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWAP=swap,
        PREC=_precision(x.dtype), SPLIT=split, num_warps=warps, num_stages=stages,
        **_launch(x))
    return y


# (BLOCK_M, BLOCK_N, warps, stages): the configs `--suite w8a16` times w8a8_groups in
W8A8GroupsConfig = tuple[int, int, int, int]
W8A8_GROUPS_CONFIGS: tuple[W8A8GroupsConfig, ...] = (
    (16, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3))


def w8a8_groups(x8: torch.Tensor, x_scales: torch.Tensor, w8: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16,
                config: W8A8GroupsConfig | None = None) -> torch.Tensor:
    """x8 [M, K] FP8 with x_scales [M, K / group] float32 (fp8.quantize_groups) @ (w8
    [N, K] FP8 * scale [N])^T (+ bias) -> [M, N] in `out_dtype`; K a multiple of group
    (>= 32: an FP8 dot's least K)."""
    m, k = x8.shape
    group = k // x_scales.shape[1]
    if group * x_scales.shape[1] != k or group < 32 or group & (group - 1):
        raise ValueError(f"{k} input columns in {x_scales.shape[1]} groups: each group "
                         "must be a power of two >= 32 columns")
    block_m, block_n, warps, stages = config or W8A8_GROUPS_CONFIGS[2 if m > 16 else 0]
    return _w8a8(x8, x_scales, w8, scale, bias, out_dtype, group, block_m, block_n, warps,
                 stages, tokens=False, swap=False)


# The FP8 products a dot adds in the tensor cores' narrower accumulator before adding them
# into float32: cuBLAS's `_scaled_mm` adds 128 so (its error over K = 13,696 is that of
# the 128-wide configs to 3 digits on the H200, 0.000127; the 256-wide ones, adding all
# 256 so, were at 0.000208 until PERF.md v0.67, and cost -keepqkv 0.5 % of top-1)
FP8_PROMOTE_EVERY = 128


def fp8_promotion(block_k: int) -> int | None:
    """_w8a8_groups_kernel's IMPRECISE for steps (or groups) of `block_k` columns:
    FP8_PROMOTE_EVERY where a step is wider (None: Triton's default, the whole step)."""
    return FP8_PROMOTE_EVERY if block_k > FP8_PROMOTE_EVERY else None


def _w8a8(x8: torch.Tensor, xs: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
          bias: torch.Tensor | None, out_dtype: torch.dtype, group: int, block_m: int,
          block_n: int, warps: int, stages: int, tokens: bool, swap: bool, split: int = 1
          ) -> torch.Tensor:
    """_w8a8_groups_kernel's launch, for w8a8_groups and w8a8_per_token: y [M, N] in
    `out_dtype`, a program a (BLOCK_M rows of x, BLOCK_N rows of W) tile, and with `split`
    (w8a16_split's: 0 for its choice) a slice of K's runs of `group`."""
    m, n = x8.shape[0], w8.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x8.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    split, partial, counts = _slices(split, grid, triton.cdiv(x8.shape[1], group), x8, n,
                                     scale)
    _w8a8_groups_kernel[(*grid, split)](
        x8, xs, w8, scale, bias if bias is not None else scale, y, partial, counts, m, n,
        x8.shape[1], x8.stride(0), xs.stride(0), w8.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
        TOKENS=tokens, SWAP=swap, num_warps=warps, num_stages=stages,
        IMPRECISE=fp8_promotion(group), SPLIT=split, **_launch(x8))
    return y


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the configs `_two_terms_kernel` may run in;
# BLOCK_M counts tokens, each with two rows in the dots (PERF.md v1.03:
# `bench.two_terms_probe` times each beside the unfused two terms)
TwoTermsConfig = tuple[int, int, int, int, int]
TWO_TERMS_CONFIGS: tuple[TwoTermsConfig, ...] = (
    (32, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 8, 3), (64, 256, 128, 8, 3),
    (128, 64, 128, 8, 3), (128, 128, 128, 8, 3), (32, 128, 128, 4, 3))
# the first guess, by tokens (as the one-term (128, 128, 128) tile: 128 rows in the dots)
TWO_TERMS_PICKS: tuple[tuple[int, TwoTermsConfig], ...] = ((1 << 30, (64, 128, 128, 8, 3)),)


def two_terms_config(m: int) -> TwoTermsConfig:
    """The `_two_terms_kernel` config for `m` tokens (TWO_TERMS_PICKS)."""
    return next(config for rows, config in TWO_TERMS_PICKS if m <= rows)


def w8a8_two_terms(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                   scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                   config: TwoTermsConfig | None = None) -> torch.Tensor:
    """x's two FP8 terms (x8 [2M, K], x_scale [2M, 1]: `quantize_two_terms_fp8`'s) @ (w8
    [N, K] FP8 * scale [N])^T (+ bias) -> [M, N] in `out_dtype`: both terms' products
    and their sum in float32, rounded once (PERF.md v1.03)."""
    if x8.shape[0] % 2:
        raise ValueError(f"{x8.shape[0]} rows: two terms a token need an even count")
    m, n, k = x8.shape[0] // 2, w8.shape[0], x8.shape[1]
    block_m, block_n, block_k, warps, stages = config or two_terms_config(m)
    y = torch.empty(m, n, dtype=out_dtype, device=x8.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _two_terms_kernel[grid](
        x8, x_scale, w8, scale, bias if bias is not None else scale, y, m, n, k,
        x8.stride(0), x_scale.stride(0), w8.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IMPRECISE=fp8_promotion(block_k), num_warps=warps, num_stages=stages,
        **_launch(x8))
    return y

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap[, split]): the configs W8A8 with a scale
# per token may run in (`w8a8_tokens`), timed against `torch._scaled_mm` by `pick_w8a8` and
# `--suite w8a8`. Why (PERF.md v0.62): at 16-256 rows cuBLAS's FP8 kernel takes 128x128
# tiles, 36-72 programs for GLM-4-9B's qkv, o and down projections on 132 SMs, each
# streaming a 0.5-1.75 MB run of the weight alone: narrower tiles fill the GPU. Swapped
# ones put the weight on the dot's 64-row side for a few rows of x (their programs then
# number N / 64 below 64 rows: the narrow unswapped tiles are the ones that fill the GPU
# there). The last seven split K into slices, a program each (PERF.md v0.99, as v0.98's
# weight-only matmul): 128 (or 256) wide tiles, 128-256 programs on o and down at 256
# rows, and the swapped ones below 64 rows, in 4 (or 2) times as many programs.
W8A8TokensConfig = tuple[int, ...]
W8A8_TOKENS_CONFIGS: tuple[W8A8TokensConfig, ...] = (
    (64, 64, 128, 4, 4, False), (64, 128, 128, 4, 4, False), (128, 64, 128, 4, 4, False),
    (128, 128, 128, 8, 3, False), (64, 32, 128, 4, 4, False), (128, 64, 256, 8, 3, False),
    (64, 16, 128, 4, 4, False),  # (256-288 programs on N = 4,096-4,608 at any rows)
    (16, 64, 128, 4, 4, True), (32, 64, 128, 4, 4, True), (64, 64, 128, 4, 4, True),
    (32, 128, 128, 4, 4, True), (64, 128, 128, 8, 3, True), (16, 64, 256, 4, 3, True),
    (128, 64, 256, 8, 3, False, 2), (128, 64, 256, 8, 3, False, 4),
    (128, 64, 128, 4, 4, False, 4), (64, 64, 128, 4, 4, False, 4),
    (128, 128, 128, 8, 3, False, 4), (64, 64, 128, 4, 4, True, 4),
    (16, 64, 256, 4, 3, True, 4))


def w8a8_per_token(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                   scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                   config: W8A8TokensConfig) -> torch.Tensor:
    """x8 [M, K] FP8 with a scale per token (x_scale [M, 1] float32) @ (w8 [N, K] FP8 *
    scale [N])^T (+ bias) -> [M, N] in `out_dtype`, rounded once, on the FP8 tensor
    cores in `config` (one of W8A8_TOKENS_CONFIGS): what `torch._scaled_mm` computes."""
    block_m, block_n, block_k, warps, stages, swap, *more = config
    return _w8a8(x8, x_scale, w8, scale, bias, out_dtype, block_k, block_m, block_n, warps,
                 stages, tokens=True, swap=bool(swap), split=(*more, 1)[0])


# The picks `pick_w8a8` measured, by weight shape (N, K), per process (each rank its own;
# parallel.tune_gemv fills it, layers of one shape share it): ((up to this many rows, a
# config or None for `_scaled_mm`), ...) by rows. A shape without picks, and more rows
# than its last pick's, go to `_scaled_mm` (a prefill's thousands of rows: cuBLAS's large
# tiles fill the GPU there).
# ("streams", parts): `_scaled_mm` on `parts` runs of K at once, each on a CUDA stream of
# its own, their 16-bit products added; ("swap", 1): `_scaled_mm` of y^T = W x^T, the
# weight on cuBLAS's long side. `w8a8_cublas`'s configs, timed by `--suite w8a8` beside
# the picks (PERF.md v0.71): at 128-256 rows cuBLAS's 128 x 128 tiles keep half the SMs
# idle on GLM-4-9B's qkv, o and down; two or four of them side by side fill them with
# cuBLAS's own tile rate, which v0.68's Triton tiles lacked.
W8A8CublasConfig = tuple[str, int]
W8A8_CUBLAS_CONFIGS: tuple[W8A8CublasConfig, ...] = (
    ("streams", 2), ("streams", 4), ("swap", 1))


def w8a8_cublas_on() -> bool:
    """Whether the picks may take W8A8_CUBLAS_CONFIGS (off with TPSERVE_W8A8_CUBLAS=0: an
    A/B of PERF.md v0.71 in one process; kept picks are keyed by it)."""
    return os.environ.get("TPSERVE_W8A8_CUBLAS") != "0"


def w8a8_candidates() -> tuple[str, tuple[Any, ...]]:
    """What `pick_w8a8` times beside `_scaled_mm`, with the kept picks' key for them:
    W8A8_TOKENS_CONFIGS (those in slices of K unless TPSERVE_W8A8_SLICES=0, PERF.md
    v0.99's A/B) and W8A8_CUBLAS_CONFIGS (unless TPSERVE_W8A8_CUBLAS=0)."""
    slices = os.environ.get("TPSERVE_W8A8_SLICES") != "0"
    tiles = tuple(c for c in W8A8_TOKENS_CONFIGS if slices or len(c) < 7)
    cublas = W8A8_CUBLAS_CONFIGS if w8a8_cublas_on() else ()
    key = "w8a8" + ("" if cublas else " no-cublas") + ("" if slices else " no-slices")
    return key, tiles + cublas


# cuBLASLt's workspace in KiB for a W8A8 engine's process on GPUs (PERF.md v0.79). With
# PyTorch's default (1,024) cuBLAS runs a 256-row decode step's gate_up product (N =
# 27,392) as a kernel whose workspace is zeroed first: a memset node in each layer of the
# decode graph, around which the GPU sat idle ~8 us (0.3 ms of an 8.8 ms step). Without a
# workspace cuBLAS picks a kernel that needs none (~1.6 us slower alone): the step 1.3-1.8 %
# faster, the 8192-token prefill unchanged. bf16 engines keep PyTorch's default (their
# runs with 0 were 1-2 % slower).
W8A8_CUBLASLT_WORKSPACE_KIB = "0"


def settle_cublaslt_workspace(quantization: str, device: torch.device) -> str | None:
    """For a W8A8 engine on a GPU, $CUBLASLT_WORKSPACE_SIZE (KiB) as the engine wants it,
    unless it is set already (the caller's value stands); None elsewhere, the environment
    untouched. PyTorch reads it once, at the process's first cuBLASLt product: the engine's
    processes (each rank's, the cluster's engine process) make none before the Worker."""
    if quantization != "fp8-w8a8" or device.type != "cuda":
        return None
    return os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", W8A8_CUBLASLT_WORKSPACE_KIB)


# per device: the side streams `w8a8_cublas` forks to (made once, outside a capture)
_SIDE_STREAMS: dict[torch.device, list[torch.cuda.Stream]] = {}


@dataclass
class RunSum:
    """A W8A8 product in runs of K (`w8a8_cublas`'s "streams") whose 16-bit products are
    not yet added (PERF.md v0.80), or weight-only FP8's two terms' products (v1.04): the
    next RMSNorm adds two of them as it reads its rows (`rms_norm`'s and
    `rms_norm_quantize_fp8`'s `extra`), SwiGLU gate_up's (`silu_and_mul`'s `extra`),
    instead of an add kernel of its own; any other reader takes `total()`."""

    parts: list[torch.Tensor]

    def total(self) -> torch.Tensor:
        """The sum as `w8a8_cublas` makes it: the first part, each other added into it
        (in place: call it once)."""
        y = self.parts[0]
        for part in self.parts[1:]:
            y += part
        return y


def fold_runs_on() -> bool:
    """Whether a W8A8 row-parallel product at tp=1 leaves its runs of K for the next norm
    to add (PERF.md v0.80; off with TPSERVE_W8A8_FOLD=0: an A/B in one process)."""
    return os.environ.get("TPSERVE_W8A8_FOLD") != "0"


def fast_accum_on() -> bool:
    """Whether a plain W8A8 `_scaled_mm` accumulates in the tensor cores' fast mode: on
    unless TPSERVE_W8A8_FAST_ACCUM=0 (PERF.md v0.82 measured it, v0.83 turned it on: the
    teacher-forced top-1 moved +0.05 to +0.10 points with it. Read at each call, an A/B
    in one process)."""
    return os.environ.get("TPSERVE_W8A8_FAST_ACCUM") != "0"


def w8a8_cublas(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                config: W8A8CublasConfig, defer: bool = False) -> torch.Tensor | RunSum:
    """What `w8a8_per_token` computes, through `torch._scaled_mm` as one of
    W8A8_CUBLAS_CONFIGS says: K in `parts` runs (each a multiple of 16 long) whose
    products, each rounded to out_dtype, are added (on side streams on a GPU, so that the
    runs' tiles share the SMs), or the transposed product. The bias is added last.
    `defer` (no bias): runs of K are returned unadded, as a RunSum."""
    kind, parts = config
    m, k = x8.shape
    if kind == "swap":
        y = torch._scaled_mm(w8, x8.t(), scale_a=scale.view(-1, 1).float(),
                             scale_b=x_scale.view(1, -1).float(), out_dtype=out_dtype).t()
    elif kind == "streams":
        step = -(-k // (parts * 16)) * 16
        bounds = [(lo, min(lo + step, k)) for lo in range(0, k, step)]
        if len(bounds) != parts or k % 16:
            raise ValueError(f"K = {k} does not split into {parts} runs of multiples of 16")
        # every run's product is allocated on this stream, so no block is freed while a
        # side stream may still write it (this stream waits for them before the sum)
        outs = [torch.empty(m, w8.shape[0], dtype=out_dtype, device=x8.device)
                for _ in bounds]

        def run(i: int) -> None:
            lo, hi = bounds[i]
            torch._scaled_mm(x8[:, lo:hi], w8[:, lo:hi].t(), scale_a=x_scale,
                             scale_b=scale.view(1, -1), out_dtype=out_dtype, out=outs[i])

        if not x8.is_cuda:
            for i in range(parts):
                run(i)
        else:
            here = torch.cuda.current_stream(x8.device)
            side = _SIDE_STREAMS.setdefault(x8.device, [])
            while len(side) < parts - 1:
                side.append(torch.cuda.Stream(x8.device))
            for i, stream in enumerate(side[:parts - 1], start=1):
                stream.wait_stream(here)
                with torch.cuda.stream(stream):
                    run(i)
            run(0)
            for stream in side[:parts - 1]:
                here.wait_stream(stream)
        if defer and bias is None:
            return RunSum(outs)
        y = RunSum(outs).total()
    else:
        raise ValueError(f"unknown W8A8 cuBLAS config {config}")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.contiguous()


# a W8A8 pick: a Triton tile (W8A8_TOKENS_CONFIGS) or a way through cuBLAS
# (W8A8_CUBLAS_CONFIGS); None: one plain `_scaled_mm`
W8A8PickConfig = W8A8TokensConfig | W8A8CublasConfig
W8A8_PICKS: dict[tuple[int, int], tuple[tuple[int, W8A8PickConfig | None], ...]] = {}


def w8a8_picked(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                config: W8A8PickConfig, defer: bool = False) -> torch.Tensor | RunSum:
    """The product in a picked `config`: `w8a8_cublas` for one of W8A8_CUBLAS_CONFIGS
    (`defer`: as it says), else `w8a8_per_token`'s Triton tile."""
    if isinstance(config[0], str):
        return w8a8_cublas(x8, x_scale, w8, scale, bias, out_dtype, config,  # type: ignore[arg-type]
                           defer)
    return w8a8_per_token(x8, x_scale, w8, scale, bias, out_dtype, config)  # type: ignore[arg-type]


W8A8_PICK_ROWS = (16, 64, 128, 256)  # a decode step's rows the picks are timed at


def w8a8_config(n: int, k: int, m: int) -> W8A8PickConfig | None:
    """The config W8A8_PICKS holds for `m` rows times an (n, k) weight, else None."""
    return next((config for rows, config in W8A8_PICKS.get((n, k), ()) if m <= rows), None)


def pick_w8a8(w8: torch.Tensor, scale: torch.Tensor, has_bias: bool,
              rows: tuple[int, ...] = W8A8_PICK_ROWS, margin: float = 0.97
              ) -> tuple[tuple[tuple[int, Any], ...], dict[int, dict[str, float]]]:
    """Time `torch._scaled_mm` and each of `w8a8_candidates` (W8A8_TOKENS_CONFIGS and
    W8A8_CUBLAS_CONFIGS, through w8a8_picked) on
    `rows` rows of a per-token FP8 input times the FP8 weight w8 [N, K] (its row `scale`),
    bf16 out, as a decode step runs them: weights cold (copies cycled), in a CUDA graph.
    Each config's product is checked against `_scaled_mm`'s. Returns, per count of rows,
    the fastest config if it beats `_scaled_mm` by the margin (else None), and the times
    in us."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from replicas.kernels.gemv import _cycled_us, cold_set
    from replicas.kernels.quant import quantize_tokens_fp8

    n, k = w8.shape
    gen = torch.Generator(device=w8.device).manual_seed(n + k)
    bias = (torch.randn(n, generator=gen, device=w8.device, dtype=torch.bfloat16)
            if has_bias else None)
    copies = cold_set(w8)
    picks, report = [], {}
    candidates = w8a8_candidates()[1]
    for m in rows:
        x8, xs = quantize_tokens_fp8(torch.randn(m, k, generator=gen, device=w8.device,
                                                 dtype=torch.bfloat16))

        def cublas(w: torch.Tensor, x8: torch.Tensor = x8, xs: torch.Tensor = xs
                   ) -> torch.Tensor:
            return torch._scaled_mm(x8, w.t(), scale_a=xs, scale_b=scale.view(1, -1),
                                    bias=bias, out_dtype=torch.bfloat16)

        want = cublas(w8).float()
        runs = {"scaled_mm": cublas}
        configs = []
        for config in candidates:
            try:
                got = w8a8_picked(x8, xs, w8, scale, bias, torch.bfloat16, config)
            except (OutOfResources, CompilationError, ValueError) as e:  # a tile this GPU
                # (or this Triton) cannot build, a K the runs do not divide: not a
                # candidate here
                log.warning("W8A8 config %s not built on %s: %s", config, (m, n, k),
                            str(e).splitlines()[-1] if str(e) else type(e).__name__)
                continue
            if not torch.allclose(got.float(), want, rtol=2e-2,
                                  atol=2e-2 * float(want.abs().max())):
                raise AssertionError(f"W8A8 {config} disagrees with _scaled_mm on "
                                     f"{(m, n, k)}")
            configs.append(config)
            runs[str(config)] = functools.partial(
                lambda w, x8, xs, config: w8a8_picked(x8, xs, w, scale, bias,
                                                      torch.bfloat16, config),
                x8=x8, xs=xs, config=config)
        times = {name: _cycled_us(fn, copies) for name, fn in runs.items()}
        best = min(configs, key=lambda c: times[str(c)], default=None)
        picks.append((m, best if best is not None
                      and times[str(best)] < margin * times["scaled_mm"] else None))
        report[m] = times
    return tuple(picks), report
