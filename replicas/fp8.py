"""FP8 (e4m3) weights, quantized at load, and the matmuls that read them.

Contract:
- `quantize_rows(w)`: w [out, in] -> (w8 float8_e4m3fn [out, in], scale float32 [out]),
  row i of w ~= w8[i] * scale[i]. One scale per output channel: max |w[i]| / 448 (e4m3's
  largest finite value), so no element saturates; a normal value keeps 3 mantissa bits
  (relative error <= 1/16). An all-zero row gets scale 1 (w8 zeros).
- `fp8_linear(x, w8, scale, bias, w8a8)`: x [tokens, in] @ (w8 * scale)^T (+ bias), in
  x's dtype. Weight-only (w8a8 False, quantization="fp8"): x stays as it is and only the
  weights are rounded: FP8 tiles widened in registers (replicas/kernels/fp8mm.py) up to
  DEQUANT_ROWS rows, the weight widened once and one 16-bit matmul beyond (from ~160
  rows the matmul is compute-bound and the widening costs less than the batch kernel's
  conversions; a long prefill's share of it is small); PyTorch's reference
  off the Triton path. W8A8 (quantization="fp8-w8a8"): x is quantized per token too (its
  own scale, max |x_row| / 448; one Triton kernel on the GPU path,
  `kernels.quantize_tokens_fp8`) and the product runs as one `torch._scaled_mm` (FP8
  tensor cores on a GPU, where in and out must be multiples of 16 and x 16-bit; on CPU
  the float32 product of the rounded operands): faster prefill, and ~2.5 points of top-1
  agreement lost on the trained checkpoint where weight-only loses ~1 (PERF.md v0.22).
  Every W8A8 form adds a column-parallel layer's bias to the float32 product before its
  one rounding (`_scaled_mm`'s epilogue on a GPU; PERF.md v0.38).
- Weight-only from `TWO_TERM_ROWS` rows (96; 0 never; $TPSERVE_FP8_TWO_TERMS):
  x in two FP8 terms a token, its per-token rounding and that rounding's residual
  (`quantize_two_terms`; `kernels.quantize_two_terms_fp8` on the Triton path), through
  one W8A8 matmul of twice the rows, the two products added: ~7 of x's bits kept where
  W8A8 keeps 3, on FP8 tensor cores, the weight never widened (PERF.md v1.02).
- W8A8 with a scale per token and run of n input columns (`EngineConfig.w8a8_group`,
  fp8_linear's `w8a8` = n): x quantized per run (`quantize_groups`) and the product in
  one Triton kernel (`kernels.w8a8_groups`; off the Triton path the float32 product of
  the rounded operands): closer to the 16-bit model than per token (w8a8_formats.py).
- `quantize_model(model, w8a8, weight_only, keep)`: every ColumnParallelLinear and
  RowParallelLinear of the model gets its weight replaced by its FP8 form, a
  `weight_scale` and `w8a8` (fp8_linear's: 0 weight-only, 1 per token, n per run; 0 for
  the projections `weight_only` names: `EngineConfig.w8a8_weight_only`, e.g. qkv_proj,
  whose input costs W8A8 the most), but for the projections `keep` names
  (`EngineConfig.keep_16bit`), which stay 16-bit, weights and inputs; its
  forward then goes through `fp8_linear`, and a one-row input through the batch-1 GEMV
  where tuning picks it (replicas/kernels/gemv.py: FP8 tiles, the row's scale applied
  once at the end, the input row 16-bit in both modes). The embedding stays 16-bit (a
  row gather: no matmul to gain). The LM head (`quantize_head`, EngineConfig.fp8_lm_head,
  16 by default with FP8 weights) reads FP8 rows in steps of up to
  parallel.FP8_HEAD_ROWS rows (decode of up to 64 sequences), where its bytes are the
  cost (GLM-4-9B: 0.62 of ~10.6 GB a token saved), and each row's C highest logits are
  computed again from its 16-bit rows, kept beside (parallel.ParallelLMHead); steps of
  more rows use the 16-bit rows. FP8 logits alone cost 0.6 points of top-1 agreement
  on the trained checkpoint (98.93 -> 98.34 %, PERF.md v0.22); rescored, none (v0.94).
  Quantized after the 16-bit weights are loaded, layer by layer: the 16-bit copy of a
  layer is freed as its FP8 form takes its place, so the peak is the 16-bit model.
- A checkpoint stored in FP8 (`checkpoint_fp8(hf_config)`: a `quantization_config` of
  quant_method "fp8", or "compressed-tensors" with 8-bit float weights, per channel or
  per tensor) loads as it is: `prepare_model` gives the layers FP8 weights first, the
  loader copies the FP8 rows and each `weight_scale` (a scalar is every row's), and a
  static `input_scale` is reported and not used (activations are quantized per token,
  or not at all), and so are static KV-cache scales (`self_attn.k_scale` / `v_scale`,
  `k_proj` / `v_proj` `output_scale`: the cache follows `kv_cache_dtype`). Block-wise
  scales (`weight_block_size`) are refused by name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from replicas.kernels.fp8mm import RunSum

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def saturated(x: torch.Tensor) -> torch.Tensor:
    """x in FP8, values past +-448 clamped there (e4m3 has no infinity: a plain cast of
    them gives NaN)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def row_scales(amax: torch.Tensor, top: float) -> torch.Tensor:
    """amax / top in float32 (1 where amax is 0), each an IEEE division as the Triton
    kernels' div_rn: on CUDA, PyTorch divides by a Python number as a product with its
    rounded reciprocal, one ulp off for some amax, so the divisor is a tensor here."""
    amax = amax.float()
    return torch.where(amax > 0, amax / torch.full_like(amax, top), 1.0)


def quantize_blocks(x: torch.Tensor, rows: int, cols: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (x8 [R, C] FP8, scales [R / rows, C / cols] float32): each `rows` x
    `cols` block rounded with its own scale, max|block| / 448 (1 for a zero block), so
    that none saturates; the one FP8 rounding of rows, runs and blocks here."""
    r, c = x.shape
    if r % rows or c % cols:
        raise ValueError(f"a {r} x {c} tensor is not made of {rows} x {cols} blocks")
    shape = (r // rows, rows, c // cols, cols)
    scales = row_scales(x.abs().reshape(shape).amax(dim=(1, 3)), FP8_MAX)
    x8 = saturated(x.float().reshape(shape) / scales[:, None, :, None])
    return x8.reshape(r, c), scales


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8, scale) with w ~= w8 * scale[:, None] (see the module doc)."""
    w8, scales = quantize_blocks(w, 1, w.shape[1])
    return w8, scales[:, 0]


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] -> (x8 [tokens, in] FP8, scales [tokens, in / group] float32): each
    run of `group` columns of a token rounded with its own scale, max|run| / 448 (1 for a
    zero run), as quantize_rows rounds a row."""
    if x.shape[1] % group:
        raise ValueError(f"{x.shape[1]} input columns are not runs of {group}")
    return quantize_blocks(x, 1, group)


def widen_groups(x8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_groups' (x8, scales) -> the float32 values they stand for."""
    return (x8.float().unflatten(1, (scales.shape[1], -1)) * scales[..., None]).flatten(1)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] -> (x8, scale [tokens, 1] float32), per token as quantize_rows."""
    x8, scale = quantize_rows(x)
    return x8, scale[:, None]


def quantize_two_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, in] -> (x8 [2 * tokens, in] FP8, scales [2 * tokens, 1] float32): rows
    0..tokens-1 x quantized per token (quantize_tokens); rows tokens.. the residual of
    that rounding, x - x8 * scale (in float64, exact, then rounded once to float32, as a
    GPU's fma rounds it), quantized per token the same way. The two terms together keep
    ~7 of x's bits where one keeps 3 (weight-only FP8 on FP8 tensor cores, TWO_TERM_ROWS)."""
    hi8, hi_scale = quantize_tokens(x)
    rest = (x.double() - hi8.double() * hi_scale.double()).float()
    lo8, lo_scale = quantize_tokens(rest)
    return torch.cat([hi8, lo8]), torch.cat([hi_scale, lo_scale])


# weight-only layers, from this many rows of x (0: never; $TPSERVE_FP8_TWO_TERMS at each
# call where set): x in two FP8 terms a token (quantize_two_terms), both through one FP8
# tensor-core matmul of twice the rows (`w8a8_tokens`: cuBLAS's `_scaled_mm` past the
# W8A8 picks' rows), the two products added in x's dtype. From ~128 rows the FP8 weight's
# widened product is bound by the tensor cores, slower than bf16 cuBLAS (PERF.md at
# 5791d5b): two FP8 terms cost what one 16-bit product does in tensor-core time and read
# the weight once, in FP8. Top-1 agreement on the trained checkpoints (CPU, bfloat16, two
# terms from 64 rows: every scoring step): within 0.25 points of weight-only's on six
# (98.78 against 98.93 % on seed 0; W8A8's one term 97.41). On an H100 (PERF.md v1.02,
# FP8 decode steps, off against from 96 rows): 96 sequences 10.13 -> 8.53 ms, 128 10.21 ->
# 8.74, 160 18.82 -> 11.49; weight-only FP8 at 256 requests 9.7k -> 11.9k tok/s (12.7k ->
# 18.7k, prompts cached). At 64 sequences it lost (6.79 -> 7.65 ms): from 96 rows
TWO_TERM_ROWS = 96
# the two terms in one kernel (PERF.md v1.03): off. On an H100 at c1e2181 it was slower
# at every row count (256 rows: 323 us a layer against 235 unfused; FP8 decode at 128
# sequences 10.87 against 8.72 ms), though its largest error is about a third of the
# unfused one's (one rounding, no fast accumulation)
TWO_TERMS_FUSED = False
# the unfused two terms' products added by their readers (PERF.md v1.04; bit for bit the
# sum an add kernel makes): on. On an H100 at f5592e7, FP8 decode steps against the sums
# added first: 96 sequences 8.64 -> 8.34 ms, 128 8.81 -> 8.48, 160 11.65 -> 11.21
TWO_TERMS_FOLD = True
# the two terms of qkv_proj's and gate_up_proj's inputs written by the RMSNorm before
# them, in its kernel (PERF.md v1.06; bit for bit the quantization kernel's): on. On the
# same H100 with the folds: 96 sequences 8.34 -> 7.96 ms, 128 8.48 -> 8.03, 160 11.21 ->
# 10.79; weight-only FP8 at 256 requests 12.0k (folds 12.4k) -> 12.6k tok/s
TWO_TERMS_NORM = True


def two_term_rows() -> int:
    """TWO_TERM_ROWS, or $TPSERVE_FP8_TWO_TERMS (rows, 0: never) where set."""
    text = os.environ.get("TPSERVE_FP8_TWO_TERMS", "").strip()
    if not text:
        return TWO_TERM_ROWS
    if not text.isdigit():
        raise ValueError(f"TPSERVE_FP8_TWO_TERMS={text!r}: a number of rows (0: never)")
    return int(text)


def _two_terms(rows: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether a weight-only product of `rows` takes two FP8 terms (TWO_TERM_ROWS): 16-bit
    x, from that many rows, and the shapes FP8 tensor cores take (in and out multiples of
    16), on the Triton path and off it alike (the same rounding either way)."""
    least = two_term_rows()
    return (0 < least <= rows.shape[0] and rows.dtype in (torch.bfloat16, torch.float16)
            and not (w8.shape[0] % 16 or w8.shape[1] % 16))


def _two_term_linear(rows: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ (w8 * scale)^T (+ bias) in rows' dtype from rows' two FP8 terms: one
    matmul of their 2M rows, each product rounded to that dtype, the two added (then
    the bias)."""
    from replicas import kernels

    m = rows.shape[0]
    x8, x_scale = _two_term_inputs(rows)
    if two_terms_fused():  # one kernel: the sum in float32, rounded once (PERF.md v1.03)
        if kernels.enabled(rows):
            return kernels.w8a8_two_terms(x8, x_scale, w8, scale, bias, rows.dtype)
        x = x8.float() * x_scale
        return _w8a8_reference(x[:m] + x[m:], w8, scale, bias, rows.dtype)
    return two_term_linear(x8, x_scale, w8, scale, bias, rows.dtype)


def two_term_linear(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                    scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                    ) -> torch.Tensor:
    """The product from x's two FP8 terms already made (quantize_two_terms' form): the
    two `two_term_products` added in `dtype`, then the bias."""
    hi, lo = two_term_products(x8, x_scale, w8, scale, dtype)
    y = hi + lo
    return y if bias is None else y + bias


def _two_term_inputs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows' two FP8 terms and their scales ([2M, K], [2M, 1]): the Triton kernel's, or
    the reference off its path."""
    from replicas import kernels

    if kernels.enabled(rows):
        return kernels.quantize_two_terms_fp8(rows)
    return quantize_two_terms(rows)


def two_term_products(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                      scale: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """x's two FP8 terms' products (x8 [2M, K], x_scale [2M, 1]: quantize_two_terms'
    form) with w8 * scale, each rounded to `dtype`: one matmul of their 2M rows
    (`w8a8_tokens`), its halves."""
    m = x8.shape[0] // 2
    both = w8a8_tokens(x8, x_scale, w8, scale, None, dtype)
    assert isinstance(both, torch.Tensor)
    return [both[:m], both[m:]]


def two_term_parts(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor
                   ) -> RunSum | None:
    """Weight-only x @ (w8 * scale)^T where x [M, K] takes two FP8 terms (`_two_terms`)
    and they are neither fused nor kept added (`two_terms_fold`): the two products
    unadded, a RunSum whose reader (the next RMSNorm, SwiGLU) adds them as it reads them
    (PERF.md v1.04); else None (the caller runs fp8_linear)."""
    from replicas.kernels.fp8mm import RunSum

    if not takes_two_terms(x, w8) or not two_terms_fold():
        return None
    return RunSum(two_term_products(*_two_term_inputs(x), w8, scale, x.dtype))


def takes_two_terms(x: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether a weight-only product of x (rows of K) and w8 takes x's two FP8 terms
    through `w8a8_tokens` (`_two_terms`, not fused): the form whose quantization the
    norm before it may make (`two_terms_norm`, PERF.md v1.06)."""
    return _two_terms(x.reshape(-1, x.shape[-1]), w8) and not two_terms_fused()


def two_terms_fused() -> bool:
    """Whether two FP8 terms run fused (`kernels.w8a8_two_terms`: both terms' products
    added in float32 in one kernel, PERF.md v1.03) rather than through `w8a8_tokens` on
    2M rows and an add: $TPSERVE_FP8_TWO_TERMS_FUSED (TWO_TERMS_FUSED unset)."""
    return _switch("TPSERVE_FP8_TWO_TERMS_FUSED", TWO_TERMS_FUSED)


def two_terms_fold() -> bool:
    """Whether the unfused two terms' products may be left unadded for their reader (the
    next RMSNorm, SwiGLU: `two_term_parts`' callers, PERF.md v1.04):
    $TPSERVE_FP8_TWO_TERMS_FOLD (TWO_TERMS_FOLD unset)."""
    return _switch("TPSERVE_FP8_TWO_TERMS_FOLD", TWO_TERMS_FOLD)


def two_terms_norm() -> bool:
    """Whether the RMSNorm before a weight-only product that takes two terms writes
    them itself (`kernels.rms_norm_quantize_fp8(..., two=True)`, PERF.md v1.06):
    $TPSERVE_FP8_TWO_TERMS_NORM (TWO_TERMS_NORM unset)."""
    return _switch("TPSERVE_FP8_TWO_TERMS_NORM", TWO_TERMS_NORM)


def _switch(name: str, default: bool) -> bool:
    """$name, "1" on, "0" off, `default` unset; read at each call (an A/B in one
    process); anything else is refused."""
    text = os.environ.get(name, "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"{name}={text!r}: 0 or 1")
    return default if not text else text == "1"


# weight-only: from this many rows, widen the weight and use cuBLAS. The H200's probe at
# e08b4a2 (`--suite w8a16`, per GLM-4-9B layer): the batch kernel 268 µs at 128 rows
# (widening 306), 432 at 256 (widening 327); the lines cross near 160 (PERF.md v0.36)
DEQUANT_ROWS = 160


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, w8a8: int = 0, two_terms: bool = True
               ) -> torch.Tensor:
    """x @ (w8 * scale)^T (+ bias) in x's dtype (see the module doc). `w8a8`: 0 (False)
    weight-only; 1 (True) x quantized with a scale per token; n > 1 with a scale per
    token and run of n input columns. `two_terms`: weight-only may take x in two FP8
    terms (TWO_TERM_ROWS; False: never, as the FP8 LM head's batch kernel)."""
    from replicas import kernels

    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    if not w8a8:
        if two_terms and _two_terms(rows, w8):
            y = _two_term_linear(rows, w8, scale, bias)
        elif kernels.enabled(x) and rows.shape[0] < DEQUANT_ROWS:
            y = kernels.w8a16(rows, w8, scale, bias)
        elif kernels.enabled(x) and x.dtype in (torch.bfloat16, torch.float16):
            y = F.linear(rows, kernels.widen_fp8(w8, scale, x.dtype), bias)
        else:
            y = F.linear(rows, (w8.to(x.dtype) * scale[:, None].to(x.dtype)), bias)
        return y.reshape(*lead, w8.shape[0])
    out_dtype = w8a8_out_dtype(x.dtype, x.is_cuda)
    # W8A8 adds the bias to the float32 product, before its one rounding: in the
    # matmul's epilogue on a GPU (a separate add was its own kernel, 4.3 ms of the
    # 8192-token TTFT's 191 on the H200, and rounded twice)
    if w8a8 > 1:  # a scale per token and run of w8a8 input columns
        x8, x_scales = quantize_groups(rows, w8a8)
        if kernels.enabled(x):
            y = kernels.w8a8_groups(x8, x_scales, w8, scale, bias, out_dtype)
        else:
            y = _w8a8_reference(widen_groups(x8, x_scales), w8, scale, bias, out_dtype)
    else:
        x8, x_scale = (kernels.quantize_tokens_fp8(rows) if kernels.enabled(x)
                       else quantize_tokens(rows))
        y = w8a8_tokens(x8, x_scale, w8, scale, bias, out_dtype)
    return y.to(x.dtype).reshape(*lead, w8.shape[0])


def w8a8_out_dtype(dtype: torch.dtype, cuda: bool) -> torch.dtype:
    """The dtype W8A8's product is rounded to for an input of `dtype`: its own when
    16-bit or off a GPU, else bfloat16 (rowwise scaling on a GPU writes 16-bit only)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) or not cuda else torch.bfloat16


def w8a8_tokens(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                defer: bool = False) -> torch.Tensor | RunSum:
    """x8 [M, K] FP8 with a scale per token (x_scale [M, 1]) @ (w8 * scale)^T (+ bias),
    rounded once to out_dtype (w8a8_out_dtype): `_scaled_mm` on a GPU, or the Triton
    kernel its shape and rows were tuned to (`kernels.w8a8_config`); the float32
    reference off it. `defer`: a pick in runs of K may return them unadded (a RunSum,
    PERF.md v0.80)."""
    from replicas import kernels
    from replicas.kernels.fp8mm import fast_accum_on

    if not x8.is_cuda:
        return _w8a8_reference(x8.float() * x_scale, w8, scale, bias, out_dtype)
    # a decode step's few rows: the Triton kernel where tuning found it faster on this
    # shape (kernels.pick_w8a8, PERF.md v0.62)
    config = kernels.w8a8_config(w8.shape[0], w8.shape[1], x8.shape[0])
    if config is not None:  # (or cuBLAS in runs of K side by side, PERF.md v0.71)
        return kernels.w8a8_picked(x8, x_scale, w8, scale, bias, out_dtype, config, defer)
    # (out_dtype is 16-bit here, as `_scaled_mm`'s bias needs)
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=scale.view(1, -1),
                            bias=None if bias is None else bias.to(out_dtype),
                            out_dtype=out_dtype, use_fast_accum=fast_accum_on())


def _w8a8_reference(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 off the GPU: x (the rounded input's float32 values) @ the FP8 weight's float32
    values, plus the bias, rounded once to out_dtype (as the GPU's epilogue does)."""
    y = x @ (w8.float() * scale[:, None]).T
    return (y if bias is None else y + bias.float()).to(out_dtype)


def is_fp8(module: nn.Module) -> bool:
    """Whether a linear layer holds FP8 weights (quantize_model)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dtype == FP8


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from replicas.parallel import ColumnParallelLinear, RowParallelLinear

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, ColumnParallelLinear | RowParallelLinear)]


def _hold(name: str, layer: nn.Module, w8: torch.Tensor, scale: torch.Tensor,
          w8a8: int) -> None:
    """`layer` (called `name`) holds the FP8 weight w8 and its row scales from now on,
    and computes as fp8_linear's `w8a8` says."""
    from replicas.config import ConfigError

    out, k = w8.shape
    if w8a8 > 1 and k % w8a8:
        raise ConfigError(f"w8a8_group={w8a8}: layer {name} has {k} inputs on this rank, "
                          f"not runs of {w8a8}")
    if w8a8 and w8.is_cuda and (out % 16 or k % 16):
        raise ConfigError(f"quantization='fp8-w8a8': layer {name} is {out} x {k} on this "
                          "rank; FP8 tensor-core matmuls need both multiples of 16 "
                          "(quantization='fp8' takes any shape)")
    layer.weight = nn.Parameter(w8, requires_grad=False)
    layer.weight_scale = scale
    layer.w8a8 = w8a8
    layer.gemv = None


@torch.no_grad()
def quantize_model(model: nn.Module, w8a8: int = 0, weight_only: tuple[str, ...] = (),
                   keep: tuple[str, ...] = ()) -> int:
    """Every tensor-parallel linear layer's weight to FP8 in place (see the module doc),
    computing as fp8_linear's `w8a8` says, except the layers whose name ends in one of
    `weight_only`: those weight-only; and the layers whose name ends in one of `keep`
    (`EngineConfig.keep_16bit`) stay as they are, 16-bit. Returns the number of layers
    quantized."""
    layers = [(name, m) for name, m in _linear_layers(model)
              if not is_fp8(m) and not name.endswith(keep)]
    for name, layer in layers:
        _hold(name, layer, *quantize_rows(layer.weight.data),
              0 if name.endswith(weight_only) else w8a8)
    return len(layers)


@torch.no_grad()
def quantize_head(head: nn.Module, candidates: int) -> None:
    """The LM head (parallel.ParallelLMHead) reads FP8 rows in steps of up to
    parallel.FP8_HEAD_ROWS rows (decode), each row's C = `candidates` highest logits
    computed again from its 16-bit rows, kept beside (see ParallelLMHead;
    EngineConfig.fp8_lm_head)."""
    from replicas.config import ConfigError

    if candidates <= 0:
        raise ConfigError(f"fp8_lm_head={candidates}: an FP8 head rescores C >= 1 logits")
    head.weight16 = head.weight.data  # (the embedding's own rows when they are tied)
    w8, scale = quantize_rows(head.weight16)
    head.weight = nn.Parameter(w8, requires_grad=False)
    head.weight_scale = scale
    head.candidates = candidates
    head.gemv = None


def checkpoint_fp8(hf_config: object) -> bool:
    """Whether the checkpoint's weights are stored in FP8 in a layout this loads (see the
    module doc); a quantization this cannot load raises ConfigError."""
    from replicas.config import ConfigError

    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return False
    qc = qc if isinstance(qc, dict) else vars(qc)
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("weight_block_size"):
            raise ConfigError(f"this checkpoint's FP8 weights have block-wise scales "
                              f"(weight_block_size {qc['weight_block_size']}): only per-"
                              "channel or per-tensor scales load")
        return True
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8
                           and w.get("strategy") in ("channel", "tensor") for w in weights):
            return True
        raise ConfigError(f"this checkpoint's compressed-tensors scheme {weights!r} is not "
                          "FP8 weights with per-channel or per-tensor scales")
    raise ConfigError(f"this checkpoint is quantized with {method!r}: only FP8 checkpoints "
                      "(quant_method 'fp8' or compressed-tensors FP8) load")


@torch.no_grad()
def prepare_model(model: nn.Module, w8a8: int = 0, weight_only: tuple[str, ...] = ()
                  ) -> None:
    """The linear layers hold FP8 weights (their values and scales to be loaded: each
    scale NaN until then, `check_scales` says which stayed so); `w8a8` and `weight_only`
    as quantize_model's."""
    for name, layer in _linear_layers(model):
        weight = layer.weight
        _hold(name, layer, torch.empty_like(weight, dtype=FP8),
              torch.full((weight.shape[0],), float("nan"), device=weight.device),
              0 if name.endswith(weight_only) else w8a8)


def check_scales(model: nn.Module) -> None:
    """ConfigError naming the FP8 layers whose weight_scale the checkpoint lacked."""
    from replicas.config import ConfigError

    missing = [name for name, m in model.named_modules()
               if is_fp8(m) and bool(torch.isnan(m.weight_scale).any())]
    if missing:
        raise ConfigError(f"this FP8 checkpoint has no weight_scale for {len(missing)} "
                          f"layers, e.g. {missing[:3]}")
