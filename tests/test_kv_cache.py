"""BlockManager bookkeeping (free list, reference counts, chained-hash prefix cache, LRU
eviction) and the shapes of the per-rank KV pool."""

from __future__ import annotations

import pytest
import torch

from replicas.config import ModelSpec
from replicas.kv_cache import BlockManager, allocate_kv_cache, block_bytes, chain_hash


def chain(*blocks: tuple[int, ...]) -> list[int]:
    """Chain hashes of consecutive full blocks, as a sequence computes them."""
    hashes: list[int] = []
    for tokens in blocks:
        hashes.append(chain_hash(hashes[-1] if hashes else None, tokens))
    return hashes


def cached_prefix(bm: BlockManager, *blocks: tuple[int, ...]) -> list[int]:
    """Allocate, register and release blocks holding `blocks`: a finished sequence whose
    full blocks stay in the prefix cache with reference count 0."""
    table = [bm.allocate() for _ in blocks]
    for block, h in zip(table, chain(*blocks), strict=True):
        bm.register(block, h)
    bm.release(table)
    return table


def spec(num_kv_heads: int = 4, num_layers: int = 3, head_dim: int = 8) -> ModelSpec:
    return ModelSpec(
        family="llama", vocab_size=32, hidden_size=64, intermediate_size=128,
        num_layers=num_layers, num_heads=8, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-6, max_position_embeddings=128, qkv_bias=False, o_bias=False,
        mlp_bias=False, qk_norm=False, tie_word_embeddings=False, hidden_act="silu",
        rotary_dim=head_dim, rope_interleaved=False,
    )


A, B, C, D = (1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)


# ---- allocation and release ----


def test_allocate_until_exhausted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    got = [bm.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]  # each block handed out once
    assert all(bm.ref[b] == 1 for b in got)
    assert bm.num_free() == 0
    with pytest.raises(MemoryError, match="exhausted"):
        bm.allocate()


def test_release_returns_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    got = [bm.allocate() for _ in range(3)]
    bm.release(got[:2])
    assert bm.num_free() == 2
    again = {bm.allocate(), bm.allocate()}
    assert again == set(got[:2])
    with pytest.raises(MemoryError):
        bm.allocate()


def test_double_release_is_caught() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    b = bm.allocate()
    bm.release([b])
    with pytest.raises(AssertionError, match="released twice"):
        bm.release([b])


# ---- reference counts with shared prefix blocks ----


def test_lookup_takes_references_on_blocks_in_use() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    owner = [bm.allocate(), bm.allocate()]
    for block, h in zip(owner, chain(A, B), strict=True):
        bm.register(block, h)
    shared = bm.lookup(chain(A, B))
    assert shared == owner
    assert [bm.ref[b] for b in owner] == [2, 2]
    assert bm.num_free() == 1  # a block in use is not free, shared or not

    bm.release(owner)  # the first owner finishes; the sharer still holds them
    assert [bm.ref[b] for b in owner] == [1, 1]
    assert bm.num_free() == 1
    assert bm.allocate() not in owner
    with pytest.raises(MemoryError):  # the shared blocks are not reusable yet
        bm.allocate()

    bm.release(shared)  # last reference dropped: now cached, hence reusable
    assert bm.num_free() == 2
    assert {bm.allocate(), bm.allocate()} == set(owner)


def test_lookup_revives_a_cached_block() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    table = cached_prefix(bm, A)
    assert bm.num_free() == 2  # one never used, one cached
    assert bm.lookup(chain(A)) == table
    assert bm.ref[table[0]] == 1
    assert bm.num_free() == 1  # revived: no longer evictable
    other = bm.allocate()
    assert other != table[0]
    with pytest.raises(MemoryError):
        bm.allocate()


# ---- prefix lookup ----


def test_lookup_finds_the_longest_prefix_and_stops_at_the_first_miss() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table = cached_prefix(bm, A, B, C)
    # the query agrees on A, B, then differs; its 4th block hash equals nothing either
    query = chain(A, B, D, C)
    assert bm.lookup(query) == table[:2]
    assert bm.hit_blocks == 2
    assert bm.ref[table[2]] == 0  # C stays cached, untouched


def test_lookup_does_not_skip_over_a_miss() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table = cached_prefix(bm, A, B, C)
    hashes = chain(A, B, C)
    # the first block is missing from the query: nothing after it may match
    assert bm.lookup([chain(D)[0], hashes[1], hashes[2]]) == []
    assert bm.hit_blocks == 0
    assert all(bm.ref[b] == 0 for b in table)


def test_same_tokens_after_a_different_prefix_do_not_match() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    cached_prefix(bm, A, B)
    # B's tokens again, but after C: a different chain hash
    assert chain(C, B)[1] != chain(A, B)[1]
    assert bm.lookup(chain(C, B)) == []
    assert bm.lookup([chain(C, B)[1]]) == []  # not even alone at the start


def test_hit_blocks_counts_every_reused_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    cached_prefix(bm, A, B)
    first = bm.lookup(chain(A, B))
    second = bm.lookup(chain(A, D))
    assert bm.hit_blocks == 3
    bm.release(first)
    bm.release(second)
    assert bm.lookup(chain(D)) == []
    assert bm.hit_blocks == 3


def test_register_keeps_the_first_of_equal_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    first, twin = bm.allocate(), bm.allocate()
    h = chain(A)[0]
    bm.register(first, h)
    bm.register(twin, h)  # same contents computed twice: the twin stays private
    bm.release([twin])
    assert bm.num_free() == 3
    assert bm.lookup([h]) == [first]
    # the private twin went back to the free list, not the cache
    assert twin not in bm.cached.values()


# ---- eviction ----


def test_cached_blocks_are_evicted_least_recently_released_first() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    tables = [bm.allocate() for _ in range(3)]
    hashes = [chain(A)[0], chain(B)[0], chain(C)[0]]
    for block, h in zip(tables, hashes, strict=True):
        bm.register(block, h)
    # released in the order B, C, A: B is the oldest cached block
    for i in (1, 2, 0):
        bm.release([tables[i]])
    assert bm.num_free() == 3

    assert bm.allocate() == tables[1]
    assert bm.lookup([hashes[1]]) == []  # eviction removed it from the index
    assert tables[1] not in bm.hash_of
    assert bm.allocate() == tables[2]
    assert bm.lookup([hashes[0]]) == [tables[0]]  # A survived
    assert bm.num_free() == 0


def test_free_blocks_are_used_before_evicting_cached_ones() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    table = cached_prefix(bm, A)
    got = {bm.allocate(), bm.allocate()}
    assert table[0] not in got
    assert bm.lookup(chain(A)) == table


def test_a_released_sequence_evicts_its_tail_before_its_head() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    table = cached_prefix(bm, A, B, C)
    assert bm.allocate() == table[2]  # the tail goes first: the head stays findable
    assert bm.lookup(chain(A, B, C)) == table[:2]


def test_evicted_block_registered_again_under_a_new_hash() -> None:
    bm = BlockManager(num_blocks=1, block_size=4)
    (old,) = cached_prefix(bm, A)
    block = bm.allocate()  # evicts A
    assert block == old
    bm.register(block, chain(B)[0])
    bm.release([block])
    assert bm.lookup(chain(A)) == []
    assert bm.lookup(chain(B)) == [block]


def test_num_free_counts_free_and_evictable() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    cached_prefix(bm, A, B)  # 2 cached
    held = [bm.allocate(), bm.allocate()]  # from the 4 never-used ones
    assert bm.num_free() == 4  # 2 free + 2 cached
    assert len(bm.free) == 2 and len(bm.cached) == 2
    bm.lookup(chain(A))  # revives one cached block
    assert bm.num_free() == 3
    bm.release(held)
    assert bm.num_free() == 5


# ---- pool sizing and shapes ----


@pytest.mark.parametrize(
    ("kv_heads", "tp", "local_heads"),
    [(4, 1, 4), (4, 2, 2), (4, 4, 1), (2, 4, 1), (1, 2, 1)],
)
def test_block_bytes(kv_heads: int, tp: int, local_heads: int) -> None:
    s = spec(num_kv_heads=kv_heads, num_layers=3, head_dim=8)
    # K and V, 3 layers, 16 tokens, local heads, 8 dims, 2 bytes
    assert block_bytes(s, tp, 16, torch.float16) == 2 * 3 * 16 * local_heads * 8 * 2
    assert block_bytes(s, tp, 16, torch.float32) == 2 * block_bytes(s, tp, 16, torch.float16)


@pytest.mark.parametrize(("kv_heads", "tp", "local_heads"), [(4, 2, 2), (2, 4, 1), (1, 2, 1)])
def test_allocate_kv_cache_shapes(kv_heads: int, tp: int, local_heads: int) -> None:
    s = spec(num_kv_heads=kv_heads, num_layers=3, head_dim=8)
    kv = allocate_kv_cache(s, tp, num_blocks=5, block_size=4, dtype=torch.bfloat16,
                           device=torch.device("cpu"))
    assert len(kv) == 3
    for k, v in kv:
        assert k.shape == v.shape == (5, 4, local_heads, 8)
        assert k.dtype == v.dtype == torch.bfloat16
        assert not k.any() and not v.any()  # zeroed: padding reads finite values
        assert k.data_ptr() != v.data_ptr()
    assert len({k.data_ptr() for k, _ in kv}) == 3  # no layer shares storage
    per_block = sum(k[0].nbytes + v[0].nbytes for k, v in kv)
    assert per_block == block_bytes(s, tp, 4, torch.bfloat16)
