"""Decode-size all-reduces in one kernel over PyTorch symmetric memory (GPUs, tp > 1).

NCCL spends ~18 us on a 1-token all-reduce inside a CUDA graph on two H200s; a decode
step of a 40-layer model does 80 of them. Symmetric memory maps one buffer of every rank
into each rank's address space over NVLink, so a rank can read its peers' payloads with
plain loads. Here it holds a data buffer and a buffer of flags per rank, and the all-reduce
is our own Triton kernel (`replicas/kernels/allreduce.py`): one launch that casts to the
wire dtype, publishes, waits once for the peers, sums in float32 and writes back, with
programmatic dependent launch like the kernels around it, and the float16 overflow check
inside. It is captured in the decode graphs like any kernel. (PyTorch's own
`one_shot_all_reduce_copy_out` took 6.6 us alone in a graph but broke the PDL chain and
waited on a second barrier; v0.12 in PERF.md.)

Only peer-to-peer loads and stores are used. NVLink multicast (multimem / NVLS) is never
turned on: `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` is set before the first allocation.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from replicas.kernels.allreduce import (
    WIRE_DTYPES,
    Site,
    flag_words,
    one_shot_all_reduce,
    slots,
)

log = logging.getLogger(__name__)

# payloads up to this size go through the one-shot kernel: decode steps of up to 256
# sequences at 4096 hidden in bfloat16 (measured on 2xH200 with PyTorch's one-shot: 256
# tokens 18.7 us against NCCL's 38 us in a graph); longer prefill chunks stay on NCCL
# (bandwidth-bound)
ONE_SHOT_MAX_BYTES = 2 * 2**20
_exchanges = 0  # symmetric-memory rendezvous this process has made (see create)


class OneShotAllReduce:
    """A data buffer and a flag buffer per rank, rendezvoused on the TP group, and the
    addresses of every rank's pair as mapped in this process."""

    def __init__(self, group_name: str, rank: int, data: torch.Tensor, flags: torch.Tensor,
                 data_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, max_bytes: int,
                 sites: int = 0, site_bytes: int = 0) -> None:
        self.group_name, self.rank, self.max_bytes = group_name, rank, max_bytes
        self.data, self.flags = data, flags  # kept alive: the peers map them
        self.data_ptrs, self.flag_ptrs = data_ptrs, flag_ptrs
        self.nslots = slots(max_bytes)
        self.world = data_ptrs.numel()
        # after the one-shot kernel's part: `sites` regions of `site_bytes` (data) and
        # three words each (flags) for the all-reduces folded into GEMVs (Site)
        self.sites, self.site_bytes = sites, site_bytes

    def site(self, index: int, n: int, dtype: torch.dtype) -> Site | None:
        """Site `index` for a row of n `dtype` values, or None when there are not that
        many sites or the row does not fit one."""
        if index >= self.sites or self.world * n * dtype.itemsize > self.site_bytes:
            return None
        start = self.max_bytes + index * self.site_bytes
        rows = self.data[start : start + self.world * n * dtype.itemsize].view(dtype)
        words = flag_words(self.world, self.max_bytes) + 3 * index
        return Site(rows.view(self.world, n), self.flags[words : words + 3], self.data_ptrs,
                    self.flag_ptrs, start // dtype.itemsize, words, self.rank, self.world)

    @staticmethod
    def create(group: dist.ProcessGroup | None, world_size: int, device: torch.device,
               max_bytes: int, store: dist.Store | None = None, rank: int = 0,
               sites: int = 0, row_bytes: int = 0) -> OneShotAllReduce | None:
        """Allocate and rendezvous the buffers (collective: every rank calls it at the
        same point). None, with a warning, where symmetric memory does not work here:
        then every all-reduce goes through NCCL. `sites`: folded all-reduces a step may
        make (`site`), of rows up to `row_bytes`.

        PyTorch numbers its rendezvous exchanges per process, so a process that made an
        engine before (a bench, five create/shutdown cycles) is out of step with fresh
        rank processes, and its rendezvous would wait forever (seen on 2xH200). With
        `store` the ranks first compare how many exchanges each has made, and fall back
        to NCCL unless all agree."""
        global _exchanges
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # never NVLink multicast
        if world_size < 2:
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
            site_bytes = -(-world_size * row_bytes // 16) * 16
            data = symm_mem.empty(max_bytes + sites * site_bytes, dtype=torch.uint8,
                                  device=device)
            words = flag_words(world_size, max_bytes)
            flags = symm_mem.empty(words + 3 * sites, dtype=torch.int32, device=device)
            ptrs = []
            for buf in (data, flags):
                handle = symm_mem.rendezvous(buf, name)
                _exchanges += 1
                ptrs.append(torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
                            + (buf.data_ptr() - handle.buffer_ptrs[handle.rank]))
                rank = handle.rank
            # ready flags 0, free flags 1 (nobody reads a slot yet), the sites' counters 0,
            # on every rank before any rank signals
            flags[:words].view(2, -1)[0].zero_()
            flags[:words].view(2, -1)[1].fill_(1)
            flags[words:].zero_()
            torch.cuda.synchronize(device)
            dist.barrier(group=pg, device_ids=[device.index or 0])
        except Exception as e:  # noqa: BLE001 - fall back to NCCL, loudly
            log.warning("symmetric-memory all-reduce unavailable (%r): decode all-reduces "
                        "go through NCCL", e)
            return None
        return OneShotAllReduce(name, rank, data, flags, ptrs[0], ptrs[1], max_bytes, sites,
                                site_bytes)

    def fits(self, x: torch.Tensor, wire: torch.dtype) -> bool:
        """Whether `x` sent as `wire` goes through the one-shot kernel."""
        nbytes = x.numel() * wire.itemsize
        return (x.is_cuda and x.dtype in WIRE_DTYPES and wire in WIRE_DTYPES
                and 0 < nbytes <= self.max_bytes and x.is_contiguous())

    def all_reduce(self, x: torch.Tensor, wire: torch.dtype | None = None,
                   overflow: torch.Tensor | None = None) -> torch.Tensor:
        """Sum `x` over the group in place (returned), sending `wire` (x's dtype by
        default); a float16 wire sets `overflow` where the sum is not finite."""
        return one_shot_all_reduce(x, wire or x.dtype, self.data_ptrs, self.flag_ptrs,
                                   self.nslots, self.rank, overflow)
