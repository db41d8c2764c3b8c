"""A kernel that only reads: every byte of a buffer, summed (as 64-bit words) into one
word a program. The bench's read floor (PERF.md v0.91): how long the GPU takes to read a
weight's bytes once, launched as the GEMVs are (in a graph, with PDL), against which each
GEMV's time says how much of it is not the reading."""

from __future__ import annotations

import torch

from replicas.kernels.common import _launch, _pdl_enter, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _read_kernel(X, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                     PDL: tl.constexpr):
        """Program p reads words [p * BLOCK * ITERS, (p + 1) * BLOCK * ITERS) of X's n
        (the last program masked) and stores their wrapping sum to OUT[p]."""
        base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        offs = base + tl.arange(0, BLOCK)
        acc = tl.load(X + offs, mask=offs < n, other=0)
        _pdl_enter(PDL)  # (the first tile in flight before the wait, as a GEMV's)
        for i in range(1, ITERS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < n, other=0)
        tl.store(OUT + tl.program_id(0), tl.sum(acc, axis=0))


ReadConfig = tuple[int, int, int]  # (words a tile, tiles a program, warps)
READ_CONFIGS: tuple[ReadConfig, ...] = (
    (1024, 1, 4), (1024, 4, 4), (2048, 2, 8), (2048, 4, 8), (4096, 1, 8), (4096, 4, 8),
    (1024, 16, 4), (2048, 16, 8))


def read_programs(nbytes: int, config: ReadConfig) -> int:
    """The programs that read `nbytes` (a whole number of 8-byte words) with `config`."""
    block, iters, _ = config
    return -(-(nbytes // 8) // (block * iters))


def read_all(x: torch.Tensor, out: torch.Tensor, config: ReadConfig) -> torch.Tensor:
    """Read every byte of `x` (contiguous, its bytes a multiple of 8) once: `out` (int64,
    at least read_programs long) gets each program's wrapping sum of its 64-bit words."""
    nbytes = x.numel() * x.element_size()
    if not x.is_contiguous() or nbytes % 8:
        raise ValueError(f"read_all: a contiguous buffer of whole 8-byte words, not "
                         f"{tuple(x.shape)} {x.dtype}")
    words = x.view(torch.int64).reshape(-1)
    programs = read_programs(nbytes, config)
    if out.dtype != torch.int64 or out.numel() < programs:
        raise ValueError(f"read_all: out needs {programs} int64, has {out.numel()} {out.dtype}")
    block, iters, warps = config
    _read_kernel[(programs,)](words, out, words.numel(), BLOCK=block, ITERS=iters,
                              num_warps=warps, **_launch(words))
    return out
