"""SwiGLU: silu(gate) * up, rounded as transformers rounds it."""

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
    def _silu_mul_kernel(GU, GU2, OUT, n, sg, sg2, so, BLOCK: tl.constexpr,
                         PDL: tl.constexpr, HAS_X2: tl.constexpr = False):
        """silu(gate) * up of a row of GU = [gate | up] (HAS_X2: of GU + GU2, each sum
        rounded to GU's dtype as PyTorch's add rounds it)."""
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(GU + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + row * sg + n + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_X2:
            g += tl.load(GU2 + row * sg2 + cols, mask=ok, other=0.0).to(tl.float32)
            u += tl.load(GU2 + row * sg2 + n + cols, mask=ok, other=0.0).to(tl.float32)
            g = g.to(GU.dtype.element_ty).to(tl.float32)
            u = u.to(GU.dtype.element_ty).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * so + cols, (act * u).to(OUT.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim; with `extra` (of
    gate_up's shape), of gate_up + extra, added as the kernel reads them and rounded as
    PyTorch's add rounds (weight-only FP8's two terms' products, PERF.md v1.04)."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    if extra is not None and extra.shape != gate_up.shape:
        raise ValueError(f"extra {tuple(extra.shape)} is not gate_up's {tuple(gate_up.shape)}")
    two = extra if extra is not None else gate_up
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, two, out, n, gate_up.stride(0),
                                                 two.stride(0), out.stride(0), BLOCK=block,
                                                 HAS_X2=extra is not None, num_warps=4,
                                                 **_launch(gate_up))
    return out
