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
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the PyTorch path only
    triton = None


def enabled(where: torch.Tensor | torch.device) -> bool:
    """Whether tensors on `where` take the Triton path."""
    if triton is None or os.environ.get("TPSERVE_KERNELS") == "0":
        return False
    device = where.device if isinstance(where, torch.Tensor) else where
    return device.type == "cuda" or os.environ.get("TPSERVE_TRITON_CPU") == "1"


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper on): each kernel of the GPU path may start
    while the one before it finishes, and waits for it (`griddepcontrol.wait`) before it
    touches memory that kernel writes; the GEMV loads its first weight tile before that
    wait. Off in the interpreter and with `TPSERVE_PDL=0`."""
    return (device.type == "cuda" and os.environ.get("TPSERVE_PDL") != "0"
            and _pdl_capable(device.index if device.index is not None
                             else torch.cuda.current_device()))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _attn_block_d(d: int) -> int:
    """The attention kernels' head-dim tile: tl.dot needs K >= 16, so a smaller head
    dim (8, say) is padded to 16 with masked lanes."""
    return max(16, _pow2(d))


def _precision(dtype: torch.dtype) -> str:
    # float32 products stay float32 (no TF32), so float32 runs match the reference
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """With PDL: wait for the kernel before (its writes are then visible), then let the
        next kernel launch, so that its start overlaps this one."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, ROUT, n, eps, sx, sr, sy, sro,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
            x = x.to(Y.dtype.element_ty)  # the reference adds in the model dtype
            tl.store(ROUT + row * sro + cols, x, mask=ok)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        y = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, (y * w).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, n, sg, so, BLOCK: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        g = tl.load(GU + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + row * sg + n + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * so + cols, (act * u).to(OUT.dtype.element_ty), mask=ok)

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
    def _rope_cache_kernel(Q, K, V, COS, SIN, SLOTS, KC, VC, T,
                           sqt, sqh, skt, skh, svt, svh, sct, heads, kv_heads, rotary_dim,
                           INTERLEAVED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           TOKENS: tl.constexpr, PDL: tl.constexpr):
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
            dst = (slot * kv_heads + kh)[:, None] * D + d[None, :]
            tl.store(KC + dst, y, mask=mask)
            v = tl.load(V + t[:, None] * svt + kh * svh + d[None, :], mask=mask, other=0.0)
            tl.store(VC + dst, v, mask=mask)

    @triton.jit
    def _load_kv(KC, VC, table, n, upto, block_size, kv_heads, kvh, d, d_ok,
                 D: tl.constexpr):
        """Keys and values [BLOCK_N, D] at positions n through the block table; those at
        upto or past it come as 0 (decode passes the new token's position: its key and
        value are filled in from registers). v's load is issued with k's, so that its
        latency hides behind the scores."""
        ok = n < upto
        blk = tl.load(table + n // block_size, mask=ok, other=0)
        addr = ((blk * block_size + n % block_size) * kv_heads + kvh) * D
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(KC + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VC + addr[:, None] + d[None, :], mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def _attend(q, KC, VC, table, start, hi, qpos, win, m, l_sum, acc, scale_log2, block_size,
                kv_heads, kvh, d, d_ok, MASKED: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
        """One block of BLOCK_N keys from `start` into the online softmax (m, l_sum, acc)."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k, v = _load_kv(KC, VC, table, n, hi, block_size, kv_heads, kvh, d, d_ok, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        if MASKED:
            diff = qpos[:, None] - n[None, :]
            s = tl.where(n_ok[None, :] & (diff >= 0) & (diff < win), s, float("-inf"))
        return _online_softmax(s, v, m, l_sum, acc, PREC)

    @triton.jit
    def _online_softmax(s, v, m, l_sum, acc, PREC: tl.constexpr):
        """Scores s [R, N] (log2 units, -inf = masked) and values v [N, D] into the running
        (max, sum, accumulator)."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_sum, acc

    @triton.jit
    def _attention_kernel(
        Q, KC, VC, OUT, OP, LSE, COUNT, TABLES, CU_Q, POS,
        sqt, sqh, sot, soh, sps, spt, sph, sls, slt, stab,
        scale_log2, window, block_size, kv_heads,
        G: tl.constexpr, TILE_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLITS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
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
                    m, l_sum, acc = _attend(q, KC, VC, TABLES + seq * stab, start, hi_s, qpos,
                                            win, m, l_sum, acc, scale_log2, block_size,
                                            kv_heads, kvh, d, d_ok, False, BLOCK_N, D, PREC)
                for start in range(bulk_end, hi_s, BLOCK_N):
                    m, l_sum, acc = _attend(q, KC, VC, TABLES + seq * stab, start, hi_s, qpos,
                                            win, m, l_sum, acc, scale_log2, block_size,
                                            kv_heads, kvh, d, d_ok, True, BLOCK_N, D, PREC)
                _finish(m, l_sum, acc, OUT, OP, LSE, COUNT + seq * kv_heads + kvh, q_start + tok,
                        head, d, row_ok[:, None] & d_ok[None, :], row_ok, split, active, sps,
                        spt, sph, sls, slt, sot, soh, SPLITS, BLOCK_R, BLOCK_D)


    @triton.jit
    def _decode_tile(q, k, v, k_new, v_new, n, pos, hi_s, m, l_sum, acc, scale_log2,
                     PREC: tl.constexpr):
        """One tile of keys into the online softmax, the new token's key and value put in
        from registers."""
        is_new = (n == pos)[:, None]
        k = tl.where(is_new, k_new[None, :], k)
        v = tl.where(is_new, v_new[None, :], v)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where((n < hi_s)[None, :], s, float("-inf"))
        return _online_softmax(s, v, m, l_sum, acc, PREC)

    @triton.jit
    def _decode_kernel(
        Q, K, V, KC, VC, OUT, OP, LSE, COUNT, TABLES, POS, COS, SIN, SLOTS,
        sqt, sqh, skt, skh, svt, svh, sct, sot, soh, sps, spt, sph, sls, slt, stab,
        rotary_dim, scale_log2, window, block_size, kv_heads,
        G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
        BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, PREC: tl.constexpr,
        INTERLEAVED: tl.constexpr, PDL: tl.constexpr,
    ):
        """Decode attention from the projection's raw q, k, v. Program (sequence, kv head
        x split): the G query heads of that kv head, one token, against its split of
        the keys. It rotates q and the new k (as `rope_and_cache`), and the split whose
        keys end at the new token writes the new k and v to the cache.

        Before waiting on the kernel that wrote q, k, v (PDL), each program reads what
        the step's inputs and the cache already hold: the position, the block table and
        the first tile of cached keys and values, so that those loads overlap the
        projection's tail. The new token's key and value enter from registers.
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
        k, v = _load_kv(KC, VC, table, n, pos, block_size, kv_heads, kvh, d, d_ok, D)
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
                dst = (tl.load(SLOTS + seq) * kv_heads + kvh) * D + d
                tl.store(KC + dst, k_new, mask=d_ok)
                tl.store(VC + dst, v_new, mask=d_ok)
            m = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
            l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
            acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            m, l_sum, acc = _decode_tile(q, k, v, k_new, v_new, n, pos, hi_s, m, l_sum, acc,
                                         scale_log2, PREC)
            for start in range(lo_s + BLOCK_N, hi_s, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                k, v = _load_kv(KC, VC, table, n, pos, block_size, kv_heads, kvh, d, d_ok, D)
                m, l_sum, acc = _decode_tile(q, k, v, k_new, v_new, n, pos, hi_s, m, l_sum,
                                             acc, scale_log2, PREC)
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

    @triton.jit
    def _normed_x(X, R, NW, cols, k, rstd, EVEN: tl.constexpr, HAS_RES: tl.constexpr):
        """K columns of norm(x + residual) * weight, float32, rounded as _rms_norm_kernel."""
        if EVEN:
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
    def _feed_kernel(IDS, FEED, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        v = tl.load(IDS + i, mask=ok, other=0)
        fed = tl.load(FEED + (-v - 1), mask=ok & (v < 0), other=0)
        tl.store(IDS + i, tl.where(v < 0, fed, v), mask=ok)

    @triton.jit
    def _argmax_part_kernel(X, PV, PI, n, sx, parts, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Per (row, part): the largest of BLOCK logits and its first index."""
        row, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        _pdl_enter(PDL)
        x = tl.load(X + row * sx + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        tl.store(PV + row * parts + part, tl.max(x, axis=0))
        tl.store(PI + row * parts + part, part * BLOCK + tl.argmax(x, axis=0))

    @triton.jit
    def _argmax_merge_kernel(PV, PI, OUT, parts, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
        """Per row: the first part holding the largest value gives the first index of it."""
        row = tl.program_id(0)
        at = tl.arange(0, BLOCK_P)
        _pdl_enter(PDL)
        v = tl.load(PV + row * parts + at, mask=at < parts, other=float("-inf"))
        best = tl.argmax(v, axis=0)
        tl.store(OUT + row, tl.load(PI + row * parts + best).to(tl.int64))

    @triton.jit
    def _gemv_x(X, R, NW, cols, k, rstd, EVEN: tl.constexpr, GATED: tl.constexpr,
                NORM: tl.constexpr, HAS_RES: tl.constexpr):
        """K columns of the GEMV's input row, float32 (see _gemv_kernel)."""
        if NORM:
            return _normed_x(X, R, NW, cols, k, rstd, EVEN, HAS_RES)
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
    def _gemv_kernel(X, W, B, Y, R, NW, ROUT, n, k, sw, eps, HAS_BIAS: tl.constexpr,
                     EVEN: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                     HAS_RES: tl.constexpr, ROW: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """y = W x (+ b) for one row x: program = BLOCK_N rows of W, streamed along K,
        products summed in float32 registers and reduced once at the end. The first
        tile of W is loaded before waiting on the kernel that writes x (with PDL it
        streams while that kernel runs).

        The input row may be made here: GATED, silu(gate) * up of x = [gate | up];
        NORM, the decoder layer's RMSNorm of x (+ R): every program takes the row's sum
        of squares (the row is read from L2 / L1 twice: for it, then tile by tile) and
        program 0 writes x + R to ROUT."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_ok = rows < n
        cols = tl.arange(0, BLOCK_K)
        w = _w_tile(W, rows, r_ok, cols, k, sw, EVEN)
        _pdl_enter(PDL)
        rstd = 0.0
        if NORM:
            every = tl.arange(0, ROW)
            whole = tl.load(X + every, mask=every < k, other=0.0).to(tl.float32)
            if HAS_RES:
                whole = (whole + tl.load(R + every, mask=every < k, other=0.0).to(
                    tl.float32)).to(X.dtype.element_ty)
                if tl.program_id(0) == 0:
                    tl.store(ROUT + every, whole, mask=every < k)
                whole = whole.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / k + eps)
        acc = w.to(tl.float32) * _gemv_x(X, R, NW, cols, k, rstd, EVEN, GATED, NORM,
                                         HAS_RES)[None, :]
        for k0 in range(BLOCK_K, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = _w_tile(W, rows, r_ok, cols, k, sw, EVEN)
            acc += w.to(tl.float32) * _gemv_x(X, R, NW, cols, k, rstd, EVEN, GATED, NORM,
                                              HAS_RES)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(B + rows, mask=r_ok, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=r_ok)


def feed_tokens(ids: torch.Tensor, feed: torch.Tensor) -> None:
    """In place: each id -(j + 1) of ids [T] becomes feed[j] (tokens sampled on the
    device by the step before); other ids stay."""
    block = min(1024, _pow2(ids.numel()))
    _feed_kernel[(triton.cdiv(ids.numel(), block),)](ids, feed, ids.numel(), BLOCK=block,
                                                     num_warps=4)


ARGMAX_BLOCK = 4096


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, the first index of each row's largest value (as
    torch.argmax for rows without NaN): many programs take a slice of the row each, then
    one per row picks among their answers. A decode graph's greedy tokens, in it."""
    rows, n = x.shape
    parts = triton.cdiv(n, ARGMAX_BLOCK)
    values = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    where = torch.empty(rows, parts, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _argmax_part_kernel[(rows, parts)](x, values, where, n, x.stride(0), parts,
                                       BLOCK=ARGMAX_BLOCK, num_warps=8, **_launch(x))
    _argmax_merge_kernel[(rows,)](values, where, out, parts, BLOCK_P=_pow2(parts),
                                  num_warps=1, **_launch(x))
    return out


def _launch(t: torch.Tensor) -> dict[str, bool]:
    """The PDL arguments of a launch on t's device: the kernel's flag and the launch's."""
    on = pdl(t.device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual) * weight, x + residual), or (norm(x) * weight, None); rows of
    the last dim, each one program."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty_like(x2)
    r_out = torch.empty_like(x2) if residual is not None else y
    r = residual.reshape(-1, n) if residual is not None else x2
    block = _pow2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r, weight, y, r_out, n, eps, x2.stride(0), r.stride(0), y.stride(0),
        r_out.stride(0), HAS_RES=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)), **_launch(x))
    return y.view(x.shape), (r_out.view(x.shape) if residual is not None else None)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0),
                                                 out.stride(0), BLOCK=block, num_warps=4,
                                                 **_launch(gate_up))
    return out


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, rotary_dim: int,
                   interleaved: bool) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by cos/sin [T, 1, rotary_dim] and
    write k and v to their slots of the caches [blocks, block_size, KVH, D]."""
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    if t == 0:
        return
    tokens = min(16, _pow2(t))
    _rope_cache_kernel[(triton.cdiv(t, tokens), heads + kv_heads)](
        q, k, v, cos, sin, slots, k_cache, v_cache, t,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), heads, kv_heads, rotary_dim,
        INTERLEAVED=interleaved, D=d, BLOCK_D=_pow2(d), TOKENS=tokens,
        num_warps=4 if tokens >= 8 else 1, **_launch(q))


def decode_splits(num_seqs: int, kv_heads: int, max_keys: int) -> int:
    """How many splits of the key range a decode step uses: enough programs to fill the
    GPU (~264 for 132 SMs), at most 16, and no split shorter than 64 keys."""
    want = _pow2(max(1, math.ceil(264 / (num_seqs * kv_heads))))
    return max(1, min(16, want, _pow2(max(1, max_keys // 64))))


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters of finished splits, one per (sequence, kv head), kept per
    device: each merge leaves its counter at 0, so they are zeroed only when made (the
    warm-up before a graph capture makes the largest)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        have = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


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
                    new: NewKeys | None = None) -> torch.Tensor:
    """Causal attention of q [T, H, D] (sequences' chunks back to back, bounded by cu_q
    [B + 1]) over each sequence's cached keys -> [T, H, D]. The chunk's own keys must
    already be in the cache, or (decode only, max_q == 1) come unrotated as `new`, with
    q unrotated too."""
    assert new is None or max_q == 1, "keys are rotated and cached here in decode only"
    t, heads, d = q.shape
    num_seqs = cu_q.shape[0] - 1
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    if max_q == 1:  # decode: one token per sequence, its group of heads in one tile
        tile_t, block_r, block_n, warps = 1, max(16, _pow2(group)), 64, 4
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
            q, new.k, new.v, k_cache, v_cache, out, part, lse, count, block_tables, positions,
            new.cos, new.sin, new.slots, q.stride(0), q.stride(1), new.k.stride(0),
            new.k.stride(1), new.v.stride(0), new.v.stride(1), new.cos.stride(0),
            out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), block_tables.stride(0), new.rotary_dim, scale_log2,
            window or 0, block_size, kv_heads,
            G=group, BLOCK_R=block_r, BLOCK_N=block_n, D=d, BLOCK_D=_attn_block_d(d),
            SPLITS=splits,
            PREC=_precision(q.dtype), INTERLEAVED=new.interleaved, num_warps=warps,
            num_stages=2, **_launch(q))
        return out
    _attention_kernel[(num_seqs, triton.cdiv(max_q, tile_t), kv_heads * splits)](
        q, k_cache, v_cache, out, part, lse, count, block_tables, cu_q, positions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        block_tables.stride(0), scale_log2, window or 0, block_size, kv_heads,
        G=group, TILE_T=tile_t, BLOCK_R=block_r, BLOCK_N=block_n, D=d, BLOCK_D=_attn_block_d(d),
        SPLITS=splits, PREC=_precision(q.dtype), num_warps=warps, num_stages=2,
        **_launch(q))
    return out


GemvConfig = tuple[int, int, int, int]  # (rows per program, K per iteration, warps, stages)
GEMV_CONFIGS: tuple[GemvConfig, ...] = (  # the leaders of earlier H200 runs, and variations
    (4, 1024, 4, 3), (4, 2048, 8, 2), (4, 2048, 8, 3), (4, 2048, 8, 4), (2, 4096, 8, 3),
    (8, 1024, 8, 3), (16, 512, 8, 3), (8, 512, 4, 4), (2, 2048, 4, 2), (1, 4096, 4, 1),
    (2, 4096, 4, 1), (4, 512, 4, 4), (8, 256, 4, 4),
    # more rows per program: the fused kinds read the input row once per program
    (16, 1024, 8, 2), (32, 256, 8, 3), (8, 2048, 8, 2))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: GemvConfig, gated: bool = False) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T (+ bias) -> [1, N], in x's dtype. gated: x is
    [gate | up] of [1, 2K] and the input row is silu(gate) * up (SwiGLU fused in)."""
    return _gemv(x, weight, bias, config, gated=gated)


def gemv_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              eps: float, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemv(rms_norm(x + residual) * norm_weight), x + residual) for one row x [1, K], in
    one kernel, equal to `rms_norm` then `gemv` with the same config; without a residual
    the second result is x."""
    r_out = torch.empty_like(x) if residual is not None else x
    y = _gemv(x, weight, bias, config, norm=(residual, norm_weight, r_out, eps))
    return y, r_out


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          config: GemvConfig, gated: bool = False,
          norm: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, float] | None = None
          ) -> torch.Tensor:
    n, k = weight.shape
    block_n, block_k, warps, stages = config
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    residual, norm_weight, r_out, eps = norm or (None, x, x, 0.0)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y,
        residual if residual is not None else x, norm_weight, r_out, n, k, weight.stride(0),
        eps, HAS_BIAS=bias is not None, EVEN=n % block_n == 0 and k % block_k == 0,
        GATED=gated, NORM=norm is not None, HAS_RES=residual is not None, ROW=_pow2(k),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **_launch(x))
    return y


GemvKind = str  # how a layer calls its GEMV: "plain", "norm" (gemv_norm) or "gated"


def pick_gemv(weight: torch.Tensor, bias: torch.Tensor | None, kind: GemvKind = "plain",
              margin: float = 0.97) -> tuple[GemvConfig | None, dict[str, float]]:
    """Time cuBLAS (F.linear) and each GEMV config on a one-row input, as a decode step
    runs them: weights cold (copies cycled so that they never sit in L2), input hot, and
    the GEMV in the layer's kind: "norm" with the RMSNorm (+ residual) fused in, "gated"
    with SwiGLU fused in (their extra input reads favour other tile shapes than "plain").
    Returns the fastest config if it beats plain cuBLAS by the margin (else None: keep
    cuBLAS), and the times in us."""
    k = weight.shape[1]
    make = functools.partial(torch.randn, dtype=weight.dtype, device=weight.device)
    x, residual, norm_weight = make(1, 2 * k if kind == "gated" else k), make(1, k), make(k)
    if kind == "norm":
        s = x + residual
        h = (F.rms_norm(s.float(), (k,), eps=1e-5).to(x.dtype) * norm_weight)
    elif kind == "gated":
        gate, up = x.float().chunk(2, dim=-1)
        h = (F.silu(gate) * up).to(x.dtype)
    else:
        h = x
    want = F.linear(h, weight, bias)
    # 256 MB of copies (at most 32: small matrices are cheap either way)
    count = min(32, max(2, -(-2**28 // (weight.numel() * weight.element_size()))))
    copies = [weight] + [weight.clone() for _ in range(count - 1)]

    def run(w: torch.Tensor, config: GemvConfig) -> torch.Tensor:
        if kind == "norm":
            return gemv_norm(x, residual, norm_weight, 1e-5, w, bias, config)[0]
        return gemv(x, w, bias, config, gated=kind == "gated")

    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "cublas": lambda w: F.linear(x[:, :k], w, bias)}
    for config in GEMV_CONFIGS:
        got = run(weight, config)
        if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(
                want.float().abs().max())):
            raise AssertionError(f"GEMV {config} ({kind}) disagrees with cuBLAS on "
                                 f"{tuple(weight.shape)}")
        runs[str(config)] = functools.partial(run, config=config)
    times = {name: _cycled_us(fn, copies) for name, fn in runs.items()}
    best = min(GEMV_CONFIGS, key=lambda c: times[str(c)])
    return (best if times[str(best)] < margin * times["cublas"] else None), times


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
