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
    def _silu_mul_kernel(GU, OUT, AMAX, n, sg, so, BLOCK: tl.constexpr, PDL: tl.constexpr,
                         WITH_MAX: tl.constexpr = False):
        """Program (row, BLOCK columns): silu(gate) * up, rounded as transformers rounds
        it. WITH_MAX: also the block's max |out| into AMAX[row] (an atomic maximum over
        the row's blocks; AMAX zeroed before), for a per-token quantization after."""
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(GU + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + row * sg + n + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        y = (act * u).to(OUT.dtype.element_ty)
        tl.store(OUT + row * so + cols, y, mask=ok)
        if WITH_MAX:
            top = tl.max(tl.where(ok, tl.abs(y.to(tl.float32)), 0.0), axis=0)
            tl.atomic_max(AMAX + row, top)


def silu_and_mul(gate_up: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim; `amax` (float32
    [rows], zeros) given: each row's max |result| written into it too."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](
        gate_up, out, amax if amax is not None else out, n, gate_up.stride(0), out.stride(0),
        BLOCK=block, WITH_MAX=amax is not None, num_warps=4, **_launch(gate_up))
    return out
