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
    def _silu_mul_kernel(GU, OUT, n, sg, so, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(GU + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + row * sg + n + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * so + cols, (act * u).to(OUT.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0),
                                                 out.stride(0), BLOCK=block, num_warps=4,
                                                 **_launch(gate_up))
    return out
