"""The row-wise kernels (RMSNorm with its residual add, SwiGLU: one program a row) in
PyTorch for a test: in Triton's interpreter they are about half of an engine test's time
(a program a row, each interpreted), and neither their launches nor their results depend
on the KV cache's dtype or on how attention runs. So a test parametrized over those runs
them through the kernels in one of its variants and through PyTorch (the model's own
non-Triton path) in the others."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What kernels.rms_norm returns, as the model's PyTorch path computes it."""
    s = x if residual is None else x + residual
    normed = F.rms_norm(s.float(), (s.shape[-1],), eps=eps)
    return weight * normed.to(s.dtype), None if residual is None else s


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """What kernels.silu_and_mul returns, as the model's PyTorch path computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rows_in_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the test ends, kernels.rms_norm and kernels.silu_and_mul run in PyTorch (the
    other kernels stay Triton's)."""
    from replicas import kernels

    monkeypatch.setattr(kernels, "rms_norm", rms_norm)
    monkeypatch.setattr(kernels, "silu_and_mul", silu_and_mul)
