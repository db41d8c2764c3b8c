"""The batch-1 GEMV (plain, with the RMSNorm of its input row fused in, or with
SwiGLU fused in), its tile configs, and `pick_gemv`, which times them against cuBLAS."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from replicas.kernels.allreduce import Site
from replicas.kernels.common import _launch, _pow2

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None
    OutOfResources = RuntimeError  # (never raised: nothing is timed without Triton)

log = logging.getLogger(__name__)


if triton is not None:
    from replicas.kernels.allreduce import _await_rows, _leave_rows, _push_rows, _summed
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _normed_x(X, R, NW, cols, k, rstd, EVEN: tl.constexpr, HAS_RES: tl.constexpr,
                  PULL: tl.constexpr, WORLD: tl.constexpr):
        """K columns of norm(x + residual) * weight, float32, rounded as _rms_norm_kernel.
        PULL: x is the sum of WORLD partial rows at X, summed here."""
        if PULL:
            x = _summed(X, cols, cols < k, k, WORLD).to(tl.float32)
            if HAS_RES:
                x = (x + tl.load(R + cols, mask=cols < k, other=0.0).to(tl.float32)).to(
                    X.dtype.element_ty)
            w = tl.load(NW + cols, mask=cols < k, other=0.0).to(tl.float32)
        elif EVEN:
            x = tl.load(X + cols).to(tl.float32)
            if HAS_RES:
                x = (x + tl.load(R + cols).to(tl.float32)).to(X.dtype.element_ty)
            w = tl.load(NW + cols).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=cols < k, other=0.0).to(tl.float32)
            if HAS_RES:
                x = (x + tl.load(R + cols, mask=cols < k, other=0.0).to(tl.float32)).to(
                    X.dtype.element_ty)
            w = tl.load(NW + cols, mask=cols < k, other=0.0).to(tl.float32)
        y = (x.to(tl.float32) * rstd).to(X.dtype.element_ty).to(tl.float32)
        return (y * w).to(X.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _gemv_x(X, R, NW, cols, k, rstd, EVEN: tl.constexpr, GATED: tl.constexpr,
                NORM: tl.constexpr, HAS_RES: tl.constexpr, PULL: tl.constexpr,
                WORLD: tl.constexpr):
        """K columns of the GEMV's input row, float32 (see _gemv_kernel)."""
        if NORM:
            return _normed_x(X, R, NW, cols, k, rstd, EVEN, HAS_RES, PULL, WORLD)
        if EVEN:
            x = tl.load(X + cols)
        else:
            x = tl.load(X + cols, mask=cols < k, other=0.0)
        if GATED:  # as _silu_mul_kernel rounds it
            if EVEN:
                u = tl.load(X + k + cols).to(tl.float32)
            else:
                u = tl.load(X + k + cols, mask=cols < k, other=0.0).to(tl.float32)
            g = x.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)
            x = (act * u).to(X.dtype.element_ty)
        return x.to(tl.float32)

    @triton.jit
    def _w_tile(W, rows, r_ok, cols, k, sw, EVEN: tl.constexpr):
        if EVEN:  # shapes divide the blocks: no masks, wide loads
            return tl.load(W + rows[:, None] * sw + cols[None, :])
        return tl.load(W + rows[:, None] * sw + cols[None, :],
                       mask=r_ok[:, None] & (cols < k)[None, :], other=0.0)

    @triton.jit
    def _row_sums(acc, S, B, rows, r_ok, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RED: tl.constexpr):
        """The rows' products (acc [rows, K block], summed along K; RED: already summed,
        [rows]), times their FP8 scales (S) and plus their bias (B) where the kernel has
        them."""
        y = acc if RED else tl.sum(acc, axis=1)
        if SCALED:
            y *= tl.load(S + rows, mask=r_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=r_ok, other=0.0).to(tl.float32)
        return y

    @triton.jit
    def _products(w, xv, RED: tl.constexpr):
        """A tile's products w [rows, K block] * x [K block], float32: as they are, or
        (RED) summed along K, [rows]."""
        prod = w.to(tl.float32) * xv[None, :]
        return tl.sum(prod, axis=1) if RED else prod

    @triton.jit
    def _gemv_kernel(X, W, S, B, Y, R, NW, ROUT, n, k, sw, eps, DATA, FLAGS, CNT, site_data,
                     site_flag, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN: tl.constexpr,
                     GATED: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
                     ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PUSH: tl.constexpr, PULL: tl.constexpr, RANK: tl.constexpr,
                     WORLD: tl.constexpr, PDL: tl.constexpr, SWIGLU: tl.constexpr = False,
                     RED: tl.constexpr = False):
        """y = W x (+ b) for one row x: program = BLOCK_N rows of W, streamed along K,
        products summed in float32 registers and reduced once at the end. The first
        tile of W is loaded before waiting on the kernel that writes x (with PDL it
        streams while that kernel runs).

        The input row may be made here: GATED, silu(gate) * up of x = [gate | up];
        NORM, the decoder layer's RMSNorm of x (+ R): every program takes the row's sum
        of squares (the row is read from L2 / L1 twice: for it, then tile by tile) and
        program 0 writes x + R to ROUT.

        The all-reduce of tensor parallelism can fold into it (allreduce.py): PUSH, the
        rows of y go to every rank's buffer at a site (DATA, FLAGS: every rank's
        addresses) instead of Y; PULL, x is the sum of the WORLD partial rows at X,
        waited for on the site's counters CNT and summed as it is read.

        SCALED: W holds FP8 (e4m3) and row r of the product is multiplied by S[r], its
        scale (replicas/fp8.py): half the bytes of a 16-bit W, the input row as it is.

        SWIGLU: W is [gate; up] (2n rows) and y is silu(gate) * up, n wide: a program
        takes rows r of both halves, rounds each product to Y's dtype (as a gate_up
        output is) and multiplies as _silu_mul_kernel does, so the down GEMV after it
        reads the activation instead of making it in each of its programs.

        RED: each tile's products are summed along K as they are made, into [BLOCK_N]
        float32 sums, instead of kept [BLOCK_N, BLOCK_K] until the end: fewer registers
        (more programs an SM, more loads in flight), a reduction a tile (PERF.md v0.85)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = rows < n
        cols = tl.arange(0, BLOCK_K)
        w = _w_tile(W, rows, r_ok, cols, k, sw, EVEN)
        if SWIGLU:
            WU = W + n * sw  # the up half's rows
            wu = _w_tile(WU, rows, r_ok, cols, k, sw, EVEN)
        _pdl_enter(PDL)
        if PULL:
            _await_rows(CNT, k, WORLD)
        rstd = 0.0
        if NORM:
            every = tl.arange(0, ROW)
            if PULL:
                whole = _summed(X, every, every < k, k, WORLD).to(tl.float32)
            else:
                whole = tl.load(X + every, mask=every < k, other=0.0).to(tl.float32)
            if HAS_RES:
                whole = (whole + tl.load(R + every, mask=every < k, other=0.0).to(
                    tl.float32)).to(X.dtype.element_ty)
                if tl.program_id(0) == 0:
                    tl.store(ROUT + every, whole, mask=every < k)
                whole = whole.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / k + eps)
        xv = _gemv_x(X, R, NW, cols, k, rstd, EVEN, GATED, NORM, HAS_RES, PULL, WORLD)
        acc = _products(w, xv, RED)
        if SWIGLU:
            acc_u = _products(wu, xv, RED)
        for k0 in range(BLOCK_K, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = _w_tile(W, rows, r_ok, cols, k, sw, EVEN)
            if SWIGLU:
                wu = _w_tile(WU, rows, r_ok, cols, k, sw, EVEN)
            xv = _gemv_x(X, R, NW, cols, k, rstd, EVEN, GATED, NORM, HAS_RES, PULL, WORLD)
            acc += _products(w, xv, RED)
            if SWIGLU:
                acc_u += _products(wu, xv, RED)
        y = _row_sums(acc, S, B, rows, r_ok, SCALED, HAS_BIAS, RED)
        if SWIGLU:  # gate and up as gate_up's GEMV would store them, then _silu_mul_kernel
            u = _row_sums(acc_u, S + n, B + n, rows, r_ok, SCALED, HAS_BIAS, RED)
            g = y.to(Y.dtype.element_ty).to(tl.float32)
            u = u.to(Y.dtype.element_ty).to(tl.float32)
            y = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32) * u
        if PUSH:
            _push_rows(y.to(Y.dtype.element_ty), rows, r_ok, n, DATA, FLAGS, CNT, site_data,
                       site_flag, RANK, WORLD)
        else:
            tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=r_ok)
        if PULL:
            _leave_rows(CNT)


GemvConfig = tuple[int, ...]  # (rows per program, K per iteration, warps, stages[, registers:
# a cap on a thread's, ptxas's maxnreg, 0 for none[, 1: each tile's products summed as they
# are made, the kernel's RED]]: FP8_GEMV_TRIALS', PERF.md v0.85)


GEMV_CONFIGS: tuple[GemvConfig, ...] = (  # the leaders of earlier H200 runs, and variations
    (4, 1024, 4, 3), (4, 2048, 8, 2), (4, 2048, 8, 3), (4, 2048, 8, 4), (2, 4096, 8, 3),
    (8, 1024, 8, 3), (16, 512, 8, 3), (8, 512, 4, 4), (2, 2048, 4, 2), (1, 4096, 4, 1),
    (2, 4096, 4, 1), (4, 512, 4, 4), (8, 256, 4, 4),
    # more rows per program: the fused kinds read the input row once per program
    (16, 1024, 8, 2), (32, 256, 8, 3), (8, 2048, 8, 2))
# FP8 weights, timed on these too: a tile of them is half the bytes, and on the H200 their
# winners already had more rows per program than bf16's (8-16 against 4) at 2.0-3.4 TB/s
# against bf16's 3.2-4.3 (fp8_h200.jsonl's gemv_us); these go further in rows and K. The
# last three are PERF.md v0.85's trials that won on the H200 (`--suite gemv` at 59f7c89):
# qkv 9.05 -> 8.22 us with a cap of 80 registers, o 6.17 -> 5.24 with a cap of 96 and each
# tile summed as made, gate_up 32.97 -> 31.48 summed as made; down kept its pick (batch-1
# FP8 decode 3.151 -> 3.044 ms with them, v0.87's A/B).
FP8_GEMV_CONFIGS: tuple[GemvConfig, ...] = (
    (16, 1024, 8, 3), (32, 512, 8, 3), (16, 2048, 8, 2), (32, 1024, 8, 2), (64, 256, 8, 3),
    (16, 512, 8, 4), (16, 512, 8, 4, 80), (4, 2048, 4, 3, 96, 1), (16, 512, 8, 4, 0, 1))


# FP8 candidates with more loads in flight (PERF.md v0.85): v0.84's register cap took
# decode attention from 2 to 4 programs an SM and 0.74x its time; ncu found the FP8 GEMV
# stalled on its loads with few warps an SM. A cap of 80 lets 3 programs of 8 warps or 6
# of 4 in, 96 5 of 4; summing each tile as it is made (RED) frees the [rows, K block]
# accumulator where the compiler kept it (sm_90 compiles here: (16, 512, 8, 4) 176 -> 80
# registers with the norm, 168 -> 64 plain; (8, 2048, 8, 2) plain 179 -> 100). The first
# nine lost to the picks on the H200 (the winners are in FP8_GEMV_CONFIGS); the rest are
# the winners' neighbours (PERF.md v0.88): qkv's in rows, stages, K and cap; o's and
# down's in rows, K, stages and cap; gate_up's (SwiGLU) in rows, K and cap. Of these only
# qkv's (8, 2048, 4, 3, 96, 1) won by more than 3 % alone (6.7 against 8.2 us), but among
# the engine's picks it left batch-1 decode as it was (3.030 against 3.032 ms, v0.89's
# A/B), so it stays here; the last five are its neighbours (none better than it).
# `--suite gemv` times them, the engine does not.
FP8_GEMV_TRIALS: tuple[GemvConfig, ...] = (
    (8, 1024, 8, 3, 80), (4, 512, 4, 4, 80), (8, 256, 4, 4, 80),
    (8, 256, 4, 4, 96), (4, 1024, 4, 3, 80), (4, 512, 4, 4, 64),
    (8, 2048, 8, 2, 0, 1), (4, 2048, 4, 3, 0, 1), (8, 512, 4, 4, 0, 1),
    (16, 512, 8, 4, 96), (16, 512, 8, 3, 80), (32, 512, 8, 4, 80), (16, 1024, 8, 3, 80),
    (16, 512, 8, 4, 80, 1), (4, 2048, 4, 4, 96, 1), (8, 2048, 4, 3, 96, 1),
    (4, 4096, 4, 3, 96, 1), (4, 2048, 4, 3, 128, 1), (2, 4096, 4, 3, 96, 1),
    (16, 512, 8, 4, 96, 1), (32, 512, 8, 4, 0, 1), (16, 1024, 8, 3, 0, 1),
    (8, 2048, 4, 4, 96, 1), (8, 2048, 4, 2, 96, 1), (8, 2048, 4, 3, 80, 1),
    (8, 2048, 4, 3, 128, 1), (8, 1024, 4, 3, 96, 1))


def gemv_config_parts(config: GemvConfig) -> tuple[int, int, int, int, int, int]:
    """A GEMV config in full: (rows per program, K per iteration, warps, stages, register
    cap: 0 for none, RED: 1 where each tile's products are summed as made)."""
    block_n, block_k, warps, stages, *more = config
    cap, red = (*more, 0, 0)[:2]
    return block_n, block_k, warps, stages, cap, red


def gemv_configs(fp8: bool, trials: bool = False) -> tuple[GemvConfig, ...]:
    """The configs `pick_gemv` times for a weight (FP8 or not); `trials`: an FP8 weight's
    also FP8_GEMV_TRIALS (the GEMV probe's)."""
    return GEMV_CONFIGS + (FP8_GEMV_CONFIGS + (FP8_GEMV_TRIALS if trials else ()) if fp8
                           else ())


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: GemvConfig, gated: bool = False, scale: torch.Tensor | None = None
         ) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T (+ bias) -> [1, N], in x's dtype. gated: x is
    [gate | up] of [1, 2K] and the input row is silu(gate) * up (SwiGLU fused in).
    scale: weight is FP8 and row r of it stands for weight[r] * scale[r] (each of these
    functions takes it alike)."""
    return _gemv(x, weight, bias, config, gated=gated, scale=scale)


def gemv_norm(x: torch.Tensor | Site, residual: torch.Tensor | None,
              norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
              bias: torch.Tensor | None, config: GemvConfig, scale: torch.Tensor | None = None,
              swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemv(rms_norm(x + residual) * norm_weight), x + residual) for one row x [1, K], in
    one kernel, equal to `rms_norm` then `gemv` with the same config; without a residual
    the second result is x. `x` may be a Site: the sum over the ranks of the row that
    their GEMVs pushed there (`gemv_push`), summed here as it is read. swiglu: weight is
    gate_up's [gate; up] and the first result is silu(gate) * up, half as wide, equal to
    `silu_and_mul` of the plain result (PERF.md v0.77)."""
    row = x.rows[:1] if isinstance(x, Site) else x
    r_out = torch.empty_like(row) if residual is not None else row
    y = _gemv(x, weight, bias, config, norm=(residual, norm_weight, r_out, eps), scale=scale,
              swiglu=swiglu)
    return y, r_out


def gemv_push(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig, gated: bool,
              site: Site, scale: torch.Tensor | None = None) -> Site:
    """`gemv(x, weight, None, config, gated)`, its rows pushed to every rank's buffer at
    `site` instead of returned: the all-reduce of a row-parallel layer, folded into the
    GEMV; the reader sums it (`gemv_norm` of the site, or `site.pull()`)."""
    _gemv(x, weight, None, config, gated=gated, push=site, scale=scale)
    return site


def _gemv(x: torch.Tensor | Site, weight: torch.Tensor, bias: torch.Tensor | None,
          config: GemvConfig, gated: bool = False,
          norm: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, float] | None = None,
          push: Site | None = None, scale: torch.Tensor | None = None,
          swiglu: bool = False) -> torch.Tensor:
    n, k = weight.shape
    if swiglu:
        assert n % 2 == 0 and push is None, "[gate; up] rows, the output stored here"
        n //= 2
    block_n, block_k, warps, stages, cap, red = gemv_config_parts(config)
    pull = x if isinstance(x, Site) else None
    row = pull.rows if pull is not None else x
    assert isinstance(row, torch.Tensor)
    y = push.rows if push is not None else torch.empty(1, n, dtype=row.dtype, device=row.device)
    residual, norm_weight, r_out, eps = norm or (None, row, row, 0.0)
    site = push or pull
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        row, weight, scale if scale is not None else row, bias if bias is not None else row, y,
        residual if residual is not None else row, norm_weight, r_out, n, k,
        weight.stride(0), eps, *(site.kernel_args() if site is not None else (
            weight, weight, weight, 0, 0)),
        SCALED=scale is not None, HAS_BIAS=bias is not None,
        EVEN=n % block_n == 0 and k % block_k == 0,
        GATED=gated, NORM=norm is not None, HAS_RES=residual is not None, ROW=_pow2(k),
        BLOCK_N=block_n, BLOCK_K=block_k, PUSH=push is not None, PULL=pull is not None,
        RANK=site.rank if site is not None else 0, WORLD=site.world if site is not None else 1,
        SWIGLU=swiglu, RED=bool(red), num_warps=warps, num_stages=stages,
        **_launch(row, cap))
    return y


GemvKind = str  # how a layer calls its GEMV: "plain", "norm" (gemv_norm), "norm_swiglu"
# (gemv_norm with swiglu) or "gated"


def gemv_of_kind(kind: GemvKind, x: torch.Tensor, residual: torch.Tensor,
                 norm_weight: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 config: GemvConfig, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The one-row GEMV as a layer of `kind` calls it (see pick_gemv; x [1, 2K] for
    "gated", residual and norm_weight read by the norm kinds only, eps 1e-5): its
    product."""
    if kind in ("norm", "norm_swiglu"):
        return gemv_norm(x, residual, norm_weight, 1e-5, weight, bias, config, scale,
                         swiglu=kind == "norm_swiglu")[0]
    return gemv(x, weight, bias, config, gated=kind == "gated", scale=scale)


def pick_gemv(weight: torch.Tensor, bias: torch.Tensor | None, kind: GemvKind = "plain",
              margin: float = 0.97, scale: torch.Tensor | None = None,
              dtype: torch.dtype | None = None, trials: bool = False
              ) -> tuple[GemvConfig | None, dict[str, float]]:
    """Time cuBLAS (F.linear) and each GEMV config on a one-row input, as a decode step
    runs them: weights cold (copies cycled so that they never sit in L2), input hot, and
    the GEMV in the layer's kind: "norm" with the RMSNorm (+ residual) fused in,
    "norm_swiglu" also with SwiGLU on its output (weight is gate_up's [gate; up]; timed
    against cuBLAS's whole gate_up product), "gated" with SwiGLU fused into its input
    (their extra work favours other tile shapes than "plain").
    Returns the fastest config if it beats plain cuBLAS by the margin (else None: keep
    cuBLAS), and the times in us. An FP8 weight (its `scale` given; the input in
    `dtype`) is timed against what its layer runs otherwise: fp8_linear's FP8 matmul;
    `trials`: on FP8_GEMV_TRIALS' configs too (one that does not build is logged and left
    out, as a tile that does not fit)."""
    from replicas.fp8 import fp8_linear

    k = weight.shape[1]
    make = functools.partial(torch.randn, dtype=dtype or weight.dtype, device=weight.device)
    x, residual, norm_weight = make(1, 2 * k if kind == "gated" else k), make(1, k), make(k)
    if kind in ("norm", "norm_swiglu"):
        s = x + residual
        h = (F.rms_norm(s.float(), (k,), eps=1e-5).to(x.dtype) * norm_weight)
    elif kind == "gated":
        gate, up = x.float().chunk(2, dim=-1)
        h = (F.silu(gate) * up).to(x.dtype)
    else:
        h = x
    dense = weight if scale is None else (weight.float() * scale[:, None]).to(h.dtype)
    want = F.linear(h, dense, bias)
    if kind == "norm_swiglu":
        gate, up = want.to(h.dtype).float().chunk(2, dim=-1)
        want = F.silu(gate).to(h.dtype).float() * up
    copies = cold_set(weight)

    def run(w: torch.Tensor, config: GemvConfig) -> torch.Tensor:
        return gemv_of_kind(kind, x, residual, norm_weight, w, bias, config, scale)

    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "cublas": (lambda w: F.linear(x[:, :k], w, bias)) if scale is None else (
            lambda w: fp8_linear(x[:, :k], w, scale, bias))}
    configs = []
    for config in gemv_configs(scale is not None, trials):
        try:
            got = run(weight, config)
        except OutOfResources as e:  # a tile this GPU cannot hold: not a candidate here
            log.info("GEMV %s does not fit on this GPU: %s", config, e)
            continue
        except Exception as e:  # (a trial's cap this Triton or GPU refuses)
            if len(config) < 5:
                raise
            log.warning("GEMV %s (a trial) does not build here: %s", config, e)
            continue
        configs.append(config)
        if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(
                want.float().abs().max())):
            raise AssertionError(f"GEMV {config} ({kind}) disagrees with cuBLAS on "
                                 f"{tuple(weight.shape)}")
        runs[str(config)] = functools.partial(run, config=config)
    times = {name: _cycled_us(fn, copies) for name, fn in runs.items()}
    best = min(configs, key=lambda c: times[str(c)])
    return (best if times[str(best)] < margin * times["cublas"] else None), times


def cold_copies(nbytes: int) -> int:
    """How many copies of an operand of `nbytes` a timer cycles through (_cycled_us) so
    that each is read cold, as a step reads it: 256 MB of them, 2 to 32 (small ones are
    cheap either way)."""
    return min(32, max(2, -(-2**28 // nbytes)))


def cold_set(t: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
    """`t` and clones of it for a timer to cycle through (_cycled_us): `count` in all,
    by default cold_copies of its bytes."""
    count = count or cold_copies(t.numel() * t.element_size())
    return [t] + [t.clone() for _ in range(count - 1)]


def _cycled_us(fn: Callable[[torch.Tensor], torch.Tensor], copies: list[torch.Tensor],
               rounds: int = 10) -> float:
    """GPU time per call, from a CUDA graph of one call per copy (as in the decode graph:
    no host launch cost between kernels)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in copies:  # compile and warm up outside the graph
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in copies:
            fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (rounds * len(copies))
