"""RMSNorm, with the residual add fused in: one program per row. `rms_norm_quantize_fp8`:
the same, its output quantized to FP8 with a scale per row in the same pass (a W8A8
projection's input: the 16-bit output is neither written nor read back), or in two FP8
terms (weight-only FP8's input from fp8.TWO_TERM_ROWS rows, PERF.md v1.06)."""

from __future__ import annotations

import torch

from replicas.kernels.common import _launch, _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


if triton is not None:
    from replicas.kernels.common import STEP_SHAPED, _pdl_enter
    from replicas.kernels.quant import _row_scale, _store_fp8, _store_two_terms

    @triton.jit(do_not_specialize=STEP_SHAPED["_rms_norm_kernel"])
    def _rms_norm_kernel(X, X2, R, W, Y, ROUT, S, m, n, eps, sx, sx2, sr, sy, sro,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
                         PDL: tl.constexpr, HAS_X2: tl.constexpr = False,
                         TWO: tl.constexpr = False):
        """Row: norm(x + r) * w in x's dtype (x + r stored to ROUT); QUANT: that row
        quantized as _quant_rows_kernel does (Y FP8, its scale to S); with TWO, its two
        FP8 terms as _quant_two_kernel writes them (Y [2m, n], S [2m]; PERF.md v1.06).
        HAS_X2: x is itself the sum of two rows, X's and X2's, rounded to x's dtype as
        PyTorch's add rounds it (a W8A8 product's two runs of K, PERF.md v0.80)."""
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_X2:
            x += tl.load(X2 + row * sx2 + cols, mask=ok, other=0.0).to(tl.float32)
            x = x.to(X.dtype.element_ty).to(tl.float32)
        if HAS_RES:
            x += tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
            x = x.to(X.dtype.element_ty)  # the reference adds in the model dtype
            tl.store(ROUT + row * sro + cols, x, mask=ok)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        y = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        h = (y * w).to(X.dtype.element_ty)
        if QUANT and TWO:
            _store_two_terms(Y, S, row, m, sy, cols, ok, h.to(tl.float32))
        elif QUANT:
            h = h.to(tl.float32)
            scale = _row_scale(tl.max(tl.abs(h), axis=0))
            _store_fp8(Y + row * sy, cols, ok, h, scale)
            tl.store(S + row, scale)
        else:
            tl.store(Y + row * sy + cols, h, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, extra: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual) * weight, x + residual), or (norm(x) * weight, None); rows of
    the last dim, each one program. `extra` (with a residual): x stands for x + extra,
    added as PyTorch adds them (PERF.md v0.80: a W8A8 product's two runs of K)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty_like(x2)
    r_out = torch.empty_like(x2) if residual is not None else y
    _launch_norm(x2, weight, eps, residual, y, r_out, y, _rows(extra, n, residual))
    return y.view(x.shape), (r_out.view(x.shape) if residual is not None else None)


def rms_norm_quantize_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                          residual: torch.Tensor | None = None,
                          extra: torch.Tensor | None = None, two: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] float32, x + residual (x
    itself without one)): `quantize_tokens_fp8(rms_norm(x, weight, eps, residual)[0])`
    bit for bit, in one pass that never writes the normed 16-bit row. `extra` as
    rms_norm's. `two`: the normed row's two FP8 terms instead (x8 [2M, K], scale [2M,
    1]), `quantize_two_terms_fp8` of it bit for bit (PERF.md v1.06)."""
    m, n = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    terms = 2 if two else 1
    x8 = torch.empty(terms * m, n, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(terms * m, 1, dtype=torch.float32, device=x.device)
    r_out = torch.empty_like(x) if residual is not None else x
    if m:
        _launch_norm(x, weight, eps, residual, x8, r_out, scale, _rows(extra, n, residual),
                     two)
    return x8, scale, r_out


def _rows(extra: torch.Tensor | None, n: int, residual: torch.Tensor | None
          ) -> torch.Tensor | None:
    """`extra` as rows of n, unit stride along them; it needs a residual (the sum x +
    extra is only ever stored as the residual stream)."""
    if extra is None:
        return None
    if residual is None:
        raise ValueError("extra rows are added only with a residual")
    rows = extra.reshape(-1, n)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _launch_norm(x2: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None, y: torch.Tensor, r_out: torch.Tensor,
                 scale: torch.Tensor, extra: torch.Tensor | None = None,
                 two: bool = False) -> None:
    """_rms_norm_kernel over the rows of x2 (plus those of `extra`) into y (FP8, with
    `scale`, when y is; its two terms with `two`); a row a program, a warp per 256
    columns (1 to 16)."""
    n = x2.shape[1]
    r = residual.reshape(-1, n) if residual is not None else x2
    x_b = extra if extra is not None else x2
    block = _pow2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, x_b, r, weight, y, r_out, scale, x2.shape[0], n, eps, x2.stride(0),
        x_b.stride(0), r.stride(0), y.stride(0), r_out.stride(0),
        HAS_RES=residual is not None, BLOCK=block, QUANT=y.dtype == torch.float8_e4m3fn,
        HAS_X2=extra is not None, TWO=two, num_warps=min(16, max(1, block // 256)),
        **_launch(x2))
