"""`python tests/hopper_ptx.py fp8|int8`: compile the KV-cache kernels (the cache write,
decode and prefill attention) to PTX for an H200 (sm_90), GLM-4-9B's head shapes, with
that 8-bit cache, on a machine with no GPU (Triton's own ptxas). Run by
tests/test_kernels.py in a process of its own: the tests' processes import the kernels
for Triton's interpreter, which cannot compile them."""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from replicas.kernels import attention, rope


def main(kv: str) -> None:
    cache = "*i8" if kv == "int8" else "*fp8e4nv"
    pointers = {**{n: "*bf16" for n in ("Q", "K", "V", "COS", "SIN", "OUT")},
                **{n: "*fp32" for n in ("KS", "VS", "OP", "LSE")}, "KC": cache, "VC": cache,
                "SLOTS": "*i64", "POS": "*i64", "COUNT": "*i32", "TABLES": "*i32",
                "CU_Q": "*i32", "scale_log2": "fp32"}
    flags = {"INT8_KV": kv == "int8", "FP8_KV": kv == "fp8", "PDL": True, "D": 128,
             "BLOCK_D": 128, "INTERLEAVED": False, "PREC": "tf32", "BLOCK_N": 64, "G": 16}
    kernel_flags = [(rope._rope_cache_kernel, {"TOKENS": 16}),
                    (attention._decode_kernel, {"BLOCK_R": 16, "SPLITS": 4}),
                    (attention._attention_kernel, {"TILE_T": 8, "BLOCK_R": 128, "SPLITS": 1})]
    for jit, own in kernel_flags:
        names = list(inspect.signature(jit.fn).parameters)
        consts = {n: v for n, v in {**flags, **own}.items() if n in names}
        signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
        src = ASTSource(fn=jit, signature=signature,
                        constexprs={(names.index(n),): v for n, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        assert ".target sm_90" in compiled.asm["ptx"], jit.fn.__name__
        print(jit.fn.__name__, "compiled for sm_90", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
