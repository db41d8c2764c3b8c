"""Triton kernels of the GPU path: paged attention (and decode attention that also
rotates and caches the new key), fused RMSNorm + residual, rotary with the KV-cache
write, SwiGLU, and the batch-1 GEMV (which can take the RMSNorm or the SwiGLU of its
input row into itself).

Each kernel replaces a chain of small PyTorch kernels that batch-1 decode pays for in
launches, and the attention kernel reads each sequence's keys straight through its block
table (no gather of the padded context, no mask tensor). The PyTorch path in `model.py`
stays the reference: on CPU it is the only path, and tests compare the two (on CPU
through Triton's interpreter, `TRITON_INTERPRET=1`, on GPU compiled).

Rounding follows transformers: where the reference rounds an intermediate to the model
dtype (the residual sum, the normalized activations, each rotary product, silu(gate)),
the kernels round it too, so float32 runs match exactly and 16-bit runs match to the
last bit in most positions.

`enabled(t)` decides per tensor: Triton importable, and `t` on a GPU (or, for tests,
`TPSERVE_TRITON_CPU=1` with the interpreter). `TPSERVE_KERNELS=0` turns them off.

One module per kernel family, each kernel next to its launcher: `norm`, `activation`,
`rope`, `attention`, `gemv` (and its tuning), `tokens` (feeding and greedy argmax),
`allreduce` (tensor parallelism's decode all-reduce, alone or folded into the GEMVs),
`fp8mm` (FP8 weights times 16-bit or, W8A8, FP8 activations, more than one row, and
the W8A8 matmul's tuning against `torch._scaled_mm`), `quant` (per-token
FP8 quantization of activations, the W8A8 path's input);
`common` holds `enabled`, PDL and block-size helpers. Callers use `kernels.X`: this
package re-exports every name they use.
"""

from replicas.kernels.activation import silu_and_mul
from replicas.kernels.allreduce import Site
from replicas.kernels.attention import _COUNTERS as _COUNTERS  # tests check the counters
from replicas.kernels.attention import (
    DECODE_TILE,
    NewKeys,
    decode_splits,
    engine_decode_tile,
    paged_attention,
)
from replicas.kernels.common import enabled, pdl
from replicas.kernels.fp8mm import (
    W8A16_HEAD_PICKS,
    RunSum,
    pick_w8a8,
    w8a8_config,
    w8a8_groups,
    w8a8_per_token,
    w8a8_picked,
    w8a8_two_terms,
    w8a16,
    w8a16_config,
)
from replicas.kernels.gemv import (
    FP8_GEMV_CONFIGS,
    FP8_GEMV_TRIALS,
    GEMV_CONFIGS,
    GemvConfig,
    GemvKind,
    gemv,
    gemv_configs,
    gemv_norm,
    gemv_push,
    pick_gemv,
)
from replicas.kernels.norm import rms_norm, rms_norm_quantize_fp8
from replicas.kernels.quant import (
    quantize_tokens_fp8,
    quantize_two_terms_fp8,
    silu_mul_quantize_fp8,
    widen_fp8,
)
from replicas.kernels.rope import rope_and_cache
from replicas.kernels.tokens import ARGMAX_BLOCK, argmax_rows, feed_tokens, rescore_top

__all__ = [
    "ARGMAX_BLOCK", "DECODE_TILE", "FP8_GEMV_CONFIGS", "FP8_GEMV_TRIALS", "GEMV_CONFIGS",
    "GemvConfig",
    "GemvKind", "NewKeys", "Site", "argmax_rows", "decode_splits", "enabled", "feed_tokens",
    "engine_decode_tile", "gemv", "gemv_configs", "gemv_norm", "gemv_push",
    "paged_attention", "pdl", "pick_gemv", "pick_w8a8", "quantize_tokens_fp8", "rescore_top",
    "rms_norm",
    "rms_norm_quantize_fp8",
    "rope_and_cache", "silu_and_mul", "silu_mul_quantize_fp8", "w8a8_config", "w8a8_groups",
    "RunSum", "W8A16_HEAD_PICKS", "w8a8_per_token", "w8a8_picked", "w8a16", "w8a16_config",
    "widen_fp8",
    "quantize_two_terms_fp8", "w8a8_two_terms",
]
