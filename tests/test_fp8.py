"""FP8 weights (replicas/fp8.py) on CPU, where torch._scaled_mm is PyTorch's reference:
the per-channel quantization's error bound, fp8_linear against the same product in
float64, the engine with quantization="fp8" (which layers hold FP8, the bytes, steady
tokens, tp=2), and the teacher-forced accuracy measure (replicas/accuracy.py).
The FP8 tensor-core path and issue 20's accuracy bar are GPU tests (tests/test_gpu.py)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import CheckpointFactory

from replicas import ConfigError, Engine, EngineConfig, SamplingParams
from replicas.accuracy import compare, scored, sequences
from replicas.config import PROJECTIONS
from replicas.fp8 import FP8, FP8_MAX, fp8_linear, is_fp8, quantize_rows, quantize_tokens
from replicas.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [3, 1, 4]]


def test_rows_keep_three_mantissa_bits() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 2, 64)[:, None]
    w[5] = 0.0
    w8, scale = quantize_rows(w)
    assert w8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert float(w8.float().abs().max()) <= FP8_MAX
    assert torch.equal(w8[5].float(), torch.zeros(256)) and scale[5] == 1.0
    back = w8.float() * scale[:, None]
    # within e4m3's normal range (>= 2^-6 of the scale) an element keeps 3 mantissa bits
    normal = w.abs() >= scale[:, None] * 2.0 ** -6
    rel = ((back - w).abs() / w.abs().clamp(min=1e-30))[normal]
    assert float(rel.max()) <= 1 / 16
    # each row's largest element is exact: its scale maps it onto 448
    rows = torch.arange(64) != 5
    top = w.abs().argmax(dim=1)
    assert torch.allclose(back[rows, top[rows]], w[rows, top[rows]], rtol=1e-6)


def test_fp8_linear_is_the_product_of_the_quantized_operands() -> None:
    """W8A8 (quantization="fp8-w8a8"): both operands rounded to FP8, each with its scales;
    weight-only (quantization="fp8"): x as it is."""
    gen = torch.Generator().manual_seed(1)
    x, w, bias = (torch.randn(7, 96, generator=gen), torch.randn(40, 96, generator=gen),
                  torch.randn(40, generator=gen))
    w8, ws = quantize_rows(w)
    dense = w8.double() * ws.double()[:, None]
    only_w = fp8_linear(x, w8, ws, bias)
    torch.testing.assert_close(only_w.double(), x.double() @ dense.T + bias.double(),
                               rtol=1e-5, atol=1e-4)
    x8, xs = quantize_tokens(x)
    want = (x8.double() * xs.double()) @ dense.T + bias.double()
    got = fp8_linear(x, w8, ws, bias, w8a8=True)
    assert got.dtype == torch.float32 and got.shape == (7, 40)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    # and close to the float product: a few % of its scale
    assert float((got - x @ w.T - bias).abs().max()) < 0.1 * float((x @ w.T).abs().max())
    # 3-d inputs keep their leading dims; bfloat16 in, bfloat16 out
    for w8a8 in (False, True):
        y = fp8_linear(x.reshape(7, 1, 96).bfloat16(), w8, ws, w8a8=w8a8)
        assert y.shape == (7, 1, 40) and y.dtype == torch.bfloat16
    # and W8A8's rounding of x costs more than the weights' alone
    exact = x @ w.T + bias
    assert float((got - exact).abs().mean()) > float((only_w - exact).abs().mean())
    # a 16-bit W8A8 product with a bias: the bias added before the one rounding to 16
    # bits (in the matmul's epilogue), as near the float64 value as bfloat16 allows
    xb, bb = x.bfloat16(), bias.bfloat16()
    xb8, xbs = quantize_tokens(xb)
    want16 = (xb8.double() * xbs.double()) @ dense.T + bb.double()
    got16 = fp8_linear(xb, w8, ws, bb, w8a8=True)
    assert got16.dtype == torch.bfloat16
    ulp = want16.abs().clamp_min(2.0 ** -8) * 2.0 ** -8  # (bfloat16's spacing, halved: 2^-8)
    assert bool(((got16.double() - want16).abs() <= 1.01 * ulp).all())


def test_w8a16_default_is_the_measured_pick_for_its_rows() -> None:
    """The default config by rows of x: each measured pick is one the probe times (so
    the probe's rows keep judging it), chosen by the largest rows it was picked for."""
    from replicas.kernels.fp8mm import (
        W8A16_CONFIGS,
        W8A16_HEAD_PICKS,
        W8A16_MANY_ROWS,
        W8A16_PICKS,
        W8A16_WIDE_PICKS,
        w8a16_config,
    )

    for picks in (W8A16_PICKS, W8A16_HEAD_PICKS):
        assert {c for _, c in picks} | {W8A16_MANY_ROWS} <= set(W8A16_CONFIGS)
        assert [rows for rows, _ in picks] == sorted({rows for rows, _ in picks})
        for m in (1, 2, 15, 16, 17, 32, 33, 63, 64, 65, 128, 129, 256, 1023):
            picked = [config for rows, config in picks if m <= rows]
            assert w8a16_config(m, picks) == (picked[0] if picked else W8A16_MANY_ROWS), m
    # (32, 64, 128) at 17-32 rows, with K in slices (an H100's probe, PERF.md v0.98); the
    # swapped (64, 64, 128) from 33 rows on (the H200's probe at e08b4a2)
    assert w8a16_config(17) == w8a16_config(32) == (32, 64, 128, 4, 4, False)
    assert w8a16_config(33) == w8a16_config(128) == (64, 64, 128, 4, 4, True)
    # a weight of 16,384 rows or more past 64 rows (GLM-4-9B's gate_up): wider tiles, K
    # whole, as both GPUs' probes timed them (PERF.md v1.00); below, as any weight
    assert {c[:6] for _, c in W8A16_WIDE_PICKS} <= set(W8A16_CONFIGS)
    assert w8a16_config(64, n=27392) == w8a16_config(65, n=16383) == W8A16_MANY_ROWS
    assert w8a16_config(16, n=27392) == (16, 32, 128, 4, 4, False)
    assert w8a16_config(65, n=27392) == w8a16_config(128, n=16384) == (
        128, 128, 64, 8, 3, True, 1)
    assert w8a16_config(129, n=27392) == w8a16_config(4096, n=27392) == (
        256, 128, 64, 8, 3, True, 1)
    assert w8a16_config(128, W8A16_HEAD_PICKS) == W8A16_MANY_ROWS  # (the head: n unsaid)
    # the narrower weights past 64 rows by K (an H100's probe, PERF.md v1.01): down's long
    # K in wide tiles in the rule's slices, qkv's and o's short K whole; gate_up's width
    # decides first; up to 64 rows K changes nothing
    assert w8a16_config(65, n=4096, k=13696) == w8a16_config(128, n=4096, k=8192) == (
        128, 128, 64, 8, 3, True, 0)
    assert w8a16_config(129, n=4096, k=13696) == (256, 128, 64, 8, 3, True, 0)
    assert w8a16_config(65, n=4608, k=4096) == w8a16_config(256, n=4096, k=8191) == (
        64, 64, 128, 4, 4, True, 1)
    assert w8a16_config(256, n=27392, k=4096) == (256, 128, 64, 8, 3, True, 1)
    assert w8a16_config(64, n=4096, k=13696) == w8a16_config(64, n=4096, k=4096) == (
        W8A16_MANY_ROWS)
    assert w8a16_config(16, n=4096, k=13696) == (16, 32, 128, 4, 4, False)
    # the FP8 LM head's (an H100's lm_head_rows, PERF.md v0.96-v0.97)
    assert w8a16_config(2, W8A16_HEAD_PICKS) == (16, 64, 128, 4, 4, False)
    assert w8a16_config(32, W8A16_HEAD_PICKS) == (32, 64, 128, 4, 4, False)
    assert w8a16_config(33, W8A16_HEAD_PICKS) == W8A16_MANY_ROWS


@pytest.mark.parametrize("shape", [(5, 200, 72), (33, 256, 130), (1, 64, 128)])
def test_w8a16_kernel_is_the_weight_only_product(shape: tuple[int, int, int],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton FP8-weight matmul (its interpreter here) against float64: K and N
    that its blocks do not divide, one row and many, float32 and float16 inputs; and
    fp8_linear takes it below DEQUANT_ROWS rows when the kernels are on."""
    pytest.importorskip("triton")  # (as tests/test_kernels.py: the interpreter runs it)
    from replicas import kernels

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    m, k, n = shape
    gen = torch.Generator().manual_seed(m)
    w8, scale = quantize_rows(torch.randn(n, k, generator=gen))
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        want = x.double() @ (w8.double() * scale.double()[:, None]).T + bias.double()
        got = kernels.w8a16(x, w8, scale, bias)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 50)
        assert torch.equal(fp8_linear(x, w8, scale, bias), got)  # the same kernel


def _w8a16_against_float64(configs: list[tuple[int, ...]], k: int, seed: int,
                           after: Callable[[], bool] = lambda: True
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels.w8a16 in each of `configs` (in the interpreter) on a [33, k] x and a [72, k]
    FP8 weight, with a bias and without: the float64 product to float32's rounding, and
    `after()` true after each; returns (w8, scale, x, bias)."""
    from replicas import kernels

    gen = torch.Generator().manual_seed(seed)
    w8, scale = quantize_rows(torch.randn(72, k, generator=gen))
    x, bias = torch.randn(33, k, generator=gen), torch.randn(72, generator=gen)
    want = x.double() @ (w8.double() * scale.double()[:, None]).T
    for config in configs:
        for b in (None, bias):
            got = kernels.w8a16(x, w8, scale, b, config)
            plus = 0.0 if b is None else b.double()
            torch.testing.assert_close(got.double(), want + plus, rtol=1e-5, atol=5e-4,
                                       msg=str(config))
            assert after(), config
    return w8, scale, x, bias


@pytest.mark.parametrize("base", [(16, 32, 128, 4, 4, False), (64, 64, 128, 4, 4, True),
                                  (16, 64, 32, 4, 4, True), (128, 128, 64, 8, 3, True)])
def test_w8a16_in_slices_of_k_is_the_same_product(base: tuple[int, ...],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.98: K in 2, 3 and 8 slices, and as w8a16_split chooses, on a K none of
    the slices' steps divide: the whole-K product to float32's rounding, with a bias and
    without, the last slice of each tile setting its count back to 0 (the next product
    starts from zeros); and a config without a split follows W8A16_SPLIT (0 by
    default: w8a16_split's choice)."""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.kernels import fp8mm

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    w8, scale, x, bias = _w8a16_against_float64(
        [(*base, split) for split in (2, 3, 8, 0)], 1030, 8,
        lambda: not fp8mm._COUNTERS[torch.device("cpu")].any())
    whole = kernels.w8a16(x, w8, scale, bias, (*base, 1))
    calls: list[int] = []
    real = fp8mm.w8a16_split
    monkeypatch.setattr(fp8mm, "w8a16_split", lambda split, *a: calls.append(split)
                        or real(split, *a))
    for split in (1, 4):
        monkeypatch.setattr(fp8mm, "W8A16_SPLIT", split)
        got = kernels.w8a16(x, w8, scale, bias, base)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=5e-4)
    assert calls == [1, 4]


def test_w8a16_split_gives_few_tiles_four_slices() -> None:
    """w8a16_split(0, ...): W8A16_SLICES (4) slices where the tiles are fewer than 2 an SM
    and each slice gets at least W8A16_SLICE_STEPS steps of K, else 1; a split given is
    kept, but never past one step a slice (PERF.md v0.98's probe, an H100's 132 SMs)."""
    from replicas.kernels.fp8mm import w8a16_split

    # GLM-4-9B at 4 rows in (16, 32, 128)'s tiles: qkv 144 tiles, o and down 128 -> 4
    # (down's K 107 steps, o's 32); gate_up's 856 -> 1; at 64 rows in (64, 64, 128): 64-72
    # tiles -> 4, gate_up's 428 -> 1
    assert w8a16_split(0, 144, 32, 132) == w8a16_split(0, 128, 107, 132) == 4
    assert w8a16_split(0, 856, 32, 132) == w8a16_split(0, 428, 32, 132) == 1
    assert w8a16_split(0, 263, 16, 132) == 4 and w8a16_split(0, 264, 100, 132) == 1
    assert w8a16_split(0, 8, 15, 132) == 1  # 4 steps a slice at least
    assert w8a16_split(6, 8, 3, 132) == 3  # given: kept, up to a step a slice
    assert w8a16_split(2, 1000, 100, 132) == 2


@pytest.mark.parametrize("shape", [(5, 200), (37, 1100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_kernel_is_pytorchs_widening_bit_for_bit(shape: tuple[int, int],
                                                          dtype: torch.dtype,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Weight-only FP8's long prefills widen each weight in one kernel: the same bits as
    `w8.to(dtype) * scale[:, None].to(dtype)`, over shapes that do not divide its blocks
    and scales over many octaves; fp8_linear takes it from DEQUANT_ROWS rows when the
    kernels are on, with the same result as without. (Triton's CPU interpreter rounds
    float32 to bfloat16 toward zero, a GPU to nearest even: there, bf16 may be one unit
    in the last place below.)"""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.fp8 import DEQUANT_ROWS

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU: the interpreter)
    n, k = shape
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-4, 2, n)[:, None]
    w8, scale = quantize_rows(w.to(device))
    got = kernels.widen_fp8(w8, scale, dtype)
    want = w8.to(dtype) * scale[:, None].to(dtype)
    exact = dtype == torch.float16 or got.is_cuda
    assert got.dtype == dtype and (torch.equal(got, want) if exact else bool(
        ((want.float() - got.float()) * want.float().sign() <= want.float().abs() * 2**-7)
        .all() and (got.float().abs() <= want.float().abs()).all()))
    x = torch.randn(DEQUANT_ROWS, k, generator=gen).to(device, dtype)
    through_kernel = fp8_linear(x, w8, scale)
    monkeypatch.setenv("TPSERVE_KERNELS", "0")  # PyTorch's widening
    if exact:
        assert torch.equal(through_kernel, fp8_linear(x, w8, scale))


@pytest.mark.parametrize("shape", [(5, 200), (3, 2100), (1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_pass", [True, False])
def test_token_quantization_kernel_is_quantize_tokens(shape: tuple[int, int],
                                                      dtype: torch.dtype, one_pass: bool,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The W8A8 path's one-kernel per-token quantization (its interpreter here) against
    quantize_tokens: the same scales, the same FP8 entries but where the interpreter's
    e4m3 rounding drops a carry (tests/test_kernels.py same_fp8), over rows longer than
    the two-pass block, a zero row and values past the range, each row in one block or
    in two passes; fp8_linear takes it when the kernels are on."""
    pytest.importorskip("triton")
    from test_kernels import same_fp8

    from replicas import kernels
    from replicas.kernels import quant

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    if not one_pass:
        monkeypatch.setattr(quant, "ONE_PASS_MAX_K", 0)
    m, k = shape
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 3, m)[:, None]).to(dtype)
    x[-1, : k // 2] = 0.0
    if m > 1:
        x[0] = 0.0  # a zero row: scale 1
    x8, scale = kernels.quantize_tokens_fp8(x)
    want8, want_scale = quantize_tokens(x)
    assert x8.dtype == FP8 and scale.shape == (m, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    same_fp8(x8, want8)
    w8, ws = quantize_rows(torch.randn(16, k, generator=gen))
    got = fp8_linear(x, w8, ws, w8a8=True)  # through the kernel
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "0")
    torch.testing.assert_close(got, fp8_linear(x, w8, ws, w8a8=True), rtol=0.07,
                               atol=0.07 * float(got.abs().max()))


def test_row_quantizing_kernels_launch_with_the_warps_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v1.05: each row-quantizing launcher gives its kernel `quant_warps`' warps:
    32 from a block of 4,096 columns (GLM-4-9B's 4,096 and 13,696), 4 below, or
    $TPSERVE_QUANT_WARPS's for all three; a count a GPU cannot launch is refused."""
    pytest.importorskip("triton")
    from replicas.kernels import quant

    launched: list[tuple[str, int]] = []

    class Launch:  # stands in for a kernel: records the warps of each launch
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: Any) -> Callable[..., None]:
            return lambda *args, **kw: launched.append((self.name, kw["num_warps"]))

    for name in ("_quant_rows_kernel", "_quant_two_kernel", "_silu_mul_quant_kernel"):
        monkeypatch.setattr(quant, name, Launch(name))
    x, wide = torch.zeros(2, 4096), torch.zeros(2, 13696)
    quant.quantize_tokens_fp8(x)
    quant.quantize_two_terms_fp8(wide)
    quant.silu_mul_quantize_fp8(torch.zeros(2, 2 * 13696))
    assert launched == [("_quant_rows_kernel", 32), ("_quant_two_kernel", 32),
                        ("_silu_mul_quant_kernel", 32)]
    assert [quant.quant_warps(b) for b in (1024, 2048, 4096, 16384)] == [4, 4, 32, 32]
    monkeypatch.setenv("TPSERVE_QUANT_WARPS", "8")
    launched.clear()
    quant.quantize_tokens_fp8(x)
    quant.quantize_two_terms_fp8(x)
    assert launched == [("_quant_rows_kernel", 8), ("_quant_two_kernel", 8)]
    monkeypatch.setenv("TPSERVE_QUANT_WARPS", "0")
    assert quant.quant_warps(4096) == 32
    monkeypatch.setenv("TPSERVE_QUANT_WARPS", "12")
    with pytest.raises(ValueError, match="TPSERVE_QUANT_WARPS"):
        quant.quantize_tokens_fp8(x)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["one pass", "two passes"])
def test_swiglu_quantized_in_one_pass_is_the_two_kernels_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, mode: str) -> None:
    """A W8A8 down_proj's input (kernels.silu_mul_quantize_fp8): exactly what
    silu_and_mul then quantize_tokens_fp8 give, scales and FP8 entries, on rows longer
    than the two-pass block (not a multiple of it), a zero row, and a row whose max is in
    its second block; each row in one block, or (both kernels) in two passes."""
    pytest.importorskip("triton")

    from replicas import kernels
    from replicas.kernels import quant

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    if mode == "two passes":
        monkeypatch.setattr(quant, "ONE_PASS_MAX_K", 0)
    m, n = 5, 1500
    gen = torch.Generator().manual_seed(n)
    gate_up = (torch.randn(m, 2 * n, generator=gen)
               * torch.logspace(-2, 2, m)[:, None]).to(dtype)
    gate_up[0] = 0.0  # a zero row: scale 1
    gate_up[2, 1100] = 300.0  # a peak in the second block: the row's max
    x8, scale = kernels.silu_mul_quantize_fp8(gate_up)
    want8, want_scale = kernels.quantize_tokens_fp8(kernels.silu_and_mul(gate_up))
    assert x8.shape == (m, n) and x8.dtype == FP8 and scale.dtype == torch.float32
    assert torch.equal(scale, want_scale) and scale[0, 0] == 1.0
    assert torch.equal(x8.view(torch.uint8), want8.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_two_fp8_terms_a_token_keep_seven_bits_in_one_pass(dtype: torch.dtype,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """kernels.quantize_two_terms_fp8 (its interpreter here) against fp8.quantize_two_terms:
    the first M rows are quantize_tokens' (scales exact, entries but where the
    interpreter's e4m3 rounding drops a carry), the next M their residual's, each with
    its own scale; the two terms give x back within 2^-5 of a row's largest value (2^-8
    where the rounding is PyTorch's), far closer than one term, on rows of a length no
    block divides, a zero row and a peak past e4m3's range."""
    pytest.importorskip("triton")
    from test_kernels import same_fp8

    from replicas import kernels
    from replicas.fp8 import quantize_two_terms

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    m, k = 5, 1500
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 3, m)[:, None]).to(dtype)
    x[0] = 0.0
    x[3, 1100] = 9000.0
    got8, got_scale = kernels.quantize_two_terms_fp8(x)
    want8, want_scale = quantize_two_terms(x)
    assert got8.shape == (2 * m, k) and got8.dtype == FP8 and got_scale.shape == (2 * m, 1)
    assert torch.equal(got_scale[:m], want_scale[:m]) and got_scale[0, 0] == 1.0
    same_fp8(got8[:m], want8[:m])
    exact = x.double()
    one = want8[:m].double() * want_scale[:m].double()
    for x8, scale, bound in ((got8, got_scale, 2.0 ** -5), (want8, want_scale, 2.0 ** -8)):
        both = x8[:m].double() * scale[:m] + x8[m:].double() * scale[m:]
        err = (both - exact).abs().amax(dim=1)
        top = exact.abs().amax(dim=1)
        assert bool((err <= top * bound).all()), (err / top.clamp(min=1e-30)).tolist()
    assert float((one - exact).abs().amax()) > 16 * float(
        (want8[:m].double() * want_scale[:m] + want8[m:].double() * want_scale[m:]
         - exact).abs().amax())
    assert torch.equal(want8[m].float(), torch.zeros(k)) and want_scale[m, 0] == 1.0


def test_weight_only_fp8_takes_two_terms_from_the_rows_set(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """fp8.TWO_TERM_ROWS ($TPSERVE_FP8_TWO_TERMS): a weight-only product of that many rows
    or more runs x's two FP8 terms through the FP8 matmul (on CPU its reference), within
    a few 16-bit roundings of the product of x itself where W8A8's one term is off by
    far more; fewer rows, a float32 x, a shape FP8 tensor cores refuse and the LM head's
    call (two_terms=False) keep the widened product; the kernels' path (interpreter)
    stays as close; a count that is not one is refused."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
    w8, ws = quantize_rows(torch.randn(48, 64, generator=gen))
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    exact = x.double() @ (w8.double() * ws.double()[:, None]).T + bias.double()
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "0")
    plain = fp8_linear(x, w8, ws, bias)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "4")
    two = fp8_linear(x, w8, ws, bias)
    one = fp8_linear(x, w8, ws, bias, w8a8=1)
    assert two.dtype == torch.bfloat16 and not torch.equal(two, plain)
    top = float(exact.abs().max())
    assert float((two.double() - exact).abs().max()) <= top * 2.0 ** -6
    assert float((one.double() - exact).abs().max()) > 4 * float(
        (two.double() - exact).abs().max())
    assert torch.equal(fp8_linear(x[:3], w8, ws, bias), plain[:3])  # 3 rows < 4
    assert torch.equal(fp8_linear(x, w8, ws, bias, two_terms=False), plain)
    assert torch.equal(fp8_linear(x.float(), w8, ws, bias.float()),
                       fp8_linear(x.float(), w8, ws, bias.float(), two_terms=False))
    w8_odd, ws_odd = quantize_rows(torch.randn(40, 72, generator=gen))  # 72 % 16 != 0
    x_odd = torch.randn(8, 72, generator=gen).to(torch.bfloat16)
    assert torch.equal(fp8_linear(x_odd, w8_odd, ws_odd),
                       fp8_linear(x_odd, w8_odd, ws_odd, two_terms=False))
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")  # (e4m3 rounding may lose a carry there)
    assert float((fp8_linear(x, w8, ws, bias).double() - exact).abs().max()) <= (
        top * 2.0 ** -6)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "many")
    with pytest.raises(ValueError, match="TPSERVE_FP8_TWO_TERMS"):
        fp8_linear(x, w8, ws, bias)


def test_two_fp8_terms_in_one_kernel_are_the_float32_sum_rounded_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.w8a8_two_terms (PERF.md v1.03; its interpreter here, float32 out: its
    bf16 stores truncate), in each of TWO_TERMS_CONFIGS, with a bias and without, on a
    shape no block divides: float64's sum of both terms' products. fp8_linear off the
    Triton path with $TPSERVE_FP8_TWO_TERMS_FUSED=1 rounds that sum once to bf16 (half a
    bf16 step), within
    2^-7 of the product of x itself; an odd count of rows, or a setting other than 0 or
    1, is refused."""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.fp8 import quantize_two_terms
    from replicas.kernels.fp8mm import TWO_TERMS_CONFIGS

    gen = torch.Generator().manual_seed(11)
    m, n, k = 5, 144, 304  # (multiples of 16, as FP8 tensor cores need)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x[2, 7] = 60.0
    w8, ws = quantize_rows(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    x8, xs = quantize_two_terms(x)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FUSED", "1")
    for b in (bias, None):
        exact = x.double() @ (w8.double() * ws.double()[:, None]).T
        exact = exact if b is None else exact + b.double()
        terms = x8.double() * xs.double()
        want = (terms[:m] + terms[m:]) @ (w8.double() * ws.double()[:, None]).T
        want = want if b is None else want + b.double()
        got16 = fp8_linear(x, w8, ws, b)  # (the reference: not the Triton path here)
        torch.testing.assert_close(got16.double(), want, rtol=2.0 ** -8, atol=1e-4)
        assert float((got16.double() - exact).abs().max()) <= (
            float(exact.abs().max()) * 2.0 ** -7)
        monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
        for config in TWO_TERMS_CONFIGS:
            got = kernels.w8a8_two_terms(x8, xs, w8, ws, b, torch.float32, config)
            assert got.shape == (m, n) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4,
                                       msg=str(config))
        monkeypatch.delenv("TPSERVE_TRITON_CPU")
    with pytest.raises(ValueError, match="even"):
        kernels.w8a8_two_terms(x8[:-1], xs[:-1], w8, ws, None, torch.bfloat16)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FUSED", "yes")
    with pytest.raises(ValueError, match="TPSERVE_FP8_TWO_TERMS_FUSED"):
        fp8_linear(x, w8, ws, bias)

def test_two_fp8_terms_score_like_weight_only(ckpt: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """An fp8 engine (bfloat16) whose weight-only layers take two FP8 terms from the
    first row scores as the plain weight-only engine does (KL within 10 %), closer to the
    16-bit engine than W8A8's one term (teacher-forced, replicas/accuracy.py)."""
    prompts = sequences(2, 48, 1000, seed=5)
    base = EngineConfig(model=ckpt, dtype="bfloat16", max_model_len=128,
                        max_num_batched_tokens=16)
    ref = scored(base, prompts)
    rows = {}
    for name, quantization, terms in (("weight-only", "fp8", "0"), ("two", "fp8", "1"),
                                      ("w8a8", "fp8-w8a8", "0")):
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", terms)
        rows[name] = compare(ref, scored(dataclasses.replace(base, quantization=quantization),
                                         prompts))
    assert rows["two"] != rows["weight-only"]  # (this random model: 16-bit rounding's
    # own moves dominate: KL 0.0253 both, W8A8's 0.0440 when written, PERF.md v1.02)
    assert rows["two"]["mean_kl"] < 1.1 * rows["weight-only"]["mean_kl"], rows
    assert 1.1 * rows["weight-only"]["mean_kl"] < rows["w8a8"]["mean_kl"], rows


def test_every_w8a16_config_is_the_weight_only_product(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Each config the w8a16 probe times (replicas/bench.py w8a16_suite) computes the same
    product as the default, swapped (y^T = W x^T) or not, on a shape none of their blocks
    divides, with a bias and without."""
    pytest.importorskip("triton")
    from replicas.kernels.fp8mm import W8A16_CONFIGS

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    assert {c[-1] for c in W8A16_CONFIGS} == {False, True}
    _w8a16_against_float64(list(W8A16_CONFIGS), 130, 3)


def ranked_timer(calls: list[int], first_fastest: bool
                 ) -> Callable[[Any, list[torch.Tensor]], float]:
    """A probe's timer for the interpreter: runs fn on the last weight copy, records how
    many copies it was given in `calls`, and ranks each call by its order (the first
    the fastest, or the last)."""
    def timer(fn: Any, copies: list[torch.Tensor]) -> float:
        fn(copies[-1])
        calls.append(len(copies))
        return float(len(calls) if first_fastest else 100 - len(calls))
    return timer


def test_w8a16_probe_times_every_config_against_cublas(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The fp8 probe's rows (replicas/bench.py w8a16_probe; on a GPU its timer is a CUDA
    graph over cycled weights): every config and F.linear timed per shape and rows,
    the best of them named, and each config's product checked."""
    pytest.importorskip("triton")
    from replicas.bench import w8a16_probe
    from replicas.kernels.fp8mm import W8A16_CONFIGS

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    calls: list[int] = []
    timer = ranked_timer(calls, first_fastest=True)
    # float16: Triton's interpreter mis-multiplies bfloat16 (the GPU runs it)
    rows = w8a16_probe({"o": (48, 40)}, (3, 17), "cpu", timer, 1e-3, torch.float16)
    assert [r["case"] for r in rows] == ["w8a16_o_m3", "w8a16_o_m17"]
    for row in rows:
        assert row["best"] == row["default"]  # timed first of the configs: the fastest
        assert row["best_us"] < row["times_us"][str(W8A16_CONFIGS[-1])]
        assert len(row["times_us"]) >= len(W8A16_CONFIGS) + 2 and not row["failed"]
        assert row["widen_cublas_us"] == row["times_us"]["widen+cublas"] > 0
        assert row["default_us"] is not None and row["fp8_floor_us"] > 0
    assert all(c == 32 for c in calls)  # a small matrix: 32 copies, cold each time


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ConfigError, match="quantization='int4'"):
        EngineConfig(quantization="int4")
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4': use one of 'auto', 'fp8', "
                                          "'int8'"):
        EngineConfig(kv_cache_dtype="int4")
    assert EngineConfig(kv_cache_dtype="int8").kv_cache_dtype == "int8"


def test_w8a8_weight_only_names_projections_of_fp8_w8a8() -> None:
    """w8a8_weight_only: comma-separated projections of PROJECTIONS, with fp8-w8a8 only;
    anything else is refused by name, not ignored."""

    config = EngineConfig(quantization="fp8-w8a8", w8a8_weight_only=" qkv_proj,down_proj ")
    assert config.weight_only_projections() == ("qkv_proj", "down_proj")
    assert EngineConfig(quantization="fp8-w8a8").weight_only_projections() == ()
    assert set(PROJECTIONS) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    with pytest.raises(ConfigError, match="w8a8_weight_only='q_proj': name projections of "
                                          "qkv_proj, o_proj"):
        EngineConfig(quantization="fp8-w8a8", w8a8_weight_only="q_proj")
    with pytest.raises(ConfigError, match="is for quantization='fp8-w8a8', not 'fp8'"):
        EngineConfig(quantization="fp8", w8a8_weight_only="qkv_proj")


def test_keep_16bit_names_projections_of_a_quantized_model() -> None:
    """keep_16bit: comma-separated projections of PROJECTIONS, with fp8 or fp8-w8a8, none
    also named weight-only; anything else is refused by name."""
    config = EngineConfig(quantization="fp8-w8a8", keep_16bit="qkv_proj, o_proj,down_proj")
    assert config.kept_16bit_projections() == ("qkv_proj", "o_proj", "down_proj")
    assert EngineConfig(quantization="fp8", keep_16bit="down_proj").keep_16bit == "down_proj"
    with pytest.raises(ConfigError, match="keep_16bit='mlp': name projections of qkv_proj"):
        EngineConfig(quantization="fp8", keep_16bit="mlp")
    with pytest.raises(ConfigError, match="keep_16bit='o_proj' is for quantization 'fp8' or "
                                          "'fp8-w8a8'"):
        EngineConfig(keep_16bit="o_proj")
    with pytest.raises(ConfigError, match="qkv_proj: in both keep_16bit"):
        EngineConfig(quantization="fp8-w8a8", keep_16bit="qkv_proj,o_proj",
                     w8a8_weight_only="qkv_proj")


def test_w8a8_group_is_a_power_of_two_of_fp8_w8a8() -> None:
    assert EngineConfig(quantization="fp8-w8a8", w8a8_group=32).w8a8_group == 32
    for bad in (16, 48, -32):
        with pytest.raises(ConfigError, match=f"w8a8_group={bad}: use 0"):
            EngineConfig(quantization="fp8-w8a8", w8a8_group=bad)
    with pytest.raises(ConfigError, match="w8a8_group=32 is for quantization='fp8-w8a8'"):
        EngineConfig(quantization="fp8", w8a8_group=32)


@pytest.fixture(scope="module")
def ckpt(checkpoint: CheckpointFactory) -> str:
    return checkpoint("llama")


def test_w8a8_groups_through_the_engine_kernels_and_reference_alike(
        ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8-w8a8 with w8a8_group=32 and qkv_proj weight-only: the layers compute with
    runs of 32 (qkv weight-only); the engine's logits through the Triton kernel (its
    interpreter) and through the PyTorch reference agree, and differ from per-token
    W8A8's; a model whose inputs are not runs of the group is refused by layer."""
    pytest.importorskip("triton")
    from replicas.accuracy import compare, scored, sequences

    config = EngineConfig(model=ckpt, dtype="float32", max_model_len=64,
                          quantization="fp8-w8a8", w8a8_weight_only="qkv_proj",
                          w8a8_group=32)
    with Engine(config) as eng:
        kinds = {(name.rsplit(".", 1)[-1], m.w8a8) for name, m in
                 eng.worker.model.named_modules()
                 if isinstance(m, ColumnParallelLinear | RowParallelLinear)}
        vocab = eng.spec.vocab_size
    assert kinds == {("qkv_proj", 0), ("o_proj", 32), ("gate_up_proj", 32),
                     ("down_proj", 32)}
    prompts = sequences(2, 24, vocab, seed=2)
    reference = scored(config, prompts)
    per_token = scored(dataclasses.replace(config, w8a8_group=0), prompts)
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    from replicas import kernels

    calls = []
    through = kernels.w8a8_groups
    monkeypatch.setattr(kernels, "w8a8_groups",
                        lambda *a, **k: calls.append(1) or through(*a, **k))
    kernel = scored(config, prompts)
    assert calls  # (the kernel ran, not the reference twice)
    assert compare(reference, kernel)["mean_kl"] < 1e-6
    assert compare(reference, per_token)["mean_kl"] > 1e-6
    with pytest.raises(ConfigError, match="w8a8_group=128: layer .* not runs of 128"):
        Engine(dataclasses.replace(config, w8a8_group=128))


def test_w8a8_inputs_quantized_in_one_pass_score_as_the_two_kernels(
        ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8-w8a8 (a scale per token) through the kernels (their interpreter), in bfloat16:
    down_proj's input made by kernels.silu_mul_quantize_fp8 at tp=1, and qkv_proj's and
    gate_up_proj's by kernels.rms_norm_quantize_fp8 (prompts, multi-row steps), give the
    logits the norm or silu_and_mul then fp8_linear's own quantization give, exactly.
    (The wiring; each kernel's rounding in bf16, fp16 and float32 is held bit for bit by
    the two tests of the kernels alone. A float32 run of this one cost ~65-85 s of CI.)
    Every W8A8 product's quantized input (its FP8 bytes and scales, `w8a8_tokens`' x8 and
    x_scale) is compared too, not only the logits: a 1 % change to SwiGLU's input moved
    the tiny llama's logits at one prompt of two only (session 52), its FP8 bytes at
    every product."""
    dtype = "bfloat16"
    pytest.importorskip("triton")
    from replicas import fp8, kernels, parallel
    from replicas.accuracy import scored, sequences

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    config = EngineConfig(model=ckpt, dtype=dtype, max_model_len=64,
                          quantization="fp8-w8a8")
    prompts = sequences(1, 24, 200, seed=3)
    calls: list[str] = []
    for name in ("silu_mul_quantize_fp8", "rms_norm_quantize_fp8"):
        fused = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _f=fused, _n=name, **k: calls.append(_n) or _f(*a, **k))
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in (fp8, parallel):  # (parallel's layers call their own import of it)
        product = module.w8a8_tokens
        monkeypatch.setattr(module, "w8a8_tokens", lambda x8, xs, *a, _p=product, **k: (
            inputs.append((x8.view(torch.uint8).clone(), xs.clone())) or _p(x8, xs, *a, **k)))
    one_pass = scored(config, prompts)
    assert set(calls) == {"silu_mul_quantize_fp8", "rms_norm_quantize_fp8"}
    fused_inputs = list(inputs)
    monkeypatch.setattr(RowParallelLinear, "takes_tokens_fp8", lambda self: False)
    monkeypatch.setattr(ColumnParallelLinear, "takes_tokens_fp8", lambda self: False)
    calls.clear()
    inputs.clear()
    two_kernels = scored(config, prompts)
    assert not calls
    # qkv, o, gate_up, down of each layer, every step of the teacher-forced prompt
    assert len(fused_inputs) == len(inputs) >= 8
    for (x8, xs), (y8, ys) in zip(fused_inputs, inputs, strict=True):
        assert torch.equal(x8, y8) and torch.equal(xs, ys)
    for a, b in zip(one_pass, two_kernels, strict=True):
        assert torch.equal(a, b)


def test_w8a8_runs_of_k_left_to_the_next_norm_score_as_added_first(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.80's wiring: with every W8A8 product of >= 2 rows and no bias made in
    two runs of K (a stand-in for the GPU's ("streams", 2) picks: the reference product of
    each half), o_proj's and down_proj's runs left unadded (RunSum) and added by the next
    norm's kernel (the interpreter, float16) score exactly as with them added first
    (TPSERVE_W8A8_FOLD=0), teacher-forced prompts; the last layer's in the head."""
    pytest.importorskip("triton")
    from replicas import fp8, parallel
    from replicas.accuracy import scored, sequences
    from replicas.kernels import RunSum

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    real = fp8.w8a8_tokens
    deferred: list[int] = []

    def in_runs(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                defer: bool = False) -> torch.Tensor | RunSum:
        m, k = x8.shape
        if bias is not None or m < 2:
            return real(x8, x_scale, w8, scale, bias, out_dtype)
        runs = RunSum([fp8._w8a8_reference(x8[:, lo:hi].float() * x_scale, w8[:, lo:hi],
                                           scale, None, out_dtype)
                       for lo, hi in ((0, k // 2), (k // 2, k))])
        if defer:
            deferred.append(m)
        return runs if defer else runs.total()

    monkeypatch.setattr(fp8, "w8a8_tokens", in_runs)
    monkeypatch.setattr(parallel, "w8a8_tokens", in_runs)
    # (qwen2: a bias on qkv only, none on o_proj and down_proj, as GLM-4-9B)
    config = EngineConfig(model=checkpoint("qwen2"), dtype="float16", max_model_len=64,
                          quantization="fp8-w8a8")
    prompts = sequences(1, 24, 200, seed=4)  # (one: ~6 s a run in the interpreter)
    folded = scored(config, prompts)
    assert deferred
    deferred.clear()
    monkeypatch.setenv("TPSERVE_W8A8_FOLD", "0")
    added = scored(config, prompts)
    assert not deferred
    for a, b in zip(folded, added, strict=True):
        assert torch.equal(a, b)


def test_two_fp8_terms_left_to_the_norm_and_swiglu_score_as_added_first(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v1.04's wiring: weight-only FP8 with x's two terms from the first row, at
    tp=1 (the interpreter, float16): o_proj's and down_proj's two products left unadded
    (RunSum) for the next norm's kernel, gate_up_proj's for SwiGLU's
    ($TPSERVE_FP8_TWO_TERMS_FOLD=1), score exactly as with them added first (0),
    teacher-forced prompts; the last layer's in the head; qkv_proj (its bias; attention
    reads it) never defers."""
    pytest.importorskip("triton")
    from replicas import kernels, parallel
    from replicas.accuracy import scored, sequences

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "1")
    real_parts, real_silu = parallel.two_term_parts, kernels.silu_and_mul
    deferred: list[tuple[int, int]] = []
    summed: list[int] = []

    def parts(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> Any:
        out = real_parts(x, w8, scale)
        if out is not None:
            deferred.append(tuple(w8.shape))
        return out

    def silu(gate_up: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None:
            summed.append(gate_up.shape[0])
        return real_silu(gate_up, extra)

    monkeypatch.setattr(parallel, "two_term_parts", parts)
    monkeypatch.setattr(kernels, "silu_and_mul", silu)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FOLD", "1")
    # (v1.04 alone: with v1.06 on, gate_up_proj's terms come from the norm, not parts)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_NORM", "0")
    # (qwen2: a bias on qkv only, none on o_proj, gate_up_proj and down_proj, as GLM-4-9B)
    config = EngineConfig(model=checkpoint("qwen2"), dtype="float16", max_model_len=64,
                          quantization="fp8")
    prompts = sequences(1, 24, 200, seed=4)  # (one: ~6 s a run in the interpreter)
    folded = scored(config, prompts)
    assert summed and len({shape for shape in deferred}) == 3, deferred  # o, gate_up, down
    deferred.clear()
    summed.clear()
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FOLD", "0")
    added = scored(config, prompts)
    assert not deferred and not summed
    for a, b in zip(folded, added, strict=True):
        assert torch.equal(a, b)


def test_two_fp8_terms_made_by_the_norm_score_as_the_quantization_kernels(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v1.06's wiring: weight-only FP8 with x's two terms from the first row (the
    interpreter, float16), qkv_proj's and gate_up_proj's inputs quantized by the norm
    before them ($TPSERVE_FP8_TWO_TERMS_NORM=1), alone and with v1.04's products left
    to their readers (the norm then also adds o_proj's and down_proj's), score exactly
    as with the quantization kernel after a plain norm (both 0)."""
    pytest.importorskip("triton")
    from replicas import kernels

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "1")
    real = kernels.rms_norm_quantize_fp8
    normed: list[bool] = []

    def spy(*args: Any, two: bool = False, **kw: Any) -> Any:
        normed.append(two and kw.get("extra") is not None)
        return real(*args, two=two, **kw)

    monkeypatch.setattr(kernels, "rms_norm_quantize_fp8", spy)
    config = EngineConfig(model=checkpoint("qwen2"), dtype="float16", max_model_len=64,
                          quantization="fp8")
    prompts = sequences(1, 24, 200, seed=4)  # (one: ~6 s a run in the interpreter)
    scores = {}
    for norm, fold in (("0", "0"), ("1", "0"), ("1", "1")):
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_NORM", norm)
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FOLD", fold)
        normed.clear()
        scores[norm, fold] = scored(config, prompts)
        # (each of the 2 layers' two norms; with folds, those after o_proj and
        # down_proj add their parts: extra)
        assert bool(normed) == (norm == "1") and any(normed) == (fold == "1"), normed
    for other in (scores["1", "0"], scores["1", "1"]):
        for a, b in zip(scores["0", "0"], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.serial  # (three tp=2 engines, ranks in their own processes: pyproject's why)
def test_tp2_two_fp8_terms_folded_and_normed_score_as_added(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """v1.04's folds and v1.06's norm-made terms (on by default) at tp=2, the ranks in
    their own processes (the interpreter, float16, x's two terms from the first row):
    scores exactly as with both off (the row-parallel products, all-reduced, are added
    before the norm; gate_up's, each rank's own, by SwiGLU), and two terms did run
    there (without them the scores differ)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    config = EngineConfig(model=checkpoint("qwen2"), dtype="float16", max_model_len=64,
                          quantization="fp8", tp=2)
    prompts = sequences(1, 24, 200, seed=4)
    scores = {}
    for terms, fold_norm in (("0", "1"), ("1", "0"), ("1", "1")):
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", terms)
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FOLD", fold_norm)
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_NORM", fold_norm)
        scores[terms, fold_norm] = scored(config, prompts)
    for a, b, one in zip(scores["1", "0"], scores["1", "1"], scores["0", "1"], strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, one)


def test_swiglu_of_two_rows_is_swiglu_of_their_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.silu_and_mul(a, extra=b) (PERF.md v1.04; the interpreter, float16 and
    float32) equals silu_and_mul(a + b) bit for bit, the sum rounded as PyTorch's add; a
    second row of another shape is refused."""
    pytest.importorskip("triton")
    from replicas import kernels

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float16, torch.float32):
        a, b = (torch.randn(3, 2 * 1100, generator=gen).to(dtype) for _ in range(2))
        assert torch.equal(kernels.silu_and_mul(a, b), kernels.silu_and_mul(a + b))
    with pytest.raises(ValueError, match="not gate_up's"):
        kernels.silu_and_mul(a, b[:, :10])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("two", [False, True])
def test_rms_norm_quantized_in_one_pass_is_the_two_kernels_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, with_residual: bool,
        two: bool) -> None:
    """A W8A8 projection's input (kernels.rms_norm_quantize_fp8): exactly what rms_norm
    then quantize_tokens_fp8 give, FP8 entries and scales, and the same residual sum;
    rows past a power of two wide, a zero row (scale 1), rows far apart in size. `two`
    (PERF.md v1.06, weight-only FP8's input): its two FP8 terms, exactly what
    quantize_two_terms_fp8 gives for rms_norm's row."""
    pytest.importorskip("triton")
    from replicas import kernels

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    m, n = 5, 300
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(m, n, generator=gen) * torch.logspace(-2, 2, m)[:, None]).to(dtype)
    x[0] = 0.0
    residual = torch.randn(m, n, generator=gen).to(dtype) if with_residual else None
    if residual is not None:
        residual[0] = 0.0
    weight = (1 + torch.rand(n, generator=gen)).to(dtype)
    x8, scale, s = kernels.rms_norm_quantize_fp8(x, weight, 1e-5, residual, two=two)
    h, want_s = kernels.rms_norm(x, weight, 1e-5, residual)
    want8, want_scale = (kernels.quantize_two_terms_fp8 if two
                         else kernels.quantize_tokens_fp8)(h)
    assert x8.shape == ((1 + two) * m, n) and x8.dtype == FP8
    assert scale.dtype == torch.float32
    assert torch.equal(scale, want_scale) and scale[0, 0] == 1.0
    assert torch.equal(x8.view(torch.uint8), want8.view(torch.uint8))
    assert torch.equal(s, want_s if residual is not None else x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("quantized", [True, False])
def test_the_norm_adds_two_runs_of_k_as_pytorch_adds_them(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, quantized: bool) -> None:
    """PERF.md v0.80: rms_norm and rms_norm_quantize_fp8 given x's two parts (a W8A8
    product's runs of K, `extra`) give, bit for bit, what they give for the sum PyTorch
    makes of them (x += extra, as w8a8_cublas adds its runs), with the same residual sum;
    a row where the parts cancel, rows far apart in size; no residual: refused. (Not
    bfloat16 here: Triton's interpreter truncates float32 to bfloat16 where a GPU, as
    PyTorch, rounds to nearest; test_gpu.py holds bfloat16 on the GPU.)"""
    pytest.importorskip("triton")
    from replicas import kernels

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    m, n = 5, 300
    gen = torch.Generator().manual_seed(n + 1)
    a, b, residual = ((torch.randn(m, n, generator=gen)
                       * torch.logspace(-2, 2, m)[:, None]).to(dtype) for _ in range(3))
    b[1] = -a[1]  # the parts cancel: the residual alone
    weight = (1 + torch.rand(n, generator=gen)).to(dtype)
    total = a.clone()
    total += b
    if quantized:
        got = kernels.rms_norm_quantize_fp8(a, weight, 1e-5, residual, extra=b)
        want = kernels.rms_norm_quantize_fp8(total, weight, 1e-5, residual)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        with pytest.raises(ValueError, match="residual"):
            kernels.rms_norm_quantize_fp8(a, weight, 1e-5, None, extra=b)
    else:
        got_h, got_s = kernels.rms_norm(a, weight, 1e-5, residual, extra=b)
        want_h, want_s = kernels.rms_norm(total, weight, 1e-5, residual)
        assert torch.equal(got_h, want_h) and torch.equal(got_s, want_s)
        with pytest.raises(ValueError, match="residual"):
            kernels.rms_norm(a, weight, 1e-5, None, extra=b)
    assert not torch.equal(total, a)  # (the parts were not both zero)


def test_w8a8_weight_only_projections_compute_weight_only(ckpt: str) -> None:
    """With fp8-w8a8 and w8a8_weight_only="qkv_proj", each layer's qkv_proj holds FP8
    weights but computes weight-only (w8a8 False), every other projection on FP8 inputs;
    the engine then generates (its simulation's accuracy: replicas/w8a8_formats.py)."""
    with Engine(EngineConfig(model=ckpt, dtype="float32", max_model_len=128,
                             quantization="fp8-w8a8", w8a8_weight_only="qkv_proj")) as eng:
        kinds = {(name.rsplit(".", 1)[-1], m.w8a8) for name, m in
                 eng.worker.model.named_modules()
                 if isinstance(m, ColumnParallelLinear | RowParallelLinear)}
        assert all(m.weight.dtype == FP8 for m in eng.worker.model.modules()
                   if isinstance(m, ColumnParallelLinear | RowParallelLinear))
        assert kinds == {("qkv_proj", False), ("o_proj", True), ("gate_up_proj", True),
                         ("down_proj", True)}
        assert len(eng.generate([[5, 6, 7, 8, 9]], GREEDY)[0].token_ids) > 0


def test_kept_projections_stay_16bit_and_the_others_run_fp8(ckpt: str) -> None:
    """fp8-w8a8 with keep_16bit="qkv_proj,o_proj,down_proj": only gate_up holds FP8
    weights (on FP8 inputs); the kept layers keep the checkpoint's weights as they are,
    and with all four kept and a 16-bit LM head (with FP8 weights the head reads FP8
    rows in steps of up to 64 rows, as these) the engine scores exactly as the
    unquantized one."""
    prompts = sequences(1, 32, 1000, seed=9)
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=64)
    plain = scored(base, prompts)
    with Engine(base) as eng:
        weights = {name: m.weight.detach().clone() for name, m in
                   eng.worker.model.named_modules()
                   if isinstance(m, ColumnParallelLinear | RowParallelLinear)}
    config = EngineConfig(**{**base.to_dict(), "quantization": "fp8-w8a8",
                             "keep_16bit": "qkv_proj,o_proj,down_proj"})
    with Engine(config) as eng:
        layers = {name: m for name, m in eng.worker.model.named_modules()
                  if isinstance(m, ColumnParallelLinear | RowParallelLinear)}
        for name, m in layers.items():
            if name.endswith("gate_up_proj"):
                assert m.weight.dtype == FP8 and m.w8a8
            else:
                assert torch.equal(m.weight, weights[name]) and not is_fp8(m)
        mixed = [eng.score(prompts[0])]
    assert 0 < compare(plain, mixed)["mean_kl"] < 0.5
    every = EngineConfig(**{**config.to_dict(), "keep_16bit": ",".join(PROJECTIONS),
                            "fp8_lm_head": 0})
    assert torch.equal(scored(every, prompts)[0], plain[0])


@pytest.mark.parametrize("quantization", ["fp8", "fp8-w8a8"])
def test_linear_layers_hold_fp8_and_the_rest_stays(ckpt: str, quantization: str) -> None:
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=128)
    with Engine(base) as plain:
        plain_bytes = plain.worker.weight_bytes
    with Engine(EngineConfig(model=ckpt, dtype="float32", max_model_len=128,
                             quantization=quantization)) as eng:
        linears = [m for m in eng.worker.model.modules()
                   if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
        assert linears and all(m.weight.dtype == FP8 and m.weight_scale is not None
                               and m.weight_scale.shape == (m.weight.shape[0],)
                               and m.gemv is None
                               and m.w8a8 == (quantization == "fp8-w8a8") for m in linears)
        # the head: FP8 rows by default (fp8_lm_head), its own kept beside
        head = next(m for m in eng.worker.model.modules() if isinstance(m, ParallelLMHead))
        assert head.weight.dtype == FP8 and head.candidates == 16
        assert head.weight16.dtype == torch.float32
        assert eng.worker.model.model.embed_tokens.weight.dtype == torch.float32
        # the linear layers' bytes drop to a quarter of float32's; the head's FP8 rows add
        linear_bytes = sum(m.weight.numel() for m in linears)
        assert eng.worker.weight_bytes == (plain_bytes - 3 * linear_bytes
                                           + head.weight.numel())
        first = eng.generate([[5, 6, 7, 8, 9]], GREEDY)[0]
        again = eng.generate([[5, 6, 7, 8, 9]], GREEDY)[0]
    assert first.token_ids == again.token_ids and len(first.token_ids) == 12


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp8_lm_head_decodes_the_16bit_heads_tokens(checkpoint: CheckpointFactory,
                                                     family: str) -> None:
    """fp8_lm_head = C: the head holds FP8 rows and keeps its 16-bit rows (the
    embedding's own when tied: no second copy); greedy decoding picks the 16-bit head's
    tokens (each row's top C rescored), while the logprobs, normalized over FP8 logits
    for the rest of the vocabulary, move a little: one request at a time (steps of one
    row) and all at once (steps of a row each, up to parallel.FP8_HEAD_ROWS)."""
    base = EngineConfig(model=checkpoint(family), dtype="float32", max_model_len=64,
                        quantization="fp8", fp8_lm_head=0)
    logged = dataclasses.replace(GREEDY, logprobs=True)
    with Engine(base) as eng:
        plain_bytes = eng.worker.weight_bytes
        tied = eng.worker.spec.tie_word_embeddings
        plain = [eng.generate([p], logged)[0] for p in PROMPTS]
    with Engine(dataclasses.replace(base, fp8_lm_head=64)) as eng:
        head = eng.worker.model.lm_head
        assert head.weight.dtype == FP8 and head.candidates == 64
        assert head.weight16.dtype == torch.float32
        embedding = eng.worker.model.model.embed_tokens.weight
        assert (head.weight16.data_ptr() == embedding.data_ptr()) == tied
        # the FP8 rows are added; the 16-bit rows are counted once either way
        assert eng.worker.weight_bytes == plain_bytes + head.weight.numel()
        fp8 = [eng.generate([p], logged)[0] for p in PROMPTS]
        both = eng.generate(PROMPTS, logged)
    def moved(a: Any, b: Any) -> float:
        assert a.token_ids == b.token_ids
        return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))

    assert len(PROMPTS) > 1
    assert all(1e-4 < moved(a, b) < 0.05 for a, b in zip(plain * 2, fp8 + both, strict=True))


def test_fp8_lm_head_reads_fp8_rows_in_steps_of_up_to_fp8_head_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """parallel.FP8_HEAD_ROWS (64): a step of more rows reads the 16-bit rows alone; a
    step of up to that many, each of its rows gets its own top C rescored over FP8
    logits."""
    from replicas import parallel
    from replicas.fp8 import quantize_head

    gen = torch.Generator().manual_seed(5)
    w, h = torch.randn(300, 32, generator=gen), torch.randn(3, 32, generator=gen)
    head = ParallelLMHead(300, 32, parallel.Comm())
    head.weight.data.copy_(w)
    quantize_head(head, 8)
    exact = h @ w.T
    rough = h @ (head.weight.float() * head.weight_scale[:, None]).T
    assert parallel.FP8_HEAD_ROWS == 64
    monkeypatch.setattr(parallel, "FP8_HEAD_ROWS", 2)
    torch.testing.assert_close(head(h), exact)
    monkeypatch.setattr(parallel, "FP8_HEAD_ROWS", 3)
    got = head(h)
    for r in range(3):
        top = rough[r].topk(8).indices
        want = rough[r].clone()
        want[top] = exact[r, top]
        torch.testing.assert_close(got[r], want)
    assert not torch.allclose(got, exact, atol=1e-3)


def test_fp8_lm_head_reads_its_rows_in_the_heads_own_configs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Triton path (its interpreter here) a step of 2 to FP8_HEAD_ROWS rows reads
    the FP8 head through kernels.w8a16 in kernels.W8A16_HEAD_PICKS' config for its rows
    (W8A16_MANY_ROWS past them), with the logits of the path without kernels (C = 4:
    rescore_top's set is then each row's top C, as torch.topk's)."""
    pytest.importorskip("triton")
    from replicas import kernels, parallel
    from replicas.fp8 import quantize_head

    gen = torch.Generator().manual_seed(6)
    head = ParallelLMHead(300, 32, parallel.Comm())
    head.weight.data.copy_(torch.randn(300, 32, generator=gen))
    quantize_head(head, 4)
    real, configs = kernels.w8a16, []

    def w8a16(*args: Any, config: Any = None) -> torch.Tensor:
        configs.append(config)
        return real(*args, config=config)

    monkeypatch.setattr(kernels, "w8a16", w8a16)
    for rows in (3, 20, 40):
        h = torch.randn(rows, 32, generator=gen)
        plain = head(h)
        monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
        torch.testing.assert_close(head(h), plain, rtol=1e-5, atol=1e-5)
        monkeypatch.delenv("TPSERVE_TRITON_CPU")
    assert configs == [(16, 64, 128, 4, 4, False), (32, 64, 128, 4, 4, False),
                       kernels.w8a16_config(40)]


def test_fp8_lm_head_is_a_count_of_candidates() -> None:
    """16 by default with FP8 weights (PERF.md v0.94), none without; set, as set."""
    assert EngineConfig(fp8_lm_head=4).lm_head_candidates() == 4
    assert EngineConfig(quantization="fp8", fp8_lm_head=0).lm_head_candidates() == 0
    assert EngineConfig(quantization="fp8-w8a8").lm_head_candidates() == 16
    assert EngineConfig().lm_head_candidates() == 0
    assert EngineConfig().lm_head_candidates(fp8_weights=True) == 16  # an FP8 checkpoint
    assert EngineConfig(fp8_lm_head=0).lm_head_candidates(fp8_weights=True) == 0
    for bad in (-1, 1025):
        with pytest.raises(ConfigError, match="fp8_lm_head"):
            EngineConfig(fp8_lm_head=bad)


def test_accuracy_measure(ckpt: str) -> None:
    """compare(): an engine against itself agrees everywhere with no divergence; FP8
    weights move the distributions a little (KL > 0), the top-1 tokens mostly stay."""
    prompts = sequences(2, 48, 1000, seed=3)
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=128,
                        max_num_batched_tokens=16)
    ref = scored(base, prompts)
    same = compare(ref, ref)
    assert same == {"positions": 96, "top1_agreement": 1.0, "mean_kl": 0.0}
    fp8 = compare(ref, scored(EngineConfig(**{**base.to_dict(), "quantization": "fp8"}),
                              prompts))
    assert fp8["positions"] == 96 and 0 < fp8["mean_kl"] < 0.5
    assert 0.5 < fp8["top1_agreement"] < 1.0


@pytest.mark.slow
def test_tp2_fp8_scores_like_tp1_fp8(ckpt: str) -> None:
    """At tp=2 each rank quantizes its own shard (row-parallel layers: a scale per row of
    its columns), so the numbers differ a little from tp=1's, and the distributions stay
    close to them."""
    prompts = sequences(1, 24, 1000, seed=4)
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=64, comm_dtype="float32",
                        quantization="fp8")
    one = scored(base, prompts)
    two = scored(EngineConfig(**{**base.to_dict(), "tp": 2}), prompts)
    row = compare(one, two)
    assert 0 < row["mean_kl"] < 0.05 and row["top1_agreement"] >= 0.75
@pytest.mark.slow
def test_tp2_int8_kv_scores_like_tp1(ckpt: str) -> None:
    """At tp=2 each rank caches its own KV heads in int8, each (token, head) row with its
    own scale, as tp=1 does: the keys and values are the same rows, so only the
    all-reduces' order of summation moves the scores."""
    prompts = sequences(1, 24, 1000, seed=4)
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=64, comm_dtype="float32",
                        kv_cache_dtype="int8", max_num_batched_tokens=8)
    one = scored(base, prompts)
    two = scored(EngineConfig(**{**base.to_dict(), "tp": 2}), prompts)
    row = compare(one, two)
    assert row["mean_kl"] < 1e-4 and row["top1_agreement"] == 1.0


@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])  # blocks divide it; they do not
@pytest.mark.parametrize("kind", ["plain", "gated", "norm"])
def test_fp8_gemv_is_the_scaled_rows_product(shape: tuple[int, int], kind: str) -> None:
    """The batch-1 GEMV on FP8 weights (Triton; its interpreter on CPU) equals the
    16-bit GEMV of the dequantized weights, for each kind it fuses (SwiGLU, RMSNorm)."""
    pytest.importorskip("triton")  # (as tests/test_kernels.py: the interpreter runs it)
    from replicas import kernels

    gen = torch.Generator().manual_seed(12)
    w8, scale = quantize_rows(torch.randn(*shape, generator=gen))
    dense = w8.float() * scale[:, None]
    bias = torch.randn(shape[0], generator=gen)
    x = torch.randn(1, 2 * shape[1] if kind == "gated" else shape[1], generator=gen)
    res, norm_w = torch.randn(1, shape[1], generator=gen), 1 + torch.rand(shape[1]) / 4
    # small tiles, and the widest FP8-only one (more rows a program than either shape's
    # blocks divide: masked rows), and PERF.md v0.85's trials: a register cap (taken as a
    # config, the cap itself only on a GPU), each tile's products summed as made (RED)
    firsts: dict[int, torch.Tensor] = {}
    for config in [(8, 64, 4, 2), (16, 128, 4, 3), kernels.FP8_GEMV_CONFIGS[4],
                   (8, 64, 4, 2, 80), (8, 64, 4, 2, 0, 1), (16, 32, 4, 2, 80, 1)]:
        if kind == "norm":
            got, got_sum = kernels.gemv_norm(x, res, norm_w, 1e-5, w8, bias, config, scale)
            want, want_sum = kernels.gemv_norm(x, res, norm_w, 1e-5, dense, bias, config)
            torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)
        else:
            got = kernels.gemv(x, w8, bias, config, gated=kind == "gated", scale=scale)
            want = kernels.gemv(x, dense, bias, config, gated=kind == "gated")
        assert got.shape == (1, shape[0]) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        firsts.setdefault(0, got)  # (every config: the same sums, in another order)
        torch.testing.assert_close(got, firsts[0], atol=1e-4, rtol=1e-5, msg=str(config))


def test_fp8_decode_through_the_gemvs(ckpt: str) -> None:
    """Batch-1 decode with every FP8 projection on the GEMV (weights rounded, input rows
    not) stays as close to the float32 engine as the FP8 matmul path (both rounded)."""
    pytest.importorskip("triton")
    prompt = sequences(1, 24, 1000, seed=5)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=128, cuda_graphs=False)
    with Engine(base) as plain:
        want = plain.generate([prompt], params)[0]
    runs = {}
    with Engine(EngineConfig(**{**base.to_dict(), "quantization": "fp8"})) as engine:
        for on in (False, True):
            for module in engine.worker.model.modules():
                if isinstance(module, ColumnParallelLinear | RowParallelLinear):
                    module.gemv = (16, 32, 4, 1) if on else None
            runs[on] = engine.generate([prompt], params)[0]
    first = [torch.tensor(r.logprobs[:1]) for r in (want, runs[False], runs[True])]
    # the first token's log-probability (same prefix for all three): both FP8 paths
    # within a few % of float32, the GEMV's (weights only rounded) no further
    assert abs(float(first[2] - first[0])) <= max(0.05, 1.5 * abs(float(first[1] - first[0])))
    assert runs[True].token_ids[0] == want.token_ids[0]


def test_8_bit_kv_caches_hold_more_tokens_in_the_same_memory(ckpt: str) -> None:
    """kv_cache_dtype="fp8": one byte an entry, so the same kv_cache_memory holds 4x the
    blocks of a float32 cache (2x a 16-bit one); "int8": one byte an entry and a float32
    scale a (token, head) row, 4 D / (D + 4) times the blocks. The outputs stay close to
    float32's, int8's closer than e4m3's."""
    base = EngineConfig(model=ckpt, dtype="float32", max_model_len=128,
                        kv_cache_memory=2**20, max_num_batched_tokens=16)
    prompts = sequences(2, 40, 1000, seed=6)
    blocks = {}
    outs = {}
    dtypes = {"auto": torch.float32, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
    for kv, dtype in dtypes.items():
        with Engine(EngineConfig(**{**base.to_dict(), "kv_cache_dtype": kv})) as eng:
            blocks[kv] = eng.stats()["num_kv_blocks"]
            assert eng.worker.kv[0][0].dtype == dtype
            d = eng.worker.spec.head_dim
            outs[kv] = [eng.score(p) for p in prompts]
    assert abs((blocks["fp8"] + 1) - 4 * (blocks["auto"] + 1)) <= 4
    assert abs((blocks["int8"] + 1) - 4 * d / (d + 4) * (blocks["auto"] + 1)) <= 4
    rows = {kv: compare(outs["auto"], outs[kv]) for kv in ("fp8", "int8")}
    for row in rows.values():
        assert 0 < row["mean_kl"] < 0.2 and row["top1_agreement"] > 0.5
    assert rows["int8"]["mean_kl"] < rows["fp8"]["mean_kl"] / 4


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_checkpoint(src: str, dst: Path, per: str, extra: dict | None = None) -> str:
    """`src` (16-bit) stored with FP8 linear weights as FP8 checkpoints on the hub lay
    them out: each `*.weight` in float8_e4m3fn and its `*.weight_scale` ([out, 1] per
    channel, or a scalar per tensor), one static `input_scale`, and a quantization_config
    in config.json."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in Path(src).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    for name in [n for n in tensors if n.split(".")[-2] in LINEARS and n.endswith("weight")]:
        w = tensors[name]
        if per == "channel":
            w8, scale = quantize_rows(w)
            tensors[name], tensors[name + "_scale"] = w8, scale[:, None]
        else:
            scale = w.abs().max().float() / FP8_MAX
            tensors[name] = (w.float() / scale).to(FP8)
            tensors[name + "_scale"] = scale
    tensors["model.layers.0.mlp.down_proj.input_scale"] = torch.tensor(0.01)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     **(extra or {})}
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize("per", ["channel", "tensor"])
def test_an_fp8_checkpoint_loads_as_it_is(ckpt: str, tmp_path: Path, per: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Stored per channel, it is exactly what quantization="fp8" makes of the 16-bit
    checkpoint: the same scores bit for bit. Per tensor, close to them. It runs as FP8
    without being asked (its LM head as fp8_lm_head's default for FP8 weights), and its
    static input_scale is reported, not used."""
    stored = fp8_checkpoint(ckpt, tmp_path / "fp8", per)
    prompts = sequences(1, 32, 1000, seed=8)
    ours = scored(EngineConfig(model=ckpt, dtype="float32", max_model_len=64,
                               quantization="fp8"), prompts)
    with caplog.at_level(logging.WARNING, logger="replicas.loader"):
        theirs = scored(EngineConfig(model=stored, dtype="float32", max_model_len=64),
                        prompts)
    assert "input_scale" in caplog.text and "not used" in caplog.text
    if per == "channel":
        assert torch.equal(ours[0], theirs[0])
        return
    # per tensor: every row of a layer takes its one scale, the FP8 bytes as stored
    from safetensors.torch import load_file

    tensors = load_file(f"{stored}/model.safetensors")
    with Engine(EngineConfig(model=stored, dtype="float32", max_model_len=64)) as eng:
        assert eng.worker.model.lm_head.candidates == 16  # FP8 weights: the FP8 head too
        down = eng.worker.model.model.layers[1].mlp.down_proj
        assert torch.equal(down.weight.view(torch.uint8),
                           tensors["model.layers.1.mlp.down_proj.weight"].view(torch.uint8))
        want = tensors["model.layers.1.mlp.down_proj.weight_scale"]
        assert torch.equal(down.weight_scale, want.expand(down.weight.shape[0]))
        assert compare(ours, [eng.score(prompts[0])])["mean_kl"] < 0.2


def test_an_fp8_checkpoints_kv_cache_scales_are_reported_not_used(
        ckpt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Static KV-cache scales in the layouts FP8-KV checkpoints carry them (llm-compressor:
    self_attn.k_scale / v_scale; AutoFP8: k_proj / v_proj output_scale) load with the
    rest: reported, not used, and the weights' scales untouched (the same scores)."""
    from safetensors.torch import load_file, save_file

    plain = fp8_checkpoint(ckpt, tmp_path / "plain", "channel")
    kv = fp8_checkpoint(ckpt, tmp_path / "kv", "channel")
    tensors = load_file(f"{kv}/model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.02)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.03)
    tensors["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor(0.5)
    tensors["model.layers.1.self_attn.v_proj.output_scale"] = torch.tensor(0.5)
    save_file(tensors, f"{kv}/model.safetensors")
    prompts = sequences(1, 16, 1000, seed=9)
    with caplog.at_level(logging.WARNING, logger="replicas.loader"):
        theirs = scored(EngineConfig(model=kv, dtype="float32", max_model_len=64,
                                     kv_cache_dtype="int8"), prompts)
    assert "4 static KV-cache scales" in caplog.text and "not used" in caplog.text
    ours = scored(EngineConfig(model=plain, dtype="float32", max_model_len=64,
                               kv_cache_dtype="int8"), prompts)
    assert torch.equal(ours[0], theirs[0])


def test_unsupported_fp8_checkpoints_are_refused(ckpt: str, tmp_path: Path) -> None:
    blocks = fp8_checkpoint(ckpt, tmp_path / "blocks", "channel",
                            {"weight_block_size": [128, 128]})
    with pytest.raises(ConfigError, match="block-wise"):
        scored(EngineConfig(model=blocks, dtype="float32", max_model_len=64), [[5, 6]])
    missing = fp8_checkpoint(ckpt, tmp_path / "missing", "channel")
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{missing}/model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(tensors, f"{missing}/model.safetensors")
    with pytest.raises(ConfigError, match="no weight_scale for 1 layers"):
        scored(EngineConfig(model=missing, dtype="float32", max_model_len=64), [[5, 6]])


def test_quantize_groups_scales_each_run_of_a_token() -> None:
    from replicas.fp8 import quantize_groups

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen) * torch.logspace(-3, 3, 64)
    x[1, :32] = 0.0  # a zero run: scale 1, zeros
    x8, scales = quantize_groups(x, 32)
    assert x8.dtype == FP8 and x8.shape == (3, 64) and scales.shape == (3, 2)
    assert scales[1, 0] == 1.0 and torch.equal(x8[1, :32].float(), torch.zeros(32))
    back = x8.float().reshape(3, 2, 32) * scales[..., None]
    assert (x8.float().abs().amax(-1) <= FP8_MAX).all()
    big = x.abs().reshape(3, 2, 32) > scales[..., None] * FP8_MAX / 64
    err = (back - x.reshape(3, 2, 32)).abs()
    assert (err[big] <= x.abs().reshape(3, 2, 32)[big] / 16 * 1.01).all()
    # one run per token is quantize_tokens' rounding
    whole, per_token = quantize_groups(x, 64), quantize_tokens(x)
    assert torch.equal(whole[0].float(), per_token[0].float())
    assert torch.equal(whole[1], per_token[1])
    with pytest.raises(ValueError, match="64 input columns are not runs of 48"):
        quantize_groups(x, 48)


@pytest.mark.parametrize("shape", [(33, 72, 128), (5, 40, 64), (1, 16, 32)])
def test_w8a8_groups_kernel_is_the_group_scaled_product(shape: tuple[int, int, int],
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """The Triton FP8 matmul with a scale per token and run of 32 columns (its
    interpreter here) against float64 of the same FP8 values and scales, in every config
    the probe times, with a bias and without, M and N that its blocks do not divide."""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.fp8 import quantize_groups
    from replicas.kernels.fp8mm import W8A8_GROUPS_CONFIGS

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    m, n, k = shape
    gen = torch.Generator().manual_seed(k)
    x8, xs = quantize_groups(torch.randn(m, k, generator=gen) * 3, 32)
    w8, ws = quantize_rows(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen)
    xd = (x8.double().reshape(m, -1, 32) * xs.double()[..., None]).reshape(m, k)
    want = xd @ (w8.double() * ws.double()[:, None]).T
    for config in (None, *W8A8_GROUPS_CONFIGS):
        for b in (None, bias):
            got = kernels.w8a8_groups(x8, xs, w8, ws, b, torch.float32, config)
            plus = 0.0 if b is None else b.double()
            torch.testing.assert_close(got.double(), want + plus, rtol=1e-5, atol=1e-4,
                                       msg=str(config))
    with pytest.raises(ValueError, match="power of two >= 32"):
        kernels.w8a8_groups(x8, torch.ones(m, k // 16), w8, ws)


def token_scaled_products(kernel: Any, configs: Any, shape: tuple[int, int, int],
                          biases: tuple[bool, ...]) -> tuple[torch.Tensor, ...]:
    """`kernel` (w8a8_per_token's arguments) in each of `configs`, with a bias or without
    as `biases` says, against float64 of the same FP8 values and scales; returns x8, its
    scales, w8 and its scales."""
    m, n, k = shape
    gen = torch.Generator().manual_seed(k)
    x8, xs = quantize_tokens(torch.randn(m, k, generator=gen) * 3)
    w8, ws = quantize_rows(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen)
    want = (x8.double() * xs.double()) @ (w8.double() * ws.double()[:, None]).T
    for config in configs:
        for with_bias in biases:
            got = kernel(x8, xs, w8, ws, bias if with_bias else None, torch.float32, config)
            plus = bias.double() if with_bias else 0.0
            torch.testing.assert_close(got.double(), want + plus, rtol=1e-5, atol=1e-4,
                                       msg=str(config))
    return x8, xs, w8, ws


@pytest.mark.parametrize("shape", [(33, 72, 200), (5, 40, 128), (1, 16, 64)])
def test_w8a8_per_token_kernel_is_the_token_scaled_product(
        shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton FP8 matmul with a scale per token (the engine's W8A8 at a decode step's
    rows where tuning picks it; its interpreter here) against float64 of the same FP8
    values and scales, in every config pick_w8a8 times, plain and swapped, with a bias
    and without, M, N and K (200: a masked last step) its blocks do not divide."""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.kernels.fp8mm import W8A8_TOKENS_CONFIGS

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    assert {c[5] for c in W8A8_TOKENS_CONFIGS} == {False, True}
    assert {c[6] for c in W8A8_TOKENS_CONFIGS if len(c) > 6} == {2, 4}  # (v0.99)
    token_scaled_products(kernels.w8a8_per_token, W8A8_TOKENS_CONFIGS, shape, (False, True))


def test_w8a8_per_token_in_slices_of_k_is_the_product(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """PERF.md v0.99: the per-token configs in slices of K (2, 4: a masked last run in
    the last slice) against float64, with a bias and without, the counts back at 0; and
    TPSERVE_W8A8_SLICES=0 leaves them out of what pick_w8a8 times, under a key of its
    own for the kept picks (as TPSERVE_W8A8_CUBLAS=0 does for cuBLAS's runs)."""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.kernels import fp8mm

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    sliced = [c for c in fp8mm.W8A8_TOKENS_CONFIGS if len(c) > 6]
    token_scaled_products(kernels.w8a8_per_token, sliced, (33, 72, 1000), (False, True))
    assert not fp8mm._COUNTERS[torch.device("cpu")].any()
    key, every = fp8mm.w8a8_candidates()
    assert key == "w8a8" and set(sliced) <= set(every)
    assert set(fp8mm.W8A8_CUBLAS_CONFIGS) <= set(every)
    monkeypatch.setenv("TPSERVE_W8A8_SLICES", "0")
    key, fewer = fp8mm.w8a8_candidates()
    assert key == "w8a8 no-slices" and not set(sliced) & set(fewer)
    assert len(fewer) == len(every) - len(sliced)
    monkeypatch.setenv("TPSERVE_W8A8_CUBLAS", "0")
    assert fp8mm.w8a8_candidates() == (
        "w8a8 no-cublas no-slices", tuple(c for c in fp8mm.W8A8_TOKENS_CONFIGS if len(c) < 7))


def test_w8a8_engines_on_gpus_run_cublaslt_without_a_workspace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.79: a W8A8 engine on a GPU sets CUBLASLT_WORKSPACE_SIZE to 0 (cuBLAS then
    picks a gate_up kernel with no memset ahead of it in the decode graph), unless the
    caller set it; weight-only FP8, bf16 and CPU engines leave the environment alone."""
    from replicas.kernels.fp8mm import settle_cublaslt_workspace

    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    for quantization, device in (("fp8", gpu), ("none", gpu), ("fp8-w8a8", cpu)):
        assert settle_cublaslt_workspace(quantization, device) is None
        assert "CUBLASLT_WORKSPACE_SIZE" not in os.environ
    assert settle_cublaslt_workspace("fp8-w8a8", gpu) == "0"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "0"
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "4096")  # the caller's stands
    assert settle_cublaslt_workspace("fp8-w8a8", gpu) == "4096"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "4096"


def test_w8a8_cublas_in_runs_of_k_is_the_token_scaled_product() -> None:
    """PERF.md v0.71's candidates: `_scaled_mm` on runs of K whose products are added, or
    transposed, in every config of W8A8_CUBLAS_CONFIGS, with a bias and without: the same
    product as float64 of the same FP8 values (at K = 4,096 within float32's sums, as
    plain `_scaled_mm`). A K that does not split into the runs (in multiples of 16) is
    refused."""
    from replicas.kernels import fp8mm

    x8, xs, w8, ws = token_scaled_products(fp8mm.w8a8_cublas, fp8mm.W8A8_CUBLAS_CONFIGS,
                                           (33, 72, 208), (False, True))
    for config in fp8mm.W8A8_CUBLAS_CONFIGS:  # (a pick of one goes the same way)
        assert torch.equal(fp8mm.w8a8_picked(x8, xs, w8, ws, None, torch.float32, config),
                           fp8mm.w8a8_cublas(x8, xs, w8, ws, None, torch.float32, config))
    gen = torch.Generator().manual_seed(1)
    x8, xs = quantize_tokens(torch.randn(5, 4096, generator=gen) * 3)
    w8, ws = quantize_rows(torch.randn(40, 4096, generator=gen))
    want = (x8.double() * xs.double()) @ (w8.double() * ws.double()[:, None]).T
    for config in fp8mm.W8A8_CUBLAS_CONFIGS:
        got = fp8mm.w8a8_cublas(x8, xs, w8, ws, None, torch.float32, config).double()
        assert (got - want).abs().max() < 1e-5 * want.abs().max(), config
    with pytest.raises(ValueError, match="does not split into 4 runs"):
        fp8mm.w8a8_cublas(x8[:, :48], xs, w8[:, :48], ws, None, torch.float32,
                          ("streams", 4))
    with pytest.raises(ValueError, match="unknown W8A8 cuBLAS config"):
        fp8mm.w8a8_cublas(x8, xs, w8, ws, None, torch.float32, ("lanes", 2))


def test_w8a8_picks_choose_a_config_by_shape_and_rows(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """kernels.w8a8_config: the pick of the least count of rows at or above the step's, for
    the weight's shape; more rows than the last pick's, or a shape not tuned, go to
    `_scaled_mm` (None). Kept picks are read back only when every config is still known."""
    from replicas.kernels import fp8mm, w8a8_config
    from replicas.parallel import kept_w8a8

    plain, swapped = fp8mm.W8A8_TOKENS_CONFIGS[0], fp8mm.W8A8_TOKENS_CONFIGS[-1]
    monkeypatch.setattr(fp8mm, "W8A8_PICKS", {(4096, 4096): (
        (16, swapped), (64, None), (256, plain))})
    assert [w8a8_config(4096, 4096, m) for m in (1, 16, 17, 64, 65, 256, 257)] == [
        swapped, swapped, None, None, plain, plain, None]
    assert w8a8_config(4608, 4096, 16) is None
    kept = {"picks": [[16, list(swapped)], [64, None], [256, list(plain)]], "16 rows": {}}
    assert kept_w8a8(kept) == ((16, swapped), (64, None), (256, plain))
    streams = fp8mm.W8A8_CUBLAS_CONFIGS[0]  # (cuBLAS in runs of K: kept as JSON lists)
    assert kept_w8a8({"picks": [[256, list(streams)]]}) == ((256, streams),)
    assert kept_w8a8({"picks": [[256, ["streams", 3]]]}) is None
    for broken in (None, {}, {"picks": []}, {"picks": [[16, [1, 2, 3, 4, 5, False]]]},
                   {"picks": [["16", None]]}, {"picks": [[16]]}):
        assert kept_w8a8(broken) is None, broken


def test_w8a8_groups_probe_times_each_way_and_checks_each_product(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The w8a16 suite's second part (replicas/bench.py w8a8_groups_probe): per shape and
    rows, the group-scaled kernel in each config, per-token W8A8 (_scaled_mm), bf16
    F.linear and both input quantizations timed; the best config named."""
    pytest.importorskip("triton")
    from replicas.bench import w8a8_groups_probe
    from replicas.kernels.fp8mm import W8A8_GROUPS_CONFIGS

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    timer = ranked_timer([], first_fastest=False)
    rows = w8a8_groups_probe({"o": (48, 64)}, (3, 17), "cpu", timer, torch.float32)
    assert [r["case"] for r in rows] == ["w8a8_groups32_o_m3", "w8a8_groups32_o_m17"]
    for row in rows:
        assert set(row["times_us"]) == {"cublas", "scaled_mm per token", "quantize per token",
                                        "quantize groups of 32",
                                        *map(str, W8A8_GROUPS_CONFIGS)}
        assert row["best"] == str(W8A8_GROUPS_CONFIGS[-1])  # timed last: the fastest
        assert row["best_us"] < row["scaled_mm_us"] and row["k"] == 64


def test_pick_w8a8_takes_a_config_only_where_it_beats_scaled_mm(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.pick_w8a8's choice, run here with the interpreter's kernels, `_scaled_mm`
    stood in by the float32 reference and a stand-in timer: a config is picked only where
    it beats `_scaled_mm` by the margin, a Triton tile or cuBLAS in runs of K (PERF.md
    v0.71); a config that fails to build, or whose runs do not divide K, is skipped
    (logged), not fatal; one whose product disagrees stops the tuning."""
    pytest.importorskip("triton")
    from triton.compiler.errors import CompilationError

    from replicas.fp8 import _w8a8_reference
    from replicas.kernels import fp8mm, quant

    gemv = importlib.import_module("replicas.kernels.gemv")  # (kernels.gemv: the function)
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.setattr(fp8mm, "W8A8_TOKENS_CONFIGS", fp8mm.W8A8_TOKENS_CONFIGS[:3])
    good, broken, slow = fp8mm.W8A8_TOKENS_CONFIGS
    runs, odd = ("streams", 2), ("streams", 16)  # (16 runs do not divide K = 64)
    monkeypatch.setattr(fp8mm, "W8A8_CUBLAS_CONFIGS", (runs, odd))

    def scaled_mm(x8: torch.Tensor, wt: torch.Tensor, scale_a: torch.Tensor,
                  scale_b: torch.Tensor, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        y = _w8a8_reference(x8.float() * scale_a, wt.t(), scale_b.view(-1), bias,
                            out_dtype)
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    run = fp8mm.w8a8_per_token

    def per_token(*args: Any) -> torch.Tensor:
        if args[-1] == broken:
            raise CompilationError("", None, "a tile this Triton cannot build")
        return run(*args)

    monkeypatch.setattr(fp8mm, "w8a8_per_token", per_token)
    # (the timer: `_scaled_mm` 10 us; the good config 9 at 16 rows, 9.9 (within the
    # margin) at 32; the slow one 12; cuBLAS in two runs 9.5 at 16 rows, 8 at 48)
    rows_now: list[int] = []

    def timer(fn: Any, copies: list[torch.Tensor]) -> float:
        name = getattr(fn, "keywords", {}).get("config")
        if name is None:
            return 10.0
        return {good: 9.0 if rows_now[-1] == 16 else 9.9, slow: 12.0,
                runs: 9.5 if rows_now[-1] == 16 else 8.0 if rows_now[-1] == 48 else 11.0
                }[name]

    monkeypatch.setattr(gemv, "_cycled_us", timer)
    through = quant.quantize_tokens_fp8
    monkeypatch.setattr(quant, "quantize_tokens_fp8",
                        lambda x: rows_now.append(x.shape[0]) or through(x))
    w8, ws = quantize_rows(torch.randn(40, 64, generator=torch.Generator().manual_seed(5)))
    picks, times = fp8mm.pick_w8a8(w8, ws, True, rows=(16, 32, 48))
    assert picks == ((16, good), (32, None), (48, runs)), times
    # (broken and odd: skipped)
    assert set(times[16]) == {"scaled_mm", str(good), str(slow), str(runs)}
    monkeypatch.setenv("TPSERVE_W8A8_CUBLAS", "0")  # (the A/B's off side: Triton only)
    assert fp8mm.pick_w8a8(w8, ws, True, rows=(48,))[0] == ((48, None),)
    monkeypatch.delenv("TPSERVE_W8A8_CUBLAS")
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: scaled_mm(*a, **k) + 1.0)
    with pytest.raises(AssertionError, match="disagrees with _scaled_mm"):
        fp8mm.pick_w8a8(w8, ws, False, rows=(16,))


def test_w8a8_fast_accumulation_is_on_unless_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.83: a plain W8A8 `_scaled_mm` accumulates in the fast mode by default
    (its accuracy measured on the H200); TPSERVE_W8A8_FAST_ACCUM=0 turns it off."""
    from replicas.kernels.fp8mm import fast_accum_on

    monkeypatch.delenv("TPSERVE_W8A8_FAST_ACCUM", raising=False)
    assert fast_accum_on()
    monkeypatch.setenv("TPSERVE_W8A8_FAST_ACCUM", "0")
    assert not fast_accum_on()
    monkeypatch.setenv("TPSERVE_W8A8_FAST_ACCUM", "1")
    assert fast_accum_on()
