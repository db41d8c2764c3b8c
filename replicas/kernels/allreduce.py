"""The decode-size all-reduce of tensor parallelism on GPUs: one Triton kernel over
peer-to-peer buffers (PyTorch symmetric memory maps every rank's buffer into each rank's
address space over NVLink; `replicas/symm.py` allocates them).

Each program owns one fixed 4 KiB slot of the flat payload. Program j of rank r:

1. waits (PDL) for the kernel that wrote x, and lets the next kernel launch;
2. loads its slot of x and converts it to the wire dtype (16-bit payloads cost no extra
   kernel: the cast happens here);
3. waits until every peer has finished reading slot j of r's buffer in the call before
   ("free" flags: a peer sets them right after its loads, so this wait is almost always
   over already; PyTorch's one-shot kernel instead waits on a second barrier at its end);
4. stores the slot into r's buffer and sets its "ready" flag in every peer;
5. waits for every peer's "ready" flag, then sums all ranks' slots in float32, in rank
   order (every rank computes the same bits);
6. sets "free" in every peer, and writes the sum rounded to the wire dtype, in x's
   dtype, back into x. With a float16 wire it sets the overflow flag when a result is not
   finite: the check is inside the kernel, not a pass of its own.

A flag is a 32-bit word that its signaller sets to 1 (a release store at system scope)
and its waiter takes back to 0 (an acquire compare-and-swap), so it needs no host-side
epoch, and a CUDA graph replays the kernel as it is. Slots are fixed per program, not per
call, so calls of different sizes and wire dtypes share the flags safely.

Only thread 0 of a program signals and waits (inline PTX, guarded by %tid.x), and
`tl.debug_barrier()` orders the other threads' loads and stores around it. No NVLink
multicast (multimem) is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replicas.kernels.common import _launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the GPU path only
    triton = None

SLOT_BYTES = 4096  # each program's share of the payload
WIRE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def flag_words(world_size: int, max_bytes: int) -> int:
    """int32 words of each rank's flag buffer: ready and free, per peer, per slot."""
    return 2 * world_size * slots(max_bytes)


def slots(max_bytes: int) -> int:
    return -(-max_bytes // SLOT_BYTES)


@dataclass
class Site:
    """One all-reduce of a batch-1 decode step folded into the GEMVs beside it: a region
    [world, n] of every rank's data buffer (row r: rank r's partial, pushed there by its
    GEMV) and three words of every rank's flag buffer (rows arrived, reader programs
    done, writer programs done).
    The same region and words on every rank; `rows` and `counters` are this rank's."""

    rows: torch.Tensor  # [world, n] in the wire dtype (= the model dtype)
    counters: torch.Tensor  # [3] int32: arrived, read, written
    data_ptrs: torch.Tensor  # every rank's data buffer address (int64, on the device)
    flag_ptrs: torch.Tensor
    data_offset: int  # the region's offset in each data buffer, in wire elements
    flag_offset: int  # the arrived word's index in each flag buffer
    rank: int
    world: int

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        return self.data_ptrs, self.flag_ptrs, self.counters, self.data_offset, self.flag_offset

    def pull(self) -> torch.Tensor:
        """The sum [1, n], in a kernel of its own (for a reader that cannot sum it)."""
        return pull(self.rows, self.counters)


if triton is not None:
    from replicas.kernels.common import _pdl_enter

    @triton.jit
    def _set_flag(addr):
        """Thread 0 stores 1 at `addr` ([1] pointers), releasing its program's writes."""
        tl.inline_asm_elementwise(
            """{
            .reg .u32 %t, %one;
            .reg .pred %p;
            mov.u32 %t, %tid.x;
            setp.eq.u32 %p, %t, 0;
            mov.u32 %one, 1;
            @%p st.release.sys.global.b32 [$1], %one;
            mov.u32 $0, 0;
            }""",
            "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _take_flag(addr):
        """Thread 0 waits until `addr` ([1] pointers) holds 1 and sets it back to 0
        (acquire: what the signaller wrote before its flag is then visible)."""
        tl.inline_asm_elementwise(
            """{
            .reg .u32 %t, %v, %one, %zero;
            .reg .pred %p, %q;
            mov.u32 %t, %tid.x;
            setp.ne.u32 %p, %t, 0;
            mov.u32 %one, 1;
            mov.u32 %zero, 0;
            @%p bra done;
            spin:
            atom.acquire.sys.global.cas.b32 %v, [$1], %one, %zero;
            setp.ne.u32 %q, %v, 1;
            @%q bra spin;
            done:
            mov.u32 $0, 0;
            }""",
            "=r,l", [addr], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _aligned(addr, dtype: tl.constexpr):
        """The buffer address at `addr` as a pointer that the compiler knows to be 16-byte
        aligned (symmetric allocations are), so that loads and stores go 16 bytes wide."""
        return tl.multiple_of(tl.load(addr).to(tl.pointer_type(dtype)), 16)

    @triton.jit
    def _one_shot_kernel(X, n, DATA, FLAGS, OVF, RANK: tl.constexpr, WORLD: tl.constexpr,
                         WIRE: tl.constexpr, BLOCK: tl.constexpr, NSLOTS: tl.constexpr,
                         CHECK: tl.constexpr, PDL: tl.constexpr):
        _pdl_enter(PDL)
        j = tl.program_id(0)
        cols = j * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        wire = tl.load(X + cols, mask=ok, other=0.0).to(WIRE)
        one = tl.arange(0, 1)
        mine = tl.load(FLAGS + RANK).to(tl.pointer_type(tl.int32))
        for p in tl.static_range(WORLD):  # 3: peers are done with this slot
            if p != RANK:
                _take_flag(mine + ((WORLD + p) * NSLOTS + j) + one)
        tl.debug_barrier()
        own = _aligned(DATA + RANK, WIRE)
        tl.store(own + cols, wire, mask=ok)  # 4: publish
        tl.debug_barrier()
        for p in tl.static_range(WORLD):
            if p != RANK:
                theirs = tl.load(FLAGS + p).to(tl.pointer_type(tl.int32))
                _set_flag(theirs + (RANK * NSLOTS + j) + one)
        for p in tl.static_range(WORLD):  # 5: gather
            if p != RANK:
                _take_flag(mine + (p * NSLOTS + j) + one)
        tl.debug_barrier()
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            if p == RANK:
                acc += wire.to(tl.float32)
            else:
                peer = _aligned(DATA + p, WIRE)
                acc += tl.load(peer + cols, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.debug_barrier()  # every thread's loads of the peers' slots are done
        for p in tl.static_range(WORLD):  # 6: release the peers' slots
            if p != RANK:
                theirs = tl.load(FLAGS + p).to(tl.pointer_type(tl.int32))
                _set_flag(theirs + ((WORLD + RANK) * NSLOTS + j) + one)
        out = acc.to(WIRE)
        if CHECK:
            # float16 inf and NaN: all five exponent bits set
            bits = out.to(tl.int16, bitcast=True).to(tl.int32) & 0x7C00
            bad = tl.sum((bits == 0x7C00).to(tl.int32), 0)
            tl.store(OVF, (bad > 0).to(tl.uint8), mask=bad > 0)
        tl.store(X + cols, out.to(X.dtype.element_ty), mask=ok)


    # ---- the reduce folded into the kernels beside it (batch-1 decode) ----
    # A row-parallel GEMV writes its partial row into every rank's buffer at a "site"
    # (one per all-reduce of the step; its last program copies the row to the peers)
    # and adds it to each rank's "arrived" word; the kernel that reads the sum (the next
    # norm GEMV, or `_pull_kernel`) waits until every rank's row arrived, sums them as it
    # loads them, and counts its programs out in a "done" word: the last one resets
    # both words for the next step. No all-reduce kernel and no kernel boundary.

    @triton.jit
    def _await_count(addr, target):
        """Thread 0 waits until the word at `addr` ([1] pointers) reaches `target`
        (acquire: what the adders stored before their adds is then visible)."""
        tl.inline_asm_elementwise(
            """{
            .reg .u32 %t, %v;
            .reg .pred %p, %q;
            mov.u32 %t, %tid.x;
            setp.ne.u32 %p, %t, 0;
            @%p bra done;
            spin:
            ld.acquire.sys.global.u32 %v, [$1];
            setp.lt.u32 %q, %v, $2;
            @%q bra spin;
            done:
            mov.u32 $0, 0;
            }""",
            "=r,l,r", [addr, target], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _push_rows(y, rows, r_ok, n, DATA, FLAGS, CNT, site_data, site_flag,
                   RANK: tl.constexpr, WORLD: tl.constexpr):
        """Store `y` (this program's rows of this rank's partial, in the wire dtype) at the
        site in this rank's own buffer. The grid's last program to do so (a count in the
        site's third word, GPU scope) copies the whole row into every other rank's buffer
        and adds n to every rank's arrived word: one release at system scope per rank and
        site (one per program, over NVLink to one word, cost ~28 us a site on 2xH200)."""
        own = _aligned(DATA + RANK, y.dtype) + site_data + RANK * n
        tl.store(own + rows, y, mask=r_ok)
        tl.debug_barrier()  # every thread's stores before the count (acq_rel, cumulative)
        before = tl.atomic_add(CNT + 2, 1, sem="acq_rel", scope="gpu")
        if before == tl.num_programs(0) - 1:
            tl.store(CNT + 2, 0)  # the next step's count (its GEMV runs after this one)
            for c0 in range(0, n, 1024):
                cols = c0 + tl.arange(0, 1024)
                v = tl.load(own + cols, mask=cols < n, cache_modifier=".cg")
                for p in tl.static_range(WORLD):
                    if p != RANK:
                        peer = _aligned(DATA + p, y.dtype) + site_data + RANK * n
                        tl.store(peer + cols, v, mask=cols < n)
            tl.debug_barrier()
            for p in tl.static_range(WORLD):
                flags = tl.load(FLAGS + p).to(tl.pointer_type(tl.int32))
                tl.atomic_add(flags + site_flag, n, sem="release", scope="sys")

    @triton.jit
    def _await_rows(CNT, n, WORLD: tl.constexpr):
        """Wait until every rank's n rows arrived at the site (CNT: its arrived word)."""
        one = tl.arange(0, 1)
        _await_count(CNT + one, tl.zeros([1], dtype=tl.int32) + WORLD * n)
        tl.debug_barrier()

    @triton.jit
    def _summed(X, cols, ok, n, WORLD: tl.constexpr):
        """Columns `cols` of the sum of the WORLD partial rows at X ([WORLD, n]): float32,
        in rank order, rounded to X's dtype (the one-shot kernel's bits). X is this
        rank's own memory, read after the acquire of its arrived word: cached loads (each
        of a norm GEMV's thousands of programs reads the whole row twice; from L1 after
        the first program of an SM, not each time from L2)."""
        acc = tl.zeros(cols.shape, dtype=tl.float32)
        for p in tl.static_range(WORLD):
            acc += tl.load(X + p * n + cols, mask=ok, other=0.0).to(tl.float32)
        return acc.to(X.dtype.element_ty)

    @triton.jit
    def _leave_rows(CNT):
        """Count this program out of the site (CNT[1], after its last load of the rows);
        the grid's last program sets the arrived and read counts back to 0 for the next
        step. A peer adds to the arrived count again only after this rank's later kernels
        signalled it, so the reset is never raced."""
        tl.debug_barrier()
        before = tl.atomic_add(CNT + 1, 1, sem="acq_rel", scope="gpu")
        if before == tl.num_programs(0) - 1:
            tl.store(CNT, 0)
            tl.store(CNT + 1, 0)

    @triton.jit
    def _pull_kernel(X, Y, CNT, n, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
        """Y = the site's sum, for a reader that cannot sum it itself."""
        _pdl_enter(PDL)
        _await_rows(CNT, n, WORLD)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        tl.store(Y + cols, _summed(X, cols, ok, n, WORLD), mask=ok)
        _leave_rows(CNT)


def pull(rows: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The sum [1, n] of a site's partial rows [world, n] (`counters`: its arrived and
    done words), in one kernel: for a reader that does not sum as it loads."""
    world, n = rows.shape
    y = torch.empty(1, n, dtype=rows.dtype, device=rows.device)
    block = 1024
    _pull_kernel[(-(-n // block),)](rows, y, counters, n, WORLD=world, BLOCK=block,
                                    num_warps=4, **_launch(rows))
    return y


_TL = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def one_shot_all_reduce(x: torch.Tensor, wire: torch.dtype, data_ptrs: torch.Tensor,
                        flag_ptrs: torch.Tensor, nslots: int, rank: int,
                        overflow: torch.Tensor | None) -> torch.Tensor:
    """Sum contiguous `x` over the ranks in place, sending `wire`; `data_ptrs` and
    `flag_ptrs` are int64 device tensors of every rank's buffer and flag addresses (as
    mapped here). `overflow` (bool, on x's device) is set when a float16 sum is not
    finite. Every rank must call it with the same shape and wire dtype."""
    n = x.numel()
    block = SLOT_BYTES // wire.itemsize
    grid = -(-n // block)
    assert grid <= nslots, f"{n} elements of {wire} exceed the one-shot buffer"
    check = wire == torch.float16 and overflow is not None
    ovf = overflow.view(torch.uint8) if check and overflow is not None else data_ptrs
    _one_shot_kernel[(grid,)](
        x, n, data_ptrs, flag_ptrs, ovf, RANK=rank, WORLD=data_ptrs.numel(),
        WIRE=getattr(tl, _TL[wire]), BLOCK=block, NSLOTS=nslots, CHECK=check, num_warps=4,
        **_launch(x))
    return x
