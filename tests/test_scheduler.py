"""Continuous batching with tiny fakes: a real BlockManager with a few blocks, sequences of
made-up tokens, no model. `Driver` runs steps the way the engine does: schedule, read
each item's `samples` while building the batch, advance every item, then append a fake
sampled token where one was sampled and finish sequences that reached max_tokens."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from replicas.config import SamplingParams
from replicas.kv_cache import BlockManager
from replicas.scheduler import Scheduled, Scheduler, Sequence

BS = 4  # tokens per block in every test


def seq(rid: str, prompt: int | list[int], max_tokens: int = 4, score: bool = False
        ) -> Sequence:
    """A sequence whose prompt is `prompt` tokens (distinct per request id) or a list."""
    if isinstance(prompt, int):
        base = 1000 * (sum(map(ord, rid)) % 97 + 1)
        prompt = list(range(base, base + prompt))
    return Sequence(rid, list(prompt), len(prompt), SamplingParams(max_tokens=max_tokens),
                    score=score)


@dataclass
class Driver:
    """An engine without a model: what each step scheduled, and which items sampled."""

    sched: Scheduler
    steps: list[list[tuple[str, int, bool]]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    # a fake KV pool: the token whose K/V each slot holds, to catch a sequence reading
    # (through its block table) K/V that are not those of its own tokens
    kv: dict[tuple[int, int], int] = field(default_factory=dict)

    @staticmethod
    def make(num_blocks: int, max_num_seqs: int = 8, budget: int = 64) -> Driver:
        return Driver(Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget))

    def step(self) -> list[tuple[str, int, bool]]:
        plan = self.sched.schedule()
        # the engine reads `samples` while building the batch, before advance()
        record = [(i.seq.request_id, i.num_tokens, i.samples) for i in plan]
        assert sum(i.num_tokens for i in plan) <= self.sched.token_budget
        assert len({id(i.seq) for i in plan}) == len(plan)
        for item in plan:
            self.compute(item)
        for item in plan:
            self.sched.advance(item)
        for item, (_, _, samples) in zip(plan, record, strict=True):
            s = item.seq
            if samples and not s.score:
                s.token_ids.append(10**6 + len(s.token_ids))  # fake sampled token
                if len(s.output_ids) >= s.params.max_tokens:
                    self.sched.finish(s)
                    self.finished.append(s.request_id)
            elif s.score and s.num_computed == len(s.token_ids):
                self.sched.finish(s)
                self.finished.append(s.request_id)
        check_invariants(self.sched)
        self.steps.append(record)
        return record

    def compute(self, item: Scheduled) -> None:
        """What the model does: read the cached K/V of the context, write the chunk's."""
        s, table = item.seq, item.seq.block_table
        end = s.num_computed + item.num_tokens
        assert item.num_tokens >= 1 and end <= len(s.token_ids)
        assert len(table) * BS >= end, "no block for a computed token"
        for pos in range(s.num_computed):
            assert self.kv.get((table[pos // BS], pos % BS)) == s.token_ids[pos], (
                f"{s.request_id} reads wrong K/V at position {pos}")
        for pos in range(s.num_computed, end):
            self.kv[(table[pos // BS], pos % BS)] = s.token_ids[pos]

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            assert self.step(), "the scheduler has work but scheduled nothing"
        raise AssertionError("did not finish")


def check_invariants(sched: Scheduler) -> None:
    """Every block is held (ref = number of tables holding it), free, or cached."""
    bm = sched.blocks
    holders = Counter(b for s in sched.running for b in s.block_table)
    for block in range(bm.num_blocks):
        assert bm.ref[block] == holders[block], f"block {block}"
    assert len(holders) + bm.num_free() == bm.num_blocks
    assert all(bm.ref[b] == 0 for b in bm.cached.values())
    for s in sched.running:
        assert len(s.block_table) * BS >= s.num_computed
        assert s.num_computed <= len(s.token_ids)
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed == 0


# ---- token budget and chunked prefill ----


def test_chunked_prefill_respects_the_budget_and_samples_on_the_last_chunk() -> None:
    d = Driver.make(num_blocks=16, budget=8)
    a = seq("a", 20, max_tokens=3)
    d.sched.add(a)
    d.run()
    assert d.steps == [
        [("a", 8, False)], [("a", 8, False)], [("a", 4, True)],  # prefill in chunks
        [("a", 1, True)], [("a", 1, True)],  # decode: one token each
    ]
    assert d.finished == ["a"] and len(a.output_ids) == 3
    assert d.sched.blocks.num_free() == 16


def test_budget_is_shared_and_every_step_stays_within_it() -> None:
    d = Driver.make(num_blocks=32, budget=8)
    for rid, n in (("a", 6), ("b", 6), ("c", 9)):
        d.sched.add(seq(rid, n, max_tokens=3))
    d.run()
    assert all(sum(n for _, n, _ in step) <= 8 for step in d.steps)
    assert d.steps[0] == [("a", 6, True), ("b", 2, False)]
    assert d.steps[1] == [("a", 1, True), ("b", 4, True), ("c", 3, False)]
    # every sequence computes its prompt once plus one token per later sample
    computed = Counter()
    for step in d.steps:
        for rid, n, _ in step:
            computed[rid] += n
    assert computed == {"a": 6 + 2, "b": 6 + 2, "c": 9 + 2}
    assert sorted(d.finished) == ["a", "b", "c"]


def test_samples_is_true_only_on_the_chunk_reaching_the_last_token() -> None:
    s = seq("a", 10)
    s.num_computed = 4
    assert not Scheduled(s, 5).samples
    assert Scheduled(s, 6).samples


# ---- order and batch size ----


def test_running_sequences_are_scheduled_before_waiting_ones() -> None:
    d = Driver.make(num_blocks=16, budget=4)
    d.sched.add(seq("a", 6, max_tokens=3))
    d.step()  # a: 4 of 6 prompt tokens
    d.sched.add(seq("b", 2))
    assert d.step() == [("a", 2, True), ("b", 2, True)]  # a's rest first, b fills up
    d.sched.add(seq("c", 2))
    assert [r for r, _, _ in d.step()] == ["a", "b", "c"]


def test_a_full_budget_of_decodes_keeps_new_sequences_waiting() -> None:
    d = Driver.make(num_blocks=16, budget=2)
    d.sched.add(seq("a", 1, max_tokens=5))
    d.sched.add(seq("b", 1, max_tokens=5))
    d.step()
    d.sched.add(seq("c", 1))
    assert d.step() == [("a", 1, True), ("b", 1, True)]
    assert [s.request_id for s in d.sched.waiting] == ["c"]


def test_max_num_seqs_bounds_the_batch() -> None:
    d = Driver.make(num_blocks=32, max_num_seqs=2)
    for rid in "abc":
        d.sched.add(seq(rid, 3, max_tokens=2))
    assert [r for r, _, _ in d.step()] == ["a", "b"]
    assert len(d.sched.running) == 2 and d.sched.waiting[0].request_id == "c"
    assert [r for r, _, _ in d.step()] == ["a", "b"]  # both finish here
    assert [r for r, _, _ in d.step()] == ["c"]
    d.run()
    assert max(len(step) for step in d.steps) == 2


# ---- preemption ----


def test_newest_running_sequence_is_preempted_and_later_resumes() -> None:
    d = Driver.make(num_blocks=4)
    a, b = seq("a", 7, max_tokens=4), seq("b", 7, max_tokens=3)
    d.sched.add(a)
    d.sched.add(b)
    d.step()  # both prefill 7 tokens into 2 blocks each: the pool is full
    assert d.sched.blocks.num_free() == 0
    d.step()  # decode position 7: still inside the 2nd block
    b_table = list(b.block_table)
    b_tokens = list(b.token_ids)
    d.sched.add(seq("c", 1))  # a newer arrival, behind the preempted one
    assert d.step() == [("a", 1, True)]  # a needs a 3rd block: b is preempted
    assert d.sched.preemptions == 1
    assert d.sched.running == [a]
    assert [s.request_id for s in d.sched.waiting] == ["b", "c"]  # b goes first
    assert b.block_table == [] and b.num_computed == 0 and b.num_registered == 0
    assert b.token_ids == b_tokens  # what b generated is kept, to be recomputed
    # b's tail block went to a, its head stays cached (ref 0) for b's return
    assert a.block_table[2] == b_table[1]
    assert d.sched.blocks.ref[b_table[0]] == 0 and b_table[0] in d.sched.blocks.cached.values()

    d.run()
    assert d.finished == ["a", "b", "c"]
    assert len(b.output_ids) == 3 and b.token_ids[: len(b_tokens)] == b_tokens
    # b resumed by recomputing its prompt + 2 generated tokens (less a cached prefix)
    resumed = next(item for step in d.steps[3:] for item in step if item[0] == "b")
    assert resumed[2] and resumed[1] in (9, 9 - BS)
    assert d.sched.blocks.num_free() == 4


def test_preempted_sequence_resumes_from_its_cached_prefix() -> None:
    d = Driver.make(num_blocks=5)
    a, b = seq("a", 8, max_tokens=6), seq("b", 8, max_tokens=6)
    d.sched.add(a)
    d.sched.add(b)
    d.step()  # 2 full blocks each, both registered; 1 block free
    b_blocks = list(b.block_table)
    d.step()  # a takes the free block for position 8; b, needing one too, is preempted
    assert d.sched.preemptions == 1 and d.sched.running == [a]
    bm = d.sched.blocks
    assert [bm.by_hash.get(h) for h in b.hashes] == b_blocks  # both cached, ref 0
    hits_before = bm.hit_blocks
    d.run()  # a's 4th block evicts b's tail (released first); b resumes on its head
    assert d.finished == ["a", "b"]
    assert bm.hit_blocks == hits_before + 1


def test_the_newest_sequence_preempts_itself_when_it_cannot_grow() -> None:
    d = Driver.make(num_blocks=3)
    a, b = seq("a", 4, max_tokens=8), seq("b", 4, max_tokens=8)
    d.sched.add(a)
    d.sched.add(b)
    d.step()  # 1 block each, 1 free
    d.step()  # a takes the last free block for position 4; b needs one too
    assert d.sched.preemptions == 1
    assert a.block_table and len(a.block_table) == 2
    assert d.sched.waiting[0] is b


# ---- admission ----


def test_admit_holds_nothing_when_it_cannot_fit() -> None:
    d = Driver.make(num_blocks=5)
    shared = list(range(1, 9))  # two full blocks
    d.sched.add(seq("x", shared, max_tokens=1))
    d.step()  # x runs and finishes: its two blocks stay cached
    assert d.finished == ["x"] and len(d.sched.blocks.cached) == 2
    d.sched.add(seq("a", 11, max_tokens=4))
    d.step()  # a holds 3 blocks: 2 left, both cached ones of x
    bm = d.sched.blocks
    free_before, hits_before = bm.num_free(), bm.hit_blocks
    assert free_before == 2

    y = seq("y", shared + list(range(50, 60)), max_tokens=1)  # 18 tokens: 5 blocks
    d.sched.add(y)
    assert [r for r, _, _ in d.step()] == ["a"]  # y does not fit
    assert list(d.sched.waiting) == [y]
    assert y.block_table == [] and y.num_computed == 0 and y.num_registered == 0
    assert bm.hit_blocks == hits_before  # not counted as a hit
    assert bm.num_free() == free_before  # the cached blocks are evictable again
    assert sorted(bm.cached.values()) == sorted(bm.by_hash[h] for h in y.hashes[:2])


def test_admit_stops_at_the_first_sequence_that_does_not_fit() -> None:
    d = Driver.make(num_blocks=4)
    d.sched.add(seq("big", 20))  # a 20-token first chunk needs 5 of the 4 blocks
    d.sched.add(seq("small", 2))
    assert d.sched.schedule() == []  # first-come first-served: small waits behind big
    assert d.sched.blocks.num_free() == 4


@pytest.mark.parametrize(
    ("prompt_len", "computed"),
    [
        (14, 12),  # 3 full cached blocks, 2 tokens left to compute
        (12, 8),  # the whole prompt is cached: the last block is recomputed (>= 1 token)
        (13, 12),  # exactly one token left
        (8, 4),
        (4, 0),  # a one-block prompt can reuse nothing
    ],
)
def test_prefix_reuse_on_admission(prompt_len: int, computed: int) -> None:
    d = Driver.make(num_blocks=16)
    tokens = list(range(100, 120))
    x = seq("x", tokens[:12], max_tokens=1)
    d.sched.add(x)
    d.run()  # x's 3 full blocks stay cached
    x_blocks = [d.sched.blocks.by_hash[h] for h in x.hashes]
    hits = d.sched.blocks.hit_blocks
    y = seq("y", tokens[:prompt_len], max_tokens=1)
    d.sched.add(y)
    plan = d.sched.schedule()
    assert [(i.seq, i.num_tokens) for i in plan] == [(y, prompt_len - computed)]
    assert plan[0].samples
    assert y.num_computed == computed and y.num_registered == computed // BS
    assert y.block_table[: computed // BS] == x_blocks[: computed // BS]
    assert d.sched.blocks.hit_blocks == hits + computed // BS


def test_no_reuse_after_a_different_first_block() -> None:
    d = Driver.make(num_blocks=16)
    d.sched.add(seq("x", list(range(100, 112)), max_tokens=1))
    d.run()
    y = seq("y", [7, 101, 102, 103, *range(104, 112), 1], max_tokens=1)
    d.sched.add(y)
    d.sched.schedule()
    assert y.num_computed == 0 and d.sched.blocks.hit_blocks == 0


def test_score_sequences_do_not_reuse_the_prefix_cache() -> None:
    d = Driver.make(num_blocks=16)
    tokens = list(range(100, 112))
    d.sched.add(seq("x", tokens, max_tokens=1))
    d.run()
    s = seq("s", tokens + [1], score=True)
    d.sched.add(s)
    plan = d.sched.schedule()
    assert plan[0].num_tokens == 13 and s.num_computed == 0


def test_two_running_sequences_share_prefix_blocks() -> None:
    d = Driver.make(num_blocks=8)
    prompt = list(range(1, 10))  # 2 full blocks + 1
    d.sched.add(seq("a", prompt, max_tokens=5))
    d.step()
    d.sched.add(seq("b", prompt, max_tokens=5))
    d.step()
    a, b = d.sched.running
    assert a.block_table[:2] == b.block_table[:2]
    assert all(d.sched.blocks.ref[x] == 2 for x in a.block_table[:2])
    d.run()
    assert d.sched.blocks.num_free() == 8


# ---- abort and the prefix index ----


def test_abort_releases_blocks_from_running_and_waiting() -> None:
    d = Driver.make(num_blocks=4, max_num_seqs=1)
    d.sched.add(seq("a", 6, max_tokens=8))
    d.sched.add(seq("b", 3))
    d.step()
    assert d.sched.blocks.num_free() == 2
    aborted = d.sched.abort("a")
    assert aborted is not None and aborted.request_id == "a"
    assert aborted.block_table == [] and d.sched.running == []
    assert d.sched.blocks.num_free() == 4
    assert d.sched.abort("b") is not None
    assert not d.sched.has_work()
    assert d.sched.abort("nope") is None
    check_invariants(d.sched)


def test_advance_registers_full_blocks_only() -> None:
    d = Driver.make(num_blocks=8, budget=6)
    a = seq("a", 10, max_tokens=4)
    d.sched.add(a)
    bm = d.sched.blocks
    d.step()  # 6 tokens: block 0 full, block 1 half
    assert a.num_registered == 1
    assert bm.hash_of == {a.block_table[0]: a.hashes[0]}
    d.step()  # 10 tokens + 1 sampled: block 1 full, block 2 half
    assert a.num_registered == 2
    assert bm.by_hash[a.hashes[1]] == a.block_table[1]
    assert a.block_table[2] not in bm.hash_of
    d.step()  # the sampled token at position 10
    d.step()  # position 11 fills block 2: its hash covers generated tokens
    assert a.num_registered == 3
    assert bm.by_hash[a.hashes[2]] == a.block_table[2]
    assert bm.lookup(a.block_hashes(BS, 3)) == a.block_table[:3]


# ---- everything at once ----


@pytest.mark.parametrize("seed", range(30))
def test_random_workload_finishes_with_consistent_blocks(seed: int) -> None:
    """Shared prefixes, chunking, preemption and aborts on a small pool: every step stays
    within its limits, every sequence reads only its own tokens' K/V, every request ends
    with max_tokens outputs (or aborted), and all blocks come back."""
    rng = random.Random(seed)
    num_blocks = rng.randint(5, 10)
    d = Driver.make(num_blocks, max_num_seqs=rng.randint(1, 6), budget=rng.randint(1, 16))
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 9))] for _ in range(3)]
    seqs: list[Sequence] = []
    aborted: set[str] = set()
    for step in range(400):
        if len(seqs) < 14 and rng.random() < 0.6:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 6))]
            room = num_blocks * BS - len(prompt)
            s = seq(f"r{len(seqs)}", prompt, max_tokens=rng.randint(1, min(14, room)),
                    score=rng.random() < 0.1)
            seqs.append(s)
            d.sched.add(s)
        live = [s for s in seqs if s.request_id not in set(d.finished) | aborted]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            assert d.sched.abort(victim.request_id) is victim
            aborted.add(victim.request_id)
            check_invariants(d.sched)
        if d.sched.has_work():
            assert d.step(), f"step {step}: work left but nothing scheduled"
        elif len(seqs) == 14:
            break
    d.run()
    assert d.sched.blocks.num_free() == num_blocks
    assert set(d.finished) | aborted == {s.request_id for s in seqs}
    for s in seqs:
        if s.request_id in d.finished and not s.score:
            assert len(s.output_ids) == s.params.max_tokens
