"""Per-token FP8 quantization of activations in one kernel: x [M, K] (16-bit or float32)
-> x8 [M, K] float8_e4m3fn and scale [M, 1] float32, the scale of a row max|x| / 448 (1
for a zero row), each element x / scale saturated at +-448 (`replicas/fp8.py`'s
`quantize_tokens`, the W8A8 path's input; that chain is seven PyTorch kernels with
float32 intermediates of the whole activation, this one pass reads x twice from L2).
One program a row: the row's max over K in BLOCK_K steps, then the same steps again,
divided and rounded (round to nearest even, as PyTorch's cast)."""

from __future__ import annotations

import torch

from replicas.kernels.common import _launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None

QUANT_BLOCK_K = 1024

if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _quant_rows_kernel(X, Y, S, k, sxm, sym, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Program (row): its max |x| in float32, then x / scale saturated, in FP8
        (448: e4m3's largest finite value, replicas/fp8.py FP8_MAX)."""
        _pdl_enter(PDL)
        row = tl.program_id(0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        top = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            x = tl.load(X + row * sxm + k0 + rk, mask=(k0 + rk) < k, other=0.0)
            top = tl.maximum(top, tl.abs(x.to(tl.float32)))
        amax = tl.max(top, axis=0)
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        for k0 in range(0, k, BLOCK_K):
            ok = (k0 + rk) < k
            x = tl.load(X + row * sxm + k0 + rk, mask=ok, other=0.0).to(tl.float32)
            y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
            tl.store(Y + row * sym + k0 + rk, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(S + row, scale)


def quantize_tokens_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] float32): see the module doc."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    x8 = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_kernel[(m,)](x, x8, scale, k, x.stride(0), x8.stride(0),
                                 BLOCK_K=QUANT_BLOCK_K, num_warps=4, **_launch(x))
    return x8, scale
