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
    "_two_terms_kernel": ("m",),
    "_quant_two_kernel": ("m",),  # (x's rows: where its second term's rows start)
    "_rms_norm_kernel": ("m",),  # (the same, where it writes two terms)
}


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


def _launch(t: torch.Tensor, maxnreg: int = 0) -> dict[str, bool | int]:
    """The PDL arguments of a launch on t's device: the kernel's flag and the launch's;
    and `maxnreg`, a cap on a thread's registers (ptxas's), where given and t is on a GPU
    (Triton's interpreter takes none)."""
    on = pdl(t.device)
    cap = {"maxnreg": maxnreg} if maxnreg and t.is_cuda else {}
    return {"PDL": on, "launch_pdl": True, **cap} if on else {"PDL": False, **cap}
