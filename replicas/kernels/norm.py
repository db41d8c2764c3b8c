"""RMSNorm, with the residual add fused in: one program per row."""

from __future__ import annotations

import torch

from replicas.kernels.common import _launch, _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, ROUT, n, eps, sx, sr, sy, sro,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
            x = x.to(Y.dtype.element_ty)  # the reference adds in the model dtype
            tl.store(ROUT + row * sro + cols, x, mask=ok)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        y = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, (y * w).to(Y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual) * weight, x + residual), or (norm(x) * weight, None); rows of
    the last dim, each one program."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty_like(x2)
    r_out = torch.empty_like(x2) if residual is not None else y
    r = residual.reshape(-1, n) if residual is not None else x2
    block = _pow2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r, weight, y, r_out, n, eps, x2.stride(0), r.stride(0), y.stride(0),
        r_out.stride(0), HAS_RES=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)), **_launch(x))
    return y.view(x.shape), (r_out.view(x.shape) if residual is not None else None)
