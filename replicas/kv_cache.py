"""The paged KV cache: the preallocated block pool of each rank, and the block bookkeeping
that rank 0 does for all ranks (every rank's pool has the same number of blocks, so one
block table serves all of them).

Prefix cache: a full block is known by the hash of its tokens chained with the hash of
the block before it, so equal hashes mean equal prefixes. A finished sequence's full
blocks keep their contents with reference count 0 and stay findable until the pool needs
them again (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from replicas.config import ModelSpec
from replicas.fp8 import row_scales


def kv_heads_per_rank(spec: ModelSpec, tp: int) -> int:
    """KV heads in one rank's cache: its share, or the one its queries use when there are
    fewer KV heads than ranks."""
    return max(1, spec.num_kv_heads // tp)


# an int8 cache keeps, beside each (token, KV head) row of head_dim entries, the float32
# scale it was rounded with (max|row| / 127): `KV_SCALE` bytes a row
KV_SCALE = torch.float32


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scales [...]): each row over the last dim
    divided by max|row| / 127 (1 for a zero row) and rounded half up, in float32, as the
    Triton kernels write an int8 cache (replicas/kernels/rope.py)."""
    scale = row_scales(x.float().abs().amax(-1), 127.0)
    rows = torch.floor(x.float() / scale[..., None] + 0.5).clamp(-127, 127)
    return rows.to(torch.int8), scale


def from_int8_rows(rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
                   ) -> torch.Tensor:
    """int8 rows [..., D] and their scales [...] -> the entries they stand for, in
    `dtype` (each product in float32, rounded once), as the attention kernels read them."""
    return (rows.float() * scale[..., None]).to(dtype)


def block_bytes(spec: ModelSpec, tp: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes on one rank: K and V of every layer (and an int8 cache's
    row scales)."""
    kv_heads = kv_heads_per_rank(spec, tp)
    row = spec.head_dim * dtype.itemsize + (KV_SCALE.itemsize if dtype == torch.int8 else 0)
    return 2 * spec.num_layers * block_size * kv_heads * row


def allocate_kv_cache(
    spec: ModelSpec, tp: int, num_blocks: int, block_size: int, dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (K, V), each [num_blocks, block_size, kv_heads, head_dim], zeroed so
    that masked-out padding reads finite values; an int8 cache's layers are (K, V, K
    scales, V scales), the scales [num_blocks, block_size, kv_heads] float32."""
    kv_heads = kv_heads_per_rank(spec, tp)
    shape = (num_blocks, block_size, kv_heads, spec.head_dim)

    def layer() -> tuple[torch.Tensor, ...]:
        kv = (torch.zeros(shape, dtype=dtype, device=device),
              torch.zeros(shape, dtype=dtype, device=device))
        if dtype != torch.int8:
            return kv
        return (*kv, *(torch.zeros(shape[:3], dtype=KV_SCALE, device=device) for _ in kv))

    return [layer() for _ in range(spec.num_layers)]


def chain_hash(prev: int | None, tokens: Sequence[int]) -> int:
    return hash((prev, tuple(tokens)))


class BlockManager:
    """Free list, reference counts and the prefix-cache index of one block pool."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-used blocks
        self.cached: OrderedDict[int, int] = OrderedDict()  # hash -> block, ref 0, evictable
        self.by_hash: dict[int, int] = {}  # hash -> block (in use or evictable)
        self.hash_of: dict[int, int] = {}  # block -> hash
        self.hit_blocks = 0  # blocks reused through the prefix cache, since start

    def num_free(self) -> int:
        return len(self.free) + len(self.cached)

    def allocate(self) -> int:
        """A block with reference count 1; raises MemoryError when none is free."""
        if self.free:
            block = self.free.pop()
        elif self.cached:
            h, block = self.cached.popitem(last=False)  # evict the oldest cached block
            del self.by_hash[h], self.hash_of[block]
        else:
            raise MemoryError("KV block pool exhausted")
        self.ref[block] = 1
        return block

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest matching prefix."""
        blocks = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.cached[h]
            self.ref[block] += 1
            blocks.append(block)
        self.hit_blocks += len(blocks)
        return blocks

    def register(self, block: int, h: int) -> None:
        """Make a full block findable by its prefix hash."""
        if h in self.by_hash or block in self.hash_of:
            return  # an equal block is already indexed; this one stays private
        self.by_hash[h] = block
        self.hash_of[block] = h

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become free or cached.

        Released in reverse so that a sequence's tail is evicted before its head.
        """
        for block in reversed(blocks):
            self.ref[block] -= 1
            assert self.ref[block] >= 0, f"block {block} released twice"
            if self.ref[block]:
                continue
            h = self.hash_of.get(block)
            if h is None:
                self.free.append(block)
            else:
                self.cached[h] = block
