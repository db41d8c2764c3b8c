"""`python tests/hopper_ptx.py fp8|int8|quant|gemv|rest`: compile kernels to PTX for an H200
(sm_90) on a machine with no GPU (Triton's own ptxas), GLM-4-9B's shapes: the KV-cache
kernels (the cache write, decode and prefill attention) with that 8-bit cache; the FP8
weight path's one-pass kernels (per-token quantization, widening); the GEMV with FP8
weights in each of FP8_GEMV_CONFIGS' tiles, with a register cap, and with the all-reduce
folded in (pushing its rows, pulling the peers'); or every other kernel of
replicas/kernels. Each compiled kernel's name is printed. A kernel that must round as
PyTorch does may not divide approximately (a GPU's `/` is div.full: not IEEE). Run by
tests/test_kernels.py in a process of its own: the tests' processes import the kernels
for Triton's interpreter, which cannot compile them."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from replicas.kernels import (
    activation,
    allreduce,
    attention,
    fp8mm,
    norm,
    quant,
    rope,
    stream,
    tokens,
)

# (the package's name `gemv` is the function it exports; the module is this)
gemv = importlib.import_module("replicas.kernels.gemv")

APPROXIMATE = re.compile(r"div\.(full|approx)\.f32")
FLOAT_ADD = re.compile(r"\badd(\.rn)?\.f32\b")


def ptx(jit: Any, pointers: dict[str, str], consts: dict[str, Any], warps: int = 4,
        stages: int = 3, maxnreg: int | None = None) -> str:
    """`jit` compiled for sm_90: its arguments typed by `pointers` (else i32), the
    constexprs among `consts` set (the others at their defaults); `maxnreg`: a cap on a
    thread's registers, which the PTX must then state."""
    params = inspect.signature(jit.fn).parameters
    names = list(params)
    consts = {n: v for n, v in consts.items() if n in names} | {  # (and defaults' values)
        n: p.default for n, p in params.items()
        if n not in consts and p.default is not inspect.Parameter.empty}
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn=jit, signature=signature,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    code = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})
    assert ".target sm_90" in code.asm["ptx"], jit.fn.__name__
    assert not maxnreg or f".maxnreg {maxnreg}" in code.asm["ptx"], jit.fn.__name__
    return code.asm["ptx"]


def gemvs() -> None:
    pointers = {**{n: "*bf16" for n in ("X", "B", "Y", "R", "NW", "ROUT")}, "W": "*fp8e4nv",
                "S": "*fp32", "DATA": "*i64", "FLAGS": "*i64", "CNT": "*i32", "eps": "fp32"}
    flags = {"SCALED": True, "HAS_BIAS": False, "EVEN": True, "GATED": False, "NORM": True,
             "HAS_RES": True, "ROW": 4096, "PUSH": False, "PULL": False, "RANK": 0,
             "WORLD": 1, "PDL": True}
    # a decoder layer's norm-fused FP8 GEMV (gate_up's kind) in each engine config: a
    # register cap and each tile summed as made where the config says so (PERF.md v0.85)
    for config in gemv.FP8_GEMV_CONFIGS:
        block_n, block_k, warps, stages, cap, red = gemv.gemv_config_parts(config)
        ptx(gemv._gemv_kernel, pointers, {**flags, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                          "RED": bool(red)}, warps, stages, cap)
    bf16 = {**pointers, "W": "*bf16"}
    folded = {**flags, "SCALED": False, "WORLD": 2, "BLOCK_N": 4, "BLOCK_K": 1024}
    ptx(gemv._gemv_kernel, bf16, {**folded, "NORM": False, "HAS_RES": False, "GATED": True,
                                   "PUSH": True})  # down_proj pushing its rows
    ptx(gemv._gemv_kernel, bf16, {**folded, "PULL": True})  # the next norm GEMV summing them
    # an FP8 gate_up GEMV with SwiGLU on its output (PERF.md v0.77)
    ptx(gemv._gemv_kernel, pointers, {**flags, "SWIGLU": True, "BLOCK_N": 16,
                                      "BLOCK_K": 512}, 8, 3)
    print(len(gemv.FP8_GEMV_CONFIGS) + 3, "GEMVs compiled for sm_90", flush=True)
    print("_gemv_kernel compiled for sm_90", flush=True)


def rest() -> list[tuple[Any, dict[str, str], dict[str, Any], bool]]:
    """The other kernels, as their launchers call them: (kernel, pointers, constexprs,
    whether it must round as PyTorch does)."""
    bf16 = "*bf16"
    sliced = {"P": "*fp32", "C": "*i32"}  # K in slices (PERF.md v0.98-v0.99): SPLIT 4
    w8a16 = [(fp8mm._w8a16_kernel, {"X": bf16, "W": "*fp8e4nv", "S": "*fp32", "B": "*fp32",
                                    "Y": bf16, **sliced},
              {"HAS_BIAS": swap, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap,
               "PREC": "tf32", "PDL": True, "SPLIT": split}, False)
             for (bm, bn, bk, _, _, swap, *_), split in (
                 (next(c for c in fp8mm.W8A16_CONFIGS if c[5] == s), split)
                 for s, split in ((False, 1), (True, 1), (False, 4)))]
    groups = (fp8mm._w8a8_groups_kernel, {"X": "*fp8e4nv", "XS": "*fp32", "W": "*fp8e4nv",
                                          "WS": "*fp32", "B": "*fp32", "Y": bf16, **sliced},
              {"HAS_BIAS": True, "GROUP": 32, "BLOCK_M": 64, "BLOCK_N": 128, "PDL": True,
               "TOKENS": False, "SWAP": False, "IMPRECISE": None},
              False)
    # W8A8 with a scale per token (w8a8_tokens: the kernel's TOKENS), plain, swapped, and
    # swapped in slices of K
    tokens_ = [(fp8mm._w8a8_groups_kernel, {**groups[1], "Y": bf16},
                {"HAS_BIAS": True, "GROUP": bk, "BLOCK_M": bm, "BLOCK_N": bn, "PDL": True,
                 "TOKENS": True, "SWAP": swap, "IMPRECISE": fp8mm.fp8_promotion(bk),
                 "SPLIT": (*more, 1)[0]}, False)
               for bm, bn, bk, _, _, swap, *more in (
                   next(c for c in fp8mm.W8A8_TOKENS_CONFIGS if c[5] == s and len(c) == n)
                   for s, n in ((False, 6), (True, 6), (True, 7)))]
    # x's two FP8 terms in one kernel (PERF.md v1.03), in its first config
    two = [(fp8mm._two_terms_kernel, {**groups[1], "Y": bf16},
            {"HAS_BIAS": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PDL": True,
             "IMPRECISE": fp8mm.fp8_promotion(bk)}, False)
           for bm, bn, bk, _, _ in fp8mm.TWO_TERMS_CONFIGS[:1]]
    return [*w8a16, groups, *tokens_, *two,
        (norm._rms_norm_kernel, {n: bf16 for n in ("X", "X2", "R", "W", "Y", "ROUT", "S")}
         | {"eps": "fp32"}, {"HAS_RES": True, "BLOCK": 4096, "QUANT": False, "PDL": True},
         False),
        # (with a W8A8 projection's per-token FP8 quantization: divides as PyTorch does;
        # and with the two runs of K of the product before it added in, PERF.md v0.80)
        # (and its two FP8 terms, weight-only FP8's input, PERF.md v1.06: exact, as
        # _quant_two_kernel)
        *[(norm._rms_norm_kernel, {n: bf16 for n in ("X", "X2", "R", "W", "ROUT")} | {
            "Y": "*fp8e4nv", "S": "*fp32", "eps": "fp32"},
           {"HAS_RES": True, "BLOCK": 4096, "QUANT": True, "PDL": True, "HAS_X2": x2,
            "TWO": two}, False)
          for x2, two in ((False, False), (True, False), (True, True))],
        # (and with a second row added in: weight-only FP8's two terms, PERF.md v1.04)
        *[(activation._silu_mul_kernel, {"GU": bf16, "GU2": bf16, "OUT": bf16},
           {"BLOCK": 1024, "PDL": True, "HAS_X2": x2}, False) for x2 in (False, True)],
        (allreduce._one_shot_kernel, {"X": bf16, "DATA": "*i64", "FLAGS": "*i64",
                                      "OVF": "*u8"},
         {"RANK": 0, "WORLD": 2, "WIRE": triton.language.float16,
          "BLOCK": allreduce.SLOT_BYTES // 2, "NSLOTS": 512, "CHECK": True, "PDL": True},
         False),
        (allreduce._pull_kernel, {"X": bf16, "Y": bf16, "CNT": "*i32"},
         {"WORLD": 2, "BLOCK": 1024, "PDL": True}, False),
        (tokens._feed_kernel, {"IDS": "*i64", "FEED": "*i64"}, {"BLOCK": 1024}, True),
        (tokens._argmax_part_kernel, {"X": "*fp32", "PV": "*fp32", "PI": "*i64"},
         {"BLOCK": tokens.ARGMAX_BLOCK, "PDL": True}, True),
        (tokens._argmax_merge_kernel, {"PV": "*fp32", "PI": "*i64", "OUT": "*i64"},
         {"BLOCK_P": 64, "PDL": True}, True),
        # (an FP8 LM head's rescored top logits, PERF.md v0.94)
        (tokens._top_part_kernel, {"X": "*fp32", "PV": "*fp32", "PI": "*i32"},
         {"K": tokens.TOP_PER_PART, "BLOCK": tokens.TOP_BLOCK, "PDL": True}, True),
        (tokens._rescore_kernel, {"X": "*fp32", "PV": "*fp32", "PI": "*i32", "H": bf16,
                                  "W": bf16},
         {"BLOCK_P": 512, "BLOCK_D": tokens.RESCORE_BLOCK_D, "PDL": True}, True),
        # (the bench's read floor, PERF.md v0.91)
        (stream._read_kernel, {"X": "*i64", "OUT": "*i64"},
         {"BLOCK": 2048, "ITERS": 4, "PDL": True}, True)]


def main(mode: str) -> None:
    if mode == "gemv":
        gemvs()
        return
    if mode == "rest":
        kernels = rest()
    elif mode == "quant":
        # one pass (GLM-4-9B's 4096-wide inputs; its 13,696-wide down_proj input), and two
        kernels = [(quant._quant_rows_kernel, {"X": "*bf16", "Y": "*fp8e4nv", "S": "*fp32"},
                    {"BLOCK_K": block, "ONE_PASS": block > quant.QUANT_BLOCK_K,
                     "PDL": True}, True) for block in (4096, quant.QUANT_BLOCK_K)]
        # (its SwiGLU divides as _silu_mul_kernel does: the same instruction)
        kernels += [(quant._silu_mul_quant_kernel, {"GU": "*bf16", "Y": "*fp8e4nv",
                                                    "S": "*fp32"},
                     {"BLOCK_K": block, "ONE_PASS": block > quant.QUANT_BLOCK_K,
                      "PDL": True}, False) for block in (16384, quant.QUANT_BLOCK_K)]
        # (two FP8 terms a row: GLM-4-9B's 4,096 and 13,696-wide inputs, PERF.md v1.02)
        kernels += [(quant._quant_two_kernel, {"X": "*bf16", "Y": "*fp8e4nv", "S": "*fp32"},
                     {"BLOCK_K": block, "PDL": True}, True) for block in (4096, 16384)]
        kernels += [(quant._widen_kernel, {"W": "*fp8e4nv", "S": "*bf16", "Y": "*bf16"},
                     {"BLOCK_N": quant.WIDEN_BLOCK[0], "BLOCK_K": quant.WIDEN_BLOCK[1],
                      "PDL": True}, False)]
    else:
        cache = "*i8" if mode == "int8" else "*fp8e4nv"
        pointers = {**{n: "*bf16" for n in ("Q", "K", "V", "COS", "SIN", "OUT")},
                    **{n: "*fp32" for n in ("KS", "VS", "OP", "LSE")}, "KC": cache,
                    "VC": cache, "SLOTS": "*i64", "POS": "*i64", "COUNT": "*i32",
                    "TABLES": "*i32", "CU_Q": "*i32", "scale_log2": "fp32"}
        flags = {"INT8_KV": mode == "int8", "FP8_KV": mode == "fp8", "PDL": True, "D": 128,
                 "BLOCK_D": 128, "INTERLEAVED": False, "PREC": "tf32", "BLOCK_N": 64,
                 "BLOCK_SIZE": 16, "G": 16}
        kernels = [(rope._rope_cache_kernel, pointers, {**flags, "TOKENS": 16}, True),
                   # (its softmax divides approximately; its cache write is the rotary
                   # kernel's _store_cache, checked there)
                   (attention._decode_kernel, pointers,
                    {**flags, "BLOCK_R": 16, "SPLITS": 4, "F16": False}, False),
                   # (and its float16 dots over this 8-bit cache, the probe's, PERF.md v0.70)
                   (attention._decode_kernel, pointers,
                    {**flags, "BLOCK_R": 16, "SPLITS": 4, "F16": True}, False),
                   (attention._attention_kernel, pointers,
                    {**flags, "TILE_T": 8, "BLOCK_R": 128, "SPLITS": 1}, False)]
    if mode == "rest":
        promoted_every_128(kernels)
    for jit, pointers, consts, exact in kernels:
        if jit is attention._decode_kernel and consts.get("F16"):
            # (as the engine's wide steps run it on an 8-bit cache: one stage, 128
            # registers, PERF.md v0.84, v0.87)
            keys, warps, _, stages, cap = attention.WIDE_8BIT_TILE
            code = ptx(jit, pointers, {**consts, "BLOCK_N": keys}, warps, stages, cap)
        else:
            code = ptx(jit, pointers, consts)
        if exact:  # it writes what PyTorch's reference writes, bit for bit
            assert not APPROXIMATE.search(code), f"{jit.fn.__name__} divides approximately"
        if jit.fn.__name__ == "_quant_two_kernel":  # the residual in one rounding
            assert re.search(r"\bfma\.rn\.f32\b", code), "the residual is not one fma"
        if consts.get("SPLIT", 1) > 1:  # K in slices: the count is an acquire-release
            # atomic after a barrier of the block; the last slice reads the others' sums
            # past L1 (ld.global.cg) and sets the count back
            for needed in ("bar.sync", "atom.global.gpu.acq_rel.add", "ld.global.cg",
                           "atom.global.gpu.relaxed.exch"):
                assert needed in code, f"{jit.fn.__name__} in slices lacks {needed}"
        print(jit.fn.__name__, "compiled for sm_90", flush=True)


def promoted_every_128(kernels: list[tuple[Any, dict[str, str], dict[str, Any], bool]]
                       ) -> None:
    """The per-token W8A8 kernel in a 256-wide step adds its FP8 products into float32
    every 128 (PERF.md v0.67): its PTX has more float32 adds than Triton's default's,
    which adds the whole step in the FP8 tensor cores' own accumulator."""
    jit, pointers, consts, _ = next(k for k in kernels if k[2].get("TOKENS"))
    wide = next(c for c in fp8mm.W8A8_TOKENS_CONFIGS if c[2] > fp8mm.FP8_PROMOTE_EVERY)
    consts = {**consts, "BLOCK_M": wide[0], "BLOCK_N": wide[1], "GROUP": wide[2],
              "SWAP": wide[5]}
    adds = {imprecise: len(FLOAT_ADD.findall(ptx(jit, pointers, {
        **consts, "IMPRECISE": imprecise}, wide[3], wide[4])))
        for imprecise in (fp8mm.fp8_promotion(wide[2]), None)}
    assert adds[fp8mm.FP8_PROMOTE_EVERY] > adds[None] > 0, adds
    print("w8a8 per token promoted every 128:", adds, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
