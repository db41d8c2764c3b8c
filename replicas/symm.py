"""Decode-size all-reduces in one kernel over PyTorch symmetric memory (GPUs, tp > 1).

NCCL spends ~18 us on a 1-token all-reduce inside a CUDA graph on two H200s; a decode
step of a 40-layer model does 80 of them. PyTorch's one-shot all-reduce
(`torch.ops.symm_mem.one_shot_all_reduce_copy_out`) is one kernel: it copies this
rank's payload into its buffer of a symmetric allocation (mapped into every rank's
address space over NVLink), waits on the peers' signal pads, loads every rank's buffer,
sums and writes the result, then signals again so that no buffer is overwritten while a
peer still reads it. It is captured in the decode graphs like any kernel.

Only peer-to-peer loads are used. NVLink multicast (multimem / NVLS) is never turned
on: `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` is set before the first allocation.

The kernel takes bfloat16 and float32 payloads (float16 payloads stay on NCCL, with
the overflow guard of parallel.py). With two ranks a bfloat16 sum is one addition,
rounded once, as exact as summing in float32 and rounding the result.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# payloads up to this size go through the one-shot kernel: decode steps of up to 256
# sequences at 4096 hidden in bfloat16 (measured on 2xH200: 256 tokens 18.7 us against
# NCCL's 38 us in a graph); longer prefill chunks stay on NCCL (bandwidth-bound)
ONE_SHOT_MAX_BYTES = 2 * 2**20
ONE_SHOT_DTYPES = (torch.bfloat16, torch.float32)
_exchanges = 0  # symmetric-memory rendezvous this process has made (see create)


class OneShotAllReduce:
    """One symmetric buffer per payload dtype, rendezvoused on the TP group."""

    def __init__(self, group_name: str, buffers: dict[torch.dtype, torch.Tensor],
                 max_bytes: int) -> None:
        self.group_name, self.buffers, self.max_bytes = group_name, buffers, max_bytes
        self._copy = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")

    @staticmethod
    def create(group: dist.ProcessGroup | None, world_size: int, device: torch.device,
               dtypes: tuple[torch.dtype, ...], max_bytes: int, store: dist.Store | None = None,
               rank: int = 0) -> OneShotAllReduce | None:
        """Allocate and rendezvous the buffers (collective: every rank calls it at the
        same point). None, with a warning, where symmetric memory does not work here:
        then every all-reduce goes through NCCL.

        PyTorch numbers its rendezvous exchanges per process, so a process that made an
        engine before (a bench, five create/shutdown cycles) is out of step with fresh
        rank processes, and its rendezvous would wait forever (seen on 2xH200). With
        `store` the ranks first compare how many exchanges each has made, and fall back
        to NCCL unless all agree."""
        global _exchanges
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # never NVLink multicast
        wanted = tuple(dict.fromkeys(d for d in dtypes if d in ONE_SHOT_DTYPES))
        if not wanted or world_size < 2:
            return None
        if store is not None:
            store.set(f"symm_exchanges/{rank}", str(_exchanges))
            counts = {int(store.get(f"symm_exchanges/{r}")) for r in range(world_size)}
            if len(counts) > 1:
                log.warning("symmetric memory was used before in a TP rank's process "
                            "(rendezvous counts %s): this engine's all-reduces go through "
                            "NCCL", sorted(counts))
                return None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            pg = group or dist.group.WORLD
            assert pg is not None
            name = pg.group_name
            buffers = {}
            for dtype in wanted:
                elem = torch.empty((), dtype=dtype).element_size()
                buf = symm_mem.empty(max_bytes // elem, dtype=dtype, device=device)
                symm_mem.rendezvous(buf, name)
                _exchanges += 1
                buffers[dtype] = buf
        except Exception as e:  # noqa: BLE001 - fall back to NCCL, loudly
            log.warning("symmetric-memory all-reduce unavailable (%r): decode all-reduces "
                        "go through NCCL", e)
            return None
        return OneShotAllReduce(name, buffers, max_bytes)

    def fits(self, payload: torch.Tensor) -> bool:
        nbytes = payload.numel() * payload.element_size()
        return (payload.is_cuda and payload.dtype in self.buffers
                and 0 < nbytes <= self.max_bytes and nbytes % 16 == 0
                and payload.is_contiguous())

    def all_reduce(self, payload: torch.Tensor) -> torch.Tensor:
        """Sum `payload` over the group, in place (returned)."""
        flat = payload.view(-1)
        buf = self.buffers[payload.dtype][: flat.numel()]
        if self._copy:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, flat, "sum", self.group_name,
                                                            flat)
        else:  # older PyTorch: the copy in, then the reduce
            buf.copy_(flat)
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, flat)
        return payload
