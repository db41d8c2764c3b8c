"""Rotary embedding of q and k in place, with the KV-cache write of k and v
(`_rotated` is also the decode attention kernel's rotation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from replicas.kernels.common import STEP_SHAPED, _launch, _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _rotated(ptr, d, mask, c, s, rotary_dim, INTERLEAVED: tl.constexpr):
        """Head vectors at ptr (last axis d) rotated by their token's cos c and sin s
        (zero past rotary_dim), each product rounded to the model dtype as transformers
        does; dims past rotary_dim pass unchanged."""
        rot = d < rotary_dim
        if INTERLEAVED:  # pairs (2i, 2i+1)
            partner = d ^ 1
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
        else:  # halves (i, i + rotary_dim / 2)
            half = rotary_dim // 2
            partner = tl.where(d < half, d + half, d - half)
            sign = tl.where(d < half, -1.0, 1.0)
        x = tl.load(ptr, mask=mask, other=0.0)
        xp = tl.load(ptr + (partner - d), mask=mask & rot, other=0.0).to(tl.float32)
        a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
        b = (sign * xp * s).to(x.dtype).to(tl.float32)
        return tl.where(rot, (a + b).to(x.dtype), x)

    @triton.jit
    def _to_cache(x, C, FP8: tl.constexpr):
        """x as the cache C holds it: an FP8 cache's entries saturate at +-448 (e4m3 has
        no infinity; a scale of 1: the keys and values of the supported families stay far
        inside that range)."""
        if FP8:
            x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        return x.to(C.dtype.element_ty)

    @triton.jit
    def _int8_rows(x):
        """x [R, BLOCK_D] (masked lanes 0) -> (int8 [R, BLOCK_D], float32 scales [R]), as
        replicas/kv_cache.py int8_rows: each row over max|row| / 127 (1 for a zero row),
        rounded half up; IEEE divisions, so a GPU rounds as PyTorch does."""
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
        r = tl.floor(tl.math.div_rn(x, scale[:, None]) + 0.5)
        return tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8), scale

    @triton.jit
    def _store_cache(C, CS, dst, row, x, mask, row_ok, FP8: tl.constexpr,
                     INT8: tl.constexpr):
        """Rows x [R, BLOCK_D] into the cache C at offsets dst [R, BLOCK_D] (mask); an int8
        cache's row scales into CS at the rows' indices `row` [R] (row_ok)."""
        if INT8:
            r, scale = _int8_rows(tl.where(mask, x, 0.0))
            tl.store(C + dst, r, mask=mask)
            tl.store(CS + row, scale, mask=row_ok)
        else:
            tl.store(C + dst, _to_cache(x, C, FP8), mask=mask)

    @triton.jit(do_not_specialize=STEP_SHAPED["_rope_cache_kernel"])
    def _rope_cache_kernel(Q, K, V, COS, SIN, SLOTS, KC, VC, KS, VS, T,
                           sqt, sqh, skt, skh, svt, svh, sct, heads, kv_heads, rotary_dim,
                           INTERLEAVED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           TOKENS: tl.constexpr, FP8_KV: tl.constexpr, INT8_KV: tl.constexpr,
                           PDL: tl.constexpr):
        """Program (TOKENS tokens, head) over heads + kv_heads: rotate q or k in place; a
        k head also writes its k and v to the cache slots of the tokens."""
        _pdl_enter(PDL)
        t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        t_ok = t < T
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        mask = t_ok[:, None] & (d < D)[None, :]
        is_q = h < heads
        if is_q:
            base = Q + t[:, None] * sqt + h * sqh + d[None, :]
        else:
            base = K + t[:, None] * skt + (h - heads) * skh + d[None, :]
        rot = t_ok[:, None] & (d < rotary_dim)[None, :]
        c = tl.load(COS + t[:, None] * sct + d[None, :], mask=rot, other=0.0).to(tl.float32)
        s = tl.load(SIN + t[:, None] * sct + d[None, :], mask=rot, other=0.0).to(tl.float32)
        y = _rotated(base, d, mask, c, s, rotary_dim, INTERLEAVED)
        tl.store(base, y, mask=mask)
        if not is_q:
            kh = h - heads
            slot = tl.load(SLOTS + t, mask=t_ok, other=0)
            row = slot * kv_heads + kh
            dst = row[:, None] * D + d[None, :]
            _store_cache(KC, KS, dst, row, y, mask, t_ok, FP8_KV, INT8_KV)
            v = tl.load(V + t[:, None] * svt + kh * svh + d[None, :], mask=mask, other=0.0)
            _store_cache(VC, VS, dst, row, v, mask, t_ok, FP8_KV, INT8_KV)


ROPE_TOKENS = 16  # tokens a program of the rotary-and-cache kernel


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, rotary_dim: int,
                   interleaved: bool, scales: Sequence[torch.Tensor] = ()) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by cos/sin [T, 1, rotary_dim] and
    write k and v to their slots of the caches [blocks, block_size, KVH, D] (an int8
    cache: with their row scales into `scales`, (K, V) [blocks, block_size, KVH])."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if t == 0:
        return
    # (16 tokens a program whatever the step's: a count that followed it would compile
    # a variant for each power of two under 16, in the middle of serving)
    tokens = ROPE_TOKENS
    _rope_cache_kernel[(triton.cdiv(t, tokens), heads + kv_heads)](
        q, k, v, cos, sin, slots, k_cache, v_cache, *cache_scales(k_cache, scales), t,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), heads, kv_heads, rotary_dim,
        INTERLEAVED=interleaved, D=d, BLOCK_D=_pow2(d), TOKENS=tokens,
        FP8_KV=k_cache.dtype == torch.float8_e4m3fn, INT8_KV=k_cache.dtype == torch.int8,
        num_warps=4, **_launch(q))


def cache_scales(k_cache: torch.Tensor, scales: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, V) row-scale tensors a kernel takes: an int8 cache's own (checked), else
    the cache itself twice, never read (the kernels compile the int8 path out)."""
    if k_cache.dtype != torch.int8:
        return k_cache, k_cache
    assert len(scales) == 2 and all(s.dtype == torch.float32 for s in scales), \
        "an int8 cache needs its (K, V) float32 row scales"
    return scales[0], scales[1]
