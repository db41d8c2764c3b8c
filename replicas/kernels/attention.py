"""Paged attention: causal attention of chunks of tokens over each sequence's
cached keys, read through its block table; the decode kernel also rotates and caches the
new key, and splits long key ranges across programs (merged by the last split)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from replicas.kernels.common import STEP_SHAPED, _launch, _pow2
from replicas.kernels.rope import cache_scales

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


def _attn_block_d(d: int) -> int:
    """The attention kernels' head-dim tile: tl.dot needs K >= 16, so a smaller head
    dim (8, say) is padded to 16 with masked lanes."""
    return max(16, _pow2(d))


def _precision(dtype: torch.dtype) -> str:
    # float32 products stay float32 (no TF32), so float32 runs match the reference
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:
    from replicas.kernels.common import _pdl_enter
    from replicas.kernels.rope import _rotated, _store_cache

    @triton.jit
    def _load_kv(KC, VC, KS, VS, table, n, upto, BLOCK_SIZE: tl.constexpr, kv_heads, kvh, d,
                 d_ok, D: tl.constexpr, DT: tl.constexpr, INT8: tl.constexpr):
        """Keys and values [BLOCK_N, D] at positions n through the block table, in DT
        (the queries' dtype: an FP8 cache's entries are widened, an int8 cache's times
        their rows' scales KS, VS); those at upto or past it come as 0 (decode passes
        the new token's position: its key and value are filled in from registers). v's
        load is issued with k's, so that its latency hides behind the scores."""
        ok, row, k, v = _kv_rows(KC, VC, table, n, upto, BLOCK_SIZE, kv_heads, kvh, d, d_ok, D)
        if INT8:
            k_scale = tl.load(KS + row, mask=ok, other=0.0)
            v_scale = tl.load(VS + row, mask=ok, other=0.0)
            return ((k.to(tl.float32) * k_scale[:, None]).to(DT),
                    (v.to(tl.float32) * v_scale[:, None]).to(DT))
        return k.to(DT), v.to(DT)

    @triton.jit
    def _kv_rows(KC, VC, table, n, upto, BLOCK_SIZE: tl.constexpr, kv_heads, kvh, d, d_ok,
                 D: tl.constexpr):
        """(in range, cache row, keys, values as the cache holds them) at positions n."""
        ok = n < upto
        blk = tl.load(table + n // BLOCK_SIZE, mask=ok, other=0)
        row = (blk * BLOCK_SIZE + n % BLOCK_SIZE) * kv_heads + kvh
        addr = row * D
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(KC + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VC + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        return ok, row, k, v

    @triton.jit
    def _load_kv16(KC, VC, KS, VS, table, n, upto, BLOCK_SIZE: tl.constexpr, kv_heads, kvh,
                   d, d_ok, D: tl.constexpr, INT8: tl.constexpr):
        """An 8-bit cache's keys and values [BLOCK_N, D] as float16, exactly, with their
        rows' scales [BLOCK_N] (float32; an e4m3 cache's are 1), as _load_kv's F16 form:
        e4m3 widens a pair an instruction; int8 x becomes the float16 whose bits are
        0x6400 + (x + 128), i.e. 1024 + (x + 128), minus 1152 (integer and float16 adds,
        no conversion instruction). The scales are applied by _decode_tile16 to the
        scores and probabilities, not to each entry."""
        ok, row, k, v = _kv_rows(KC, VC, table, n, upto, BLOCK_SIZE, kv_heads, kvh, d, d_ok, D)
        if INT8:
            k_scale = tl.load(KS + row, mask=ok, other=0.0)
            v_scale = tl.load(VS + row, mask=ok, other=0.0)
            return _int8_f16(k), _int8_f16(v), k_scale, v_scale
        one = tl.where(ok, 1.0, 0.0)
        return k.to(tl.float16), v.to(tl.float16), one, one

    @triton.jit
    def _int8_f16(x):
        """int8 -> float16, exact (see _load_kv16)."""
        bits = x.to(tl.int16) + 0x6480
        return bits.to(tl.float16, bitcast=True) - 1152.0


    @triton.jit
    def _attend(q, KC, VC, KS, VS, table, start, hi, qpos, win, m, l_sum, acc, scale_log2,
                BLOCK_SIZE: tl.constexpr, kv_heads, kvh, d, d_ok, MASKED: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                DT: tl.constexpr, INT8: tl.constexpr):
        """One block of BLOCK_N keys from `start` into the online softmax (m, l_sum, acc)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k, v = _load_kv(KC, VC, KS, VS, table, n, hi, BLOCK_SIZE, kv_heads, kvh, d, d_ok, D,
                        DT, INT8)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        if MASKED:
            diff = qpos[:, None] - n[None, :]
            s = tl.where(n_ok[None, :] & (diff >= 0) & (diff < win), s, float("-inf"))
        return _online_softmax(s, v, m, l_sum, acc, PREC)

    @triton.jit
    def _online_softmax(s, v, m, l_sum, acc, PREC: tl.constexpr):
        """Scores s [R, N] (log2 units, -inf = masked) and values v [N, D] into the running
        (max, sum, accumulator)."""
        m_new, alpha, p, l_sum = _softmax_step(s, m, l_sum)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_sum, acc

    @triton.jit
    def _softmax_step(s, m, l_sum):
        """Scores s [R, N] into the running max and sum: (the new max, the factor the
        accumulator is rescaled by, the columns' weights p [R, N], the new sum)."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        return m_new, alpha, p, l_sum * alpha + tl.sum(p, axis=1)

    @triton.jit(do_not_specialize=STEP_SHAPED["_attention_kernel"])
    def _attention_kernel(
        Q, KC, VC, KS, VS, OUT, OP, LSE, COUNT, TABLES, CU_Q, POS,
        sqt, sqh, sot, soh, sps, spt, sph, sls, slt, stab,
        scale_log2, window, BLOCK_SIZE: tl.constexpr, kv_heads,
        G: tl.constexpr, TILE_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLITS: tl.constexpr, PREC: tl.constexpr, INT8_KV: tl.constexpr, PDL: tl.constexpr,
    ):
        """Program (sequence, tile of TILE_T query tokens, kv head x split): the G query
        heads of that kv head for those tokens, against the keys the tile may see.

        Keys come through the block table; query token i of a chunk of length L sits at
        position ctx - L + i, where ctx = position of the chunk's last token + 1.
        With SPLITS > 1 (decode), each split takes a share of the key range and writes
        its normalized partial result and log-sum-exp; the split that finishes last (a
        counter per sequence and kv head, left at 0 again) merges them into OUT.
        """
        seq = tl.program_id(0)
        tile = tl.program_id(1)
        kvh = tl.program_id(2) // SPLITS
        split = tl.program_id(2) % SPLITS
        _pdl_enter(PDL)
        q_start = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_start
        t0 = tile * TILE_T
        if t0 < q_len:
            ctx = tl.load(POS + q_start + q_len - 1).to(tl.int32) + 1
            first = ctx - q_len
            win = tl.where(window > 0, window, 1 << 30)
            hi = tl.minimum(ctx, first + tl.minimum(t0 + TILE_T, q_len))
            lo = tl.maximum(0, first + t0 - win + 1)
            # whole key blocks per split: a short context leaves splits with no keys,
            # which do nothing (and one split alone needs no merge)
            share = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
            active = tl.cdiv(hi - lo, share)
            if split < active:
                rows = tl.arange(0, BLOCK_R)
                tok = t0 + rows // G
                head = kvh * G + rows % G
                row_ok = (rows < TILE_T * G) & (tok < q_len)
                qpos = first + tok
                d = tl.arange(0, BLOCK_D)
                d_ok = d < D
                q = tl.load(Q + (q_start + tok)[:, None] * sqt + head[:, None] * sqh
                            + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                lo_s = lo + split * share
                hi_s = tl.minimum(hi, lo_s + share)
                m = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
                l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
                acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
                # keys every row of the tile sees (before the tile's first position, no
                # window): no mask; the rest (the causal diagonal, a window's edge) masked
                bulk = tl.where(window > 0, lo_s, tl.minimum(hi_s, first + t0 + 1))
                bulk_end = lo_s + tl.maximum(bulk - lo_s, 0) // BLOCK_N * BLOCK_N
                for start in range(lo_s, bulk_end, BLOCK_N):
                    m, l_sum, acc = _attend(q, KC, VC, KS, VS, TABLES + seq * stab, start,
                                            hi_s, qpos, win, m, l_sum, acc, scale_log2,
                                            BLOCK_SIZE, kv_heads, kvh, d, d_ok, False,
                                            BLOCK_N, D, PREC, Q.dtype.element_ty, INT8_KV)
                for start in range(bulk_end, hi_s, BLOCK_N):
                    m, l_sum, acc = _attend(q, KC, VC, KS, VS, TABLES + seq * stab, start,
                                            hi_s, qpos, win, m, l_sum, acc, scale_log2,
                                            BLOCK_SIZE, kv_heads, kvh, d, d_ok, True,
                                            BLOCK_N, D, PREC, Q.dtype.element_ty, INT8_KV)
                _finish(m, l_sum, acc, OUT, OP, LSE, COUNT + seq * kv_heads + kvh, q_start + tok,
                        head, d, row_ok[:, None] & d_ok[None, :], row_ok, split, active, sps,
                        spt, sph, sls, slt, sot, soh, SPLITS, BLOCK_R, BLOCK_D)

    @triton.jit
    def _decode_tile(q, k, v, n, hi_c, m, l_sum, acc, scale_log2, PREC: tl.constexpr):
        """One tile of cached keys (those before hi_c) into the online softmax."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where((n < hi_c)[None, :], s, float("-inf"))
        return _online_softmax(s, v, m, l_sum, acc, PREC)

    @triton.jit
    def _decode_tile16(q16, k, v, k_scale, v_scale, n, hi_c, m, l_sum, acc, score_scale):
        """_decode_tile with float16 dots (F16): q16 [R, D] and the tile's keys and
        values [N, D] float16 (_load_kv16), each key's scale times score_scale applied to
        its scores, each value row's scale to its probabilities (as a fraction of the
        tile's largest, so that they stay in [0, 1]; the product scaled back after the
        dot)."""
        s = tl.dot(q16, tl.trans(k)) * (k_scale * score_scale)[None, :]
        s = tl.where((n < hi_c)[None, :], s, float("-inf"))
        m_new, alpha, p, l_sum = _softmax_step(s, m, l_sum)
        top = tl.max(v_scale, axis=0)
        top = tl.where(top > 0, top, 1.0)
        pv = tl.dot((p * (v_scale / top)[None, :]).to(tl.float16), v)
        return m_new, l_sum, acc * alpha[:, None] + pv * top

    @triton.jit
    def _decode_new(q, k_new, v_new, m, l_sum, acc, scale_log2):
        """The new token's key and value, from registers, into the online softmax: one
        more column, its score and its share of the values worked out in float32 (no
        tile of keys selects it in, key by key)."""
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale_log2
        m_new, alpha, p, l_sum = _softmax_step(s[:, None], m, l_sum)
        acc = acc * alpha[:, None] + p * v_new.to(tl.float32)[None, :]
        return m_new, l_sum, acc

    @triton.jit(do_not_specialize=STEP_SHAPED["_decode_kernel"])
    def _decode_kernel(
        Q, K, V, KC, VC, KS, VS, OUT, OP, LSE, COUNT, TABLES, POS, COS, SIN, SLOTS,
        sqt, sqh, skt, skh, svt, svh, sct, sot, soh, sps, spt, sph, sls, slt, stab,
        rotary_dim, scale_log2, window, BLOCK_SIZE: tl.constexpr, kv_heads,
        G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, PREC: tl.constexpr,
        INTERLEAVED: tl.constexpr, FP8_KV: tl.constexpr, INT8_KV: tl.constexpr,
        PDL: tl.constexpr, F16: tl.constexpr = False,
    ):
        """Decode attention from the projection's raw q, k, v. Program (sequence, kv head
        x split): the G query heads of that kv head, one token, against its split of
        the keys. It rotates q and the new k (as `rope_and_cache`), and the split whose
        keys end at the new token writes the new k and v to the cache.

        Before waiting on the kernel that wrote q, k, v (PDL), each program reads what
        the step's inputs and the cache already hold: the position, the block table and
        the first tile of cached keys and values, so that those loads overlap the
        projection's tail. The new token's key and value enter from registers, after the
        cached ones, as one more column of the softmax.
        F16 (an 8-bit cache, 16-bit queries): both dots in float16, the 8-bit entries
        widened exactly (_load_kv16), q scaled into float16's range by a power of two
        when it is not in it, the int8 rows' scales on the scores and probabilities.
        """
        seq = tl.program_id(0)
        kvh = tl.program_id(1) // SPLITS
        split = tl.program_id(1) % SPLITS
        pos = tl.load(POS + seq).to(tl.int32)
        win = tl.where(window > 0, window, 1 << 30)
        lo = tl.maximum(0, pos - win + 1)
        hi = pos + 1
        share = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
        active = tl.cdiv(hi - lo, share)
        lo_s = lo + split * share
        hi_s = tl.minimum(hi, lo_s + share)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        table = TABLES + seq * stab
        n = lo_s + tl.arange(0, BLOCK_N)
        if F16:
            k, v, ks, vs = _load_kv16(KC, VC, KS, VS, table, n, pos, BLOCK_SIZE, kv_heads,
                                      kvh, d, d_ok, D, INT8_KV)
        else:
            k, v = _load_kv(KC, VC, KS, VS, table, n, pos, BLOCK_SIZE, kv_heads, kvh, d,
                            d_ok, D, Q.dtype.element_ty, INT8_KV)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if split < active:
            rows = tl.arange(0, BLOCK_R)
            head = kvh * G + rows % G
            row_ok = rows < G
            rot = d < rotary_dim
            c = tl.load(COS + seq * sct + d, mask=rot, other=0.0).to(tl.float32)
            sn = tl.load(SIN + seq * sct + d, mask=rot, other=0.0).to(tl.float32)
            q_ok = row_ok[:, None] & d_ok[None, :]
            q = _rotated(Q + seq * sqt + head[:, None] * sqh + d[None, :], d, q_ok, c, sn,
                         rotary_dim, INTERLEAVED)
            k_new = _rotated(K + seq * skt + kvh * skh + d, d, d_ok, c, sn, rotary_dim,
                             INTERLEAVED)
            v_new = tl.load(V + seq * svt + kvh * svh + d, mask=d_ok, other=0.0)
            if split == active - 1:  # the split whose keys end at the new token's
                row = tl.load(SLOTS + seq) * kv_heads + kvh + tl.zeros([1], tl.int64)
                dst = row[:, None] * D + d[None, :]
                one = d_ok[None, :]
                _store_cache(KC, KS, dst, row, k_new[None, :], one, row >= 0, FP8_KV,
                             INT8_KV)
                _store_cache(VC, VS, dst, row, v_new[None, :], one, row >= 0, FP8_KV,
                             INT8_KV)
            m = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
            l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
            acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            hi_c = tl.minimum(hi_s, pos)  # the cached keys: the new token's comes after
            if F16:
                # q into float16's range (<= 65504) by a power of two, exactly: 2^(14 - e)
                # for a largest |q| in [2^e, 2^(e + 1)), e >= 15
                qf = q.to(tl.float32)
                top = tl.max(tl.max(tl.abs(qf), axis=1), axis=0)
                e = (top.to(tl.int32, bitcast=True) >> 23) - 127
                q_scale = tl.where(e >= 15, ((141 - e) << 23).to(tl.float32, bitcast=True), 1.0)
                q16 = (qf * q_scale).to(tl.float16)
                score_scale = scale_log2 / q_scale
                m, l_sum, acc = _decode_tile16(q16, k, v, ks, vs, n, hi_c, m, l_sum, acc,
                                               score_scale)
                for start in range(lo_s + BLOCK_N, hi_c, BLOCK_N):
                    n = start + tl.arange(0, BLOCK_N)
                    k, v, ks, vs = _load_kv16(KC, VC, KS, VS, table, n, pos, BLOCK_SIZE,
                                              kv_heads, kvh, d, d_ok, D, INT8_KV)
                    m, l_sum, acc = _decode_tile16(q16, k, v, ks, vs, n, hi_c, m, l_sum, acc,
                                                   score_scale)
            else:
                m, l_sum, acc = _decode_tile(q, k, v, n, hi_c, m, l_sum, acc, scale_log2,
                                             PREC)
                for start in range(lo_s + BLOCK_N, hi_c, BLOCK_N):
                    n = start + tl.arange(0, BLOCK_N)
                    k, v = _load_kv(KC, VC, KS, VS, table, n, pos, BLOCK_SIZE, kv_heads, kvh,
                                    d, d_ok, D, Q.dtype.element_ty, INT8_KV)
                    m, l_sum, acc = _decode_tile(q, k, v, n, hi_c, m, l_sum, acc,
                                                 scale_log2, PREC)
            if split == active - 1:  # the split whose keys end at the new token's
                m, l_sum, acc = _decode_new(q, k_new, v_new, m, l_sum, acc, scale_log2)
            _finish(m, l_sum, acc, OUT, OP, LSE, COUNT + seq * kv_heads + kvh,
                    seq + rows * 0, head, d, q_ok, row_ok, split, active, sps, spt, sph, sls,
                    slt, sot, soh, SPLITS, BLOCK_R, BLOCK_D)

    @triton.jit
    def _finish(m, l_sum, acc, OUT, OP, LSE, COUNT, t_idx, head, d, mask, row_ok, split,
                active, sps, spt, sph, sls, slt, sot, soh, SPLITS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """A split's softmax state to OUT (rows t_idx x head): directly when it is the only
        split with keys; else as a partial result and its log-sum-exp, and the split that
        finishes last (COUNT, left at 0 again) merges them."""
        safe = tl.where(l_sum > 0, l_sum, 1.0)
        out = acc / safe[:, None]
        if active == 1:
            tl.store(OUT + t_idx[:, None] * sot + head[:, None] * soh + d[None, :],
                     out.to(OUT.dtype.element_ty), mask=mask)
        else:
            if SPLITS > 1:  # (not compiled into the prefill kernel)
                lse = tl.where(l_sum > 0, m + tl.log2(safe), float("-inf"))
                tl.store(OP + split * sps + t_idx[:, None] * spt + head[:, None] * sph
                         + d[None, :], out, mask=mask)
                tl.store(LSE + split * sls + t_idx * slt + head, lse, mask=row_ok)
                tl.debug_barrier()  # every thread's stores before the release below
                done = tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
                if done == active - 1:  # the last split: the others' results are visible
                    _merge(OP, LSE, OUT, t_idx, head, d, mask, row_ok, active, sps, spt, sph,
                           sls, slt, sot, soh, SPLITS, BLOCK_R, BLOCK_D)
                    tl.atomic_xchg(COUNT, 0)

    @triton.jit
    def _merge(OP, LSE, OUT, t_idx, head, d, mask, row_ok, active, sps, spt, sph, sls, slt,
               sot, soh, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Combine the `active` splits' partial results of rows (t_idx, head) by their
        weights; loads bypass L1 (other programs wrote them)."""
        top = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            live = row_ok & (head * 0 + s < active)
            lse = tl.load(LSE + s * sls + t_idx * slt + head, mask=live, other=float("-inf"),
                          cache_modifier=".cg")
            top = tl.maximum(top, lse)
        top = tl.where(top == float("-inf"), 0.0, top)  # rows no split saw: weights 0
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            live = row_ok & (head * 0 + s < active)
            lse = tl.load(LSE + s * sls + t_idx * slt + head, mask=live, other=float("-inf"),
                          cache_modifier=".cg")
            weight = tl.exp2(lse - top)
            part = tl.load(OP + s * sps + t_idx[:, None] * spt + head[:, None] * sph
                           + d[None, :], mask=mask & live[:, None], other=0.0,
                           cache_modifier=".cg")
            acc += part * weight[:, None]
            total += weight
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(OUT + t_idx[:, None] * sot + head[:, None] * soh + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask)


# decode attention's (keys a tile, warps[, f16]): tuned at batch 1 on the H200 (PERF.md's first
# decode entries); `python -m replicas.bench --suite attention` times others at larger
# batches
DECODE_TILE = (64, 4)
# From WIDE_DECODE_SEQS sequences a step (one split, two programs an SM or more), the
# probe timed without PDL (PERF.md v0.74: each kernel alone, as the engine's follows a
# cuBLAS matmul) found other tiles faster at 256 sequences of 192 and 1,024 keys: 32 keys
# for a 16-bit cache (0.81x the (64, 4) tile's time at both), and (64, 4)'s F16 form for
# an 8-bit one (e4m3 0.91x / 0.91x, int8 0.97x / 0.96x). At 64 sequences (64, 4) stayed
# within 4 % of the best. In the engine (256 x 128/128, one process, bench.decode_tile_ab)
# a call went 34.2 -> 26.0 us (bf16) and 32.6 -> 30.7 (e4m3).
# At 128 sequences (PERF.md v0.76, the same probe) the 32-key tiles lost (bf16 1.11x /
# 1.30x at 192 / 1,024 keys) and the F16 form won on 8-bit caches (e4m3 0.93x / 0.91x,
# int8 0.96x / 0.97x): 8-bit caches take it from WIDE_F16_SEQS. At 64 x 320 it won on
# e4m3 (0.93x) and lost on int8 (1.02x), so not there.
# TPSERVE_WIDE_DECODE_TILES=0 keeps DECODE_TILE (an A/B); a tile written out ("64,4,1,1,128":
# keys, warps, f16, stages, registers, as paged_attention's decode_tile) is taken by the
# wide steps instead (an A/B of a probe's winner in the engine).
WIDE_DECODE_SEQS = 256
WIDE_F16_SEQS = 128
# From WIDE_DECODE_SEQS sequences on an 8-bit cache (PERF.md v0.84, v0.87): the F16 tile
# with one stage in the key loop and at most 128 registers a thread (220 without: 2
# programs an SM, 4 with it). The probe at 256 x 192 / 1,024 keys: e4m3 0.74x / 0.79x the
# time, int8 0.75x / 0.82x; in the 256-request runs decode attention 31.2 -> 23.4 us a
# call (W8A8, e4m3) and 35.8 -> 26.4 (W8A8 but qkv, int8), +3.0 to +4.5 % tok/s.
# (bf16 caches' 32-key tile gained nothing from a cap.)
WIDE_8BIT_TILE = (*DECODE_TILE, 1, 1, 128)


def engine_decode_tile(num_seqs: int, cache_dtype: torch.dtype, q_dtype: torch.dtype
                       ) -> tuple[int, ...]:
    """The decode attention tile (keys a tile, warps[, f16[, stages[, registers]]]) the
    engine runs for a step of `num_seqs` sequences on a cache of `cache_dtype` with
    queries of `q_dtype`."""
    switch = os.environ.get("TPSERVE_WIDE_DECODE_TILES", "1")
    if switch == "0":
        return DECODE_TILE
    if cache_dtype.itemsize == 1:  # (F16 needs 16-bit queries)
        wide = num_seqs >= WIDE_F16_SEQS and q_dtype != torch.float32
        tile = (*DECODE_TILE, 1)
        if num_seqs >= WIDE_DECODE_SEQS:
            tile = WIDE_8BIT_TILE
    else:
        wide, tile = num_seqs >= WIDE_DECODE_SEQS, (32, 4)
    if wide and switch != "1":
        try:
            tile = tuple(int(part) for part in switch.split(","))
        except ValueError:
            raise ValueError("TPSERVE_WIDE_DECODE_TILES: 0, 1 or a tile such as "
                             f"'64,4,1,1,128', not {switch!r}") from None
    return tile if wide else DECODE_TILE


def decode_tile_parts(tile: tuple[int, ...]) -> tuple[int, int, bool, int, int]:
    """A decode tile (keys a tile, warps[, f16[, stages[, registers]]]) in full: (keys,
    warps, f16, stages: 2 unless given, registers: 0 for no cap)."""
    keys, warps, f16, stages, registers = (*tile, *(0, 2, 0)[len(tile) - 2:])
    return keys, warps, bool(f16), stages, registers


def decode_splits(num_seqs: int, kv_heads: int, max_keys: int) -> int:
    """How many splits of the key range a decode step uses: the most (a power of two)
    that keeps the programs at or under two per SM (264 for the H200's 132), at most 16,
    and no split shorter than 64 keys. Not more: the H200's probe (PERF.md v0.65,
    `replicas/results/attention_h200.jsonl`) found the next power of two up slower at
    32 and 64 sequences (GLM-4-9B, 2 KV heads: 8 splits 17.8 us against 4's 11.7 at
    32 x 512 keys; 4 splits 16.9 against 2's 13.5 at 64 x 320), and this choice the
    fastest at 1, 16 and 256 sequences."""
    fit = max(1, 264 // (num_seqs * kv_heads))
    want = 1 << (fit.bit_length() - 1)  # (the power of two at or under it)
    return max(1, min(16, want, _pow2(max(1, max_keys // 64))))


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _kept(table: dict[torch.device, torch.Tensor], device: torch.device, n: int,
          dtype: torch.dtype) -> torch.Tensor:
    """table[device]: a buffer of at least n (and 4096) elements, zeroed when made, made
    again when n outgrows it (the warm-up before a graph capture makes the largest)."""
    have = table.get(device)
    if have is None or have.numel() < n:
        have = table[device] = torch.zeros(max(n, 4096), dtype=dtype, device=device)
    return have


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters of finished splits, one per (sequence, kv head), kept per
    device: each merge leaves its counter at 0, so they are zeroed only when made."""
    return _kept(_COUNTERS, device, n, torch.int32)


class NewKeys(NamedTuple):
    """A decode step's own keys and values, not yet rotated or cached: the attention
    kernel rotates q and k (as `rope_and_cache`) and writes k and v to their slots."""

    k: torch.Tensor  # [T, KVH, D]
    v: torch.Tensor  # [T, KVH, D]
    cos: torch.Tensor  # [T, 1, rotary_dim]
    sin: torch.Tensor
    slots: torch.Tensor  # [T]
    rotary_dim: int
    interleaved: bool


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_q: torch.Tensor, positions: torch.Tensor,
                    window: int | None, max_q: int, splits: int = 1,
                    new: NewKeys | None = None, scales: Sequence[torch.Tensor] = (),
                    out: torch.Tensor | None = None,
                    decode_tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] (sequences' chunks back to back, bounded by cu_q
    [B + 1]) over each sequence's cached keys -> [T, H, D] (into `out`, if given: any
    [T, H, D] view with unit stride in D). The chunk's own keys must already be in the
    cache, or (decode only, max_q == 1) come unrotated as `new`, with q unrotated too.
    An int8 cache comes with its (K, V) row `scales`. `decode_tile`: (keys a tile,
    warps[, f16[, stages[, registers]]]) for decode instead of engine_decode_tile's (the
    attention probe's variants; f16 1: the _decode_kernel's F16, an 8-bit cache's dots in
    float16; stages: the key loop's software pipeline, 2 unless given; registers: a cap
    on a thread's, ptxas's maxnreg, 0 or absent for none)."""
    k_scales, v_scales = cache_scales(k_cache, scales)
    int8 = k_cache.dtype == torch.int8
    assert new is None or max_q == 1, "keys are rotated and cached here in decode only"
    t, heads, d = q.shape
    num_seqs = cu_q.shape[0] - 1
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1, "out: a [T, H, D] view, unit stride in D"
    if max_q == 1:  # decode: one token per sequence, its group of heads in one tile
        tile_t, block_r = 1, max(16, _pow2(group))
        block_n, warps, f16, stages, registers = decode_tile_parts(
            decode_tile or engine_decode_tile(num_seqs, k_cache.dtype, q.dtype))
        if f16 and (k_cache.element_size() != 1 or q.dtype == torch.float32):
            raise ValueError("decode_tile's float16 dots take an 8-bit cache and 16-bit "
                             f"queries (cache {k_cache.dtype}, queries {q.dtype})")
    else:
        block_r = max(64 if d > 128 else 128, _pow2(group))
        tile_t, block_n, warps = max(1, block_r // group), 64, 8
    splits = splits if max_q == 1 else 1
    if splits > 1:
        part = torch.empty(splits, t, heads, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, t, heads, dtype=torch.float32, device=q.device)
        count = _split_counters(q.device, num_seqs * kv_heads)
    else:
        part, lse, count = out, out, out  # unused
    scale_log2 = (1.0 / math.sqrt(d)) * math.log2(math.e)
    if new is not None:
        _decode_kernel[(num_seqs, kv_heads * splits)](
            q, new.k, new.v, k_cache, v_cache, k_scales, v_scales, out, part, lse, count,
            block_tables, positions,
            new.cos, new.sin, new.slots, q.stride(0), q.stride(1), new.k.stride(0),
            new.k.stride(1), new.v.stride(0), new.v.stride(1), new.cos.stride(0),
            out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), block_tables.stride(0), new.rotary_dim, scale_log2,
            window or 0, block_size, kv_heads,
            G=group, BLOCK_R=block_r, BLOCK_N=block_n, D=d, BLOCK_D=_attn_block_d(d),
            SPLITS=splits,
            PREC=_precision(q.dtype), INTERLEAVED=new.interleaved,
            FP8_KV=k_cache.dtype == torch.float8_e4m3fn, INT8_KV=int8,
            F16=f16, num_warps=warps, num_stages=stages, **_launch(q, registers))
        return out
    _attention_kernel[(num_seqs, triton.cdiv(max_q, tile_t), kv_heads * splits)](
        q, k_cache, v_cache, k_scales, v_scales, out, part, lse, count, block_tables, cu_q,
        positions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        block_tables.stride(0), scale_log2, window or 0, block_size, kv_heads,
        G=group, TILE_T=tile_t, BLOCK_R=block_r, BLOCK_N=block_n, D=d, BLOCK_D=_attn_block_d(d),
        SPLITS=splits, PREC=_precision(q.dtype), INT8_KV=int8, num_warps=warps, num_stages=2,
        **_launch(q))
    return out
