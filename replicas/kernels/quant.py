"""FP8 <-> 16-bit in one pass each.

`quantize_tokens_fp8`: per-token FP8 quantization of activations: x [M, K] (16-bit or float32)
-> x8 [M, K] float8_e4m3fn and scale [M, 1] float32, the scale of a row max|x| / 448 (1
for a zero row), each element x / scale saturated at +-448 (`replicas/fp8.py`'s
`quantize_tokens`, the W8A8 path's input; that chain is seven PyTorch kernels with
float32 intermediates of the whole activation, this one pass reads x twice from L2).
One program a row: a row of up to ONE_PASS_MAX_K read once into registers, its max,
then divided and rounded (round to nearest even, as PyTorch's cast); a longer row's max
over K in BLOCK_K steps, then the same steps again.

`quantize_two_terms_fp8`: that quantization and its residual's, each row's two FP8
terms with a scale each (weight-only FP8 on FP8 tensor cores, `replicas/fp8.py`'s
TWO_TERM_ROWS): x [M, K] -> [2M, K], one pass a row.

`silu_mul_quantize_fp8`: SwiGLU and that quantization in one pass, for a W8A8 down_proj:
the 16-bit activation (an 8192-token prefill of GLM-4-9B: 224 MB a layer) is neither
written nor read back; the row's gate_up is read twice, the second time from L2.

`widen_fp8`: an FP8 weight [N, K] with its row scales -> the 16-bit weight, bit for bit
`w8.to(dtype) * scale[:, None].to(dtype)` (weight-only FP8's long prefills: fp8_linear
widens each layer's weight once a step and runs one 16-bit matmul). PyTorch does that in
two elementwise kernels and a temporary, ~7 bytes of traffic a weight; this reads 1 and
writes 2."""

from __future__ import annotations

import os
from typing import Any

import torch

from replicas.kernels.common import STEP_SHAPED, _launch, _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None

QUANT_BLOCK_K = 1024  # a two-pass row's block
# rows up to this long are one block, read once (a decode step's few hundred rows: two
# passes of 1024-wide blocks were 8 dependent loads a program, ~11 us a call on the H200
# where the bytes take ~1 us; PERF.md v0.59)
ONE_PASS_MAX_K = 16384
WIDEN_BLOCK = (16, 512)  # rows x columns a program
QUANT_WARPS = (1, 2, 4, 8, 16, 32)  # what $TPSERVE_QUANT_WARPS may say


def quant_warps(block: int) -> int:
    """The warps of a row-quantizing program (`_quant_rows_kernel`, `_quant_two_kernel`,
    `_silu_mul_quant_kernel`) with a block of `block` columns: 32 from 4,096 columns, 4
    below; $TPSERVE_QUANT_WARPS (read at each launch; 0 or unset: that rule) sets them
    for all three (PERF.md v1.05: a decode step's rows are one program each, whose chain
    of loads, row max, divisions and stores is bound by latency, not bytes; 32 warps were
    the fastest or within 6 % of it for each kernel at 64-256 rows on an H100, and won
    in the step; below 4,096 columns is unmeasured, and keeps the earlier rule's 4)."""
    text = os.environ.get("TPSERVE_QUANT_WARPS", "").strip()
    if text and text != "0":
        if not text.isdigit() or int(text) not in QUANT_WARPS:
            raise ValueError(f"TPSERVE_QUANT_WARPS={text!r}: one of "
                             f"{', '.join(map(str, QUANT_WARPS))} (0: by the block)")
        return int(text)
    return 32 if block >= 4096 else 4


if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _quant_rows_kernel(X, Y, S, k, sxm, sym, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                           PDL: tl.constexpr):
        """Program (row): its max |x| in float32, then x / scale saturated, in FP8
        (448: e4m3's largest finite value, replicas/fp8.py FP8_MAX). ONE_PASS: the row is
        one block (BLOCK_K >= k), read once and kept in registers; else two passes over
        it in BLOCK_K steps."""
        _pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            x = tl.load(X + row * sxm + rk, mask=rk < k, other=0.0).to(tl.float32)
            scale = _row_scale(tl.max(tl.abs(x), axis=0))
            _store_fp8(Y + row * sym, rk, rk < k, x, scale)
        else:
            top = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                x = tl.load(X + row * sxm + k0 + rk, mask=(k0 + rk) < k, other=0.0)
                top = tl.maximum(top, tl.abs(x.to(tl.float32)))
            scale = _row_scale(tl.max(top, axis=0))
            for k0 in range(0, k, BLOCK_K):
                ok = (k0 + rk) < k
                x = tl.load(X + row * sxm + k0 + rk, mask=ok, other=0.0).to(tl.float32)
                _store_fp8(Y + row * sym, k0 + rk, ok, x, scale)
        tl.store(S + row, scale)

    @triton.jit(do_not_specialize=STEP_SHAPED["_quant_two_kernel"])
    def _quant_two_kernel(X, Y, S, m, k, sxm, sym, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr):
        """Program (row, one block): the row's two FP8 terms (_store_two_terms)."""
        _pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        ok = rk < k
        x = tl.load(X + row * sxm + rk, mask=ok, other=0.0).to(tl.float32)
        _store_two_terms(Y, S, row, m, sym, rk, ok, x)

    @triton.jit
    def _store_two_terms(Y, S, row, m, sym, cols, ok, x):
        """A row's values x (float32, in registers; 0 where not `ok`) quantized as
        _quant_rows_kernel does into row `row` of Y (scale S[row]), then its residual x -
        hi * scale (one fma: one rounding in float32) quantized the same way into row m +
        row (S[m + row])."""
        row = row.to(tl.int64)
        scale = _row_scale(tl.max(tl.abs(x), axis=0))
        hi = _store_fp8(Y + row * sym, cols, ok, x, scale)
        tl.store(S + row, scale)
        rest = tl.math.fma(-hi.to(tl.float32), scale, x)
        scale2 = _row_scale(tl.max(tl.abs(rest), axis=0))
        _store_fp8(Y + (m + row) * sym, cols, ok, rest, scale2)
        tl.store(S + m + row, scale2)

    @triton.jit
    def _row_scale(amax):
        """A row's scale from its max |x|: amax / 448, 1 for a zero row. IEEE division (a
        GPU's `/` is approximate: div.full), so that a GPU rounds as PyTorch's chain does."""
        return tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)

    @triton.jit
    def _store_fp8(Y, cols, ok, x, scale):
        """x / scale (IEEE), saturated at +-448, stored at Y + cols in Y's FP8; returns
        the FP8 values stored."""
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0).to(
            Y.dtype.element_ty)
        tl.store(Y + cols, y, mask=ok)
        return y

    @triton.jit
    def _silu_mul_quant_kernel(GU, Y, S, n, sg, sym, BLOCK_K: tl.constexpr,
                               ONE_PASS: tl.constexpr, PDL: tl.constexpr):
        """Program (row): a = silu(gate) * up of gate_up = [gate | up], rounded as
        _silu_mul_kernel rounds it (to Y's 16-bit source dtype, GU's), its max |a|, then
        a divided and rounded to FP8 as _quant_rows_kernel does. ONE_PASS: the row is one
        block, computed once; else a is recomputed for the second pass (the row's gate_up
        read twice, the second time from L2)."""
        _pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            a = _swiglu(GU, row * sg, rk, n)
            scale = _row_scale(tl.max(tl.abs(a), axis=0))
            _store_fp8(Y + row * sym, rk, rk < n, a, scale)
        else:
            top = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, n, BLOCK_K):
                a = _swiglu(GU, row * sg, k0 + rk, n)
                top = tl.maximum(top, tl.abs(a))
            scale = _row_scale(tl.max(top, axis=0))
            for k0 in range(0, n, BLOCK_K):
                a = _swiglu(GU, row * sg, k0 + rk, n)
                _store_fp8(Y + row * sym, k0 + rk, (k0 + rk) < n, a, scale)
        tl.store(S + row, scale)

    @triton.jit
    def _swiglu(GU, start, cols, n):
        """silu(gate) * up at `cols` of the row at GU + start, float32 of its 16-bit
        rounding (the expression _silu_mul_kernel compiles)."""
        ok = cols < n
        g = tl.load(GU + start + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + start + n + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(GU.dtype.element_ty).to(tl.float32)
        return (act * u).to(GU.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _widen_kernel(W, S, Y, n, k, swn, syn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr):
        """Program (row block, column block): y = w * scale[row] (the scale already in Y's
        dtype, as PyTorch's second kernel takes it), the product rounded once."""
        _pdl_enter(PDL)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (rows < n)[:, None] & (cols < k)[None, :]
        s = tl.load(S + rows, mask=rows < n, other=1.0).to(tl.float32)  # (16-bit already)
        w = tl.load(W + rows[:, None] * swn + cols[None, :], mask=ok, other=0.0)
        y = w.to(tl.float32) * s[:, None]
        tl.store(Y + rows[:, None] * syn + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def quantize_tokens_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] float32): see the module doc."""
    return _per_token(_quant_rows_kernel, x, x.shape[1])


def quantize_two_terms_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [2M, K] float8_e4m3fn, scale [2M, 1] float32): rows 0..M-1 x
    quantized per token (quantize_tokens_fp8's), rows M..2M-1 the residual of that
    rounding quantized per token, bit for bit `replicas/fp8.py`'s `quantize_two_terms`;
    one pass a row up to ONE_PASS_MAX_K columns, that reference (PyTorch) beyond."""
    m, k = x.shape
    if k > ONE_PASS_MAX_K:
        from replicas.fp8 import quantize_two_terms

        return quantize_two_terms(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    x8 = torch.empty(2 * m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(2 * m, 1, dtype=torch.float32, device=x.device)
    block = _pow2(k)
    if m:
        _quant_two_kernel[(m,)](x, x8, scale, m, k, x.stride(0), x8.stride(0),
                                BLOCK_K=block, num_warps=quant_warps(block),
                                **_launch(x))
    return x8, scale


def silu_mul_quantize_fp8(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [M, 2N] -> (x8 [M, N] float8_e4m3fn, scale [M, 1] float32):
    `quantize_tokens_fp8(silu_and_mul(gate_up))` bit for bit, in one pass that never
    writes the 16-bit activation (a W8A8 down_proj's input: see the module doc)."""
    return _per_token(_silu_mul_quant_kernel, gate_up, gate_up.shape[1] // 2)


def _per_token(kernel: Any, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [M, k] FP8, scale [M, 1] float32) from `kernel`, one program a row of x: the
    row in one block up to ONE_PASS_MAX_K (`quant_warps`), else two passes of
    QUANT_BLOCK_K."""
    m = x.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    x8 = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    one_pass = k <= ONE_PASS_MAX_K
    block = _pow2(k) if one_pass else QUANT_BLOCK_K
    if m:
        kernel[(m,)](x, x8, scale, k, x.stride(0), x8.stride(0), BLOCK_K=block,
                     ONE_PASS=one_pass, num_warps=quant_warps(block),
                     **_launch(x))
    return x8, scale


def widen_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w8 [N, K] float8_e4m3fn, scale [N] float32 -> [N, K] in `dtype` (16-bit): see the
    module doc."""
    n, k = w8.shape
    w8 = w8 if w8.stride(1) == 1 else w8.contiguous()
    y = torch.empty(n, k, dtype=dtype, device=w8.device)
    bn, bk = WIDEN_BLOCK
    if n and k:
        _widen_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
            w8, scale.to(dtype), y, n, k, w8.stride(0), y.stride(0), BLOCK_N=bn,
            BLOCK_K=bk, num_warps=4, **_launch(y))
    return y
