"""Shared by the kernel families: whether the Triton path is on (`enabled`),
programmatic dependent launch (`pdl`, `_launch`, and `_pdl_enter` inside a kernel), and
block-size arithmetic."""

from __future__ import annotations

import functools
import os

import torch

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


# Integer arguments that follow a step's shape (its tokens or rows, its block table's
# width, a buffer's stride over rows): Triton would compile a variant of the kernel for
# each class of value it meets (1, a multiple of 16, any other), the first of each in the
# middle of serving (~0.2-1.5 s on an H200 host). None of them is a stride along which a
# kernel vectorizes, so each kernel is compiled once for them all
# (tests/test_kernel_variants.py runs a varied workload and holds the rest of each
# kernel's integer arguments to one class).
STEP_SHAPED: dict[str, tuple[str, ...]] = {
    "_attention_kernel": ("stab",),  # block table columns: the widest sequence's blocks
    "_decode_kernel": ("stab", "sls"),  # and the split LSE buffer's stride over rows
    "_rope_cache_kernel": ("T",),  # the step's tokens
    "_feed_kernel": ("n",),  # the tokens fed back
    "_w8a16_kernel": ("m",),  # the step's rows
    "_w8a8_groups_kernel": ("m",),
}


# Where a decode step of few sequences asks L2 for the weights of the kernels after this
# one while HBM would otherwise idle (PERF.md v0.75): "attention" (decode attention: o_proj's
# weights, then gate_up_proj's first bytes, up to L2_PREFETCH_MB in all), "down" (the down
# GEMV, at its end: the next layer's qkv_proj weights). `TPSERVE_L2_PREFETCH`, a comma list
# of them ("" or "0": none).
L2_PREFETCH_SITES = ("attention", "down")
L2_PREFETCH_MB = 32
L2_PREFETCH_MAX_SEQS = 8  # (steps of more sequences read the KV cache for longer)


def l2_prefetch_budget(site: str, device: torch.device, num_seqs: int) -> int:
    """How many bytes `site` asks L2 for in a step of num_seqs sequences on `device`: 0
    where prefetching is off (not a GPU, too many sequences, the site not listed)."""
    assert site in L2_PREFETCH_SITES, site
    sites = os.environ.get("TPSERVE_L2_PREFETCH", "")
    if (device.type != "cuda" or num_seqs > L2_PREFETCH_MAX_SEQS
            or site not in sites.split(",")):
        return 0
    mb = float(os.environ.get("TPSERVE_L2_PREFETCH_MB", L2_PREFETCH_MB))
    return int(mb * 2**20) if site == "attention" else 1 << 40


def prefetch_views(tensors: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Flat byte views of `tensors`' storage, in order, at most `budget` bytes in all,
    each cut to whole 16-byte units (the bulk prefetch's unit); empty ones left out."""
    views = []
    for t in tensors:
        assert t.is_contiguous() and t.data_ptr() % 16 == 0, "whole, 16-aligned tensors"
        n = min(budget, t.numel() * t.element_size()) // 16 * 16
        if n > 0:
            views.append(t.view(-1).view(torch.uint8)[:n])
            budget -= n
    return views


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """With PDL: wait for the kernel before (its writes are then visible), then let the
        next kernel launch, so that its start overlaps this one."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_l2(P, nbytes, part, parts, LANES: tl.constexpr):
        """Ask L2 for program `part` of `parts`' share of the nbytes (whole 16s) at byte
        pointer P: one bulk prefetch (sm_90's cp.async.bulk.prefetch.L2) a lane of
        LANES. A hint: nothing waits for it, nothing changes but where the bytes are."""
        per = tl.cdiv(tl.cdiv(nbytes, parts * LANES), 16) * 16  # bytes a lane
        start = (part * LANES + tl.arange(0, LANES)).to(tl.int64) * per
        size = tl.maximum(tl.minimum(nbytes - start, per), 0).to(tl.int32)
        addr = (P + start).to(tl.int64)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


def _launch(t: torch.Tensor) -> dict[str, bool]:
    """The PDL arguments of a launch on t's device: the kernel's flag and the launch's."""
    on = pdl(t.device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
