"""The shared-memory all-reduce of CPU ranks (replicas/shm.py): the same sums as gloo bit
for bit, a dead peer fails the wait instead of hanging it, set-up falls back to gloo on
every rank together, and no file is left behind. Two spawned ranks on a gloo group, as in
test_parallel.py; an engine at tp=2 with and without it gives the same logits."""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from spawned import run_spawned

from replicas import Engine, EngineConfig, SamplingParams
from replicas import shm as shm_module
from replicas.parallel import Comm
from replicas.shm import PeerDiedError, ShmAllReduce, ShmChannel

pytestmark = pytest.mark.skipif(not shm_module.supported(), reason="needs Linux x86 /dev/shm")

WORLD = 2
RANK_TIMEOUT_S = 90


def _join(rank: int, port: int) -> dist.Store:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0,
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    return store


def _sums(rank: int, store: dist.Store) -> dict[str, Any]:
    """Random payloads of several dtypes and shapes, reduced both ways, many times over
    (each slot parity reused)."""
    shm = ShmAllReduce.connect(store, rank, WORLD, 64 * 48 * 4, None, 30.0)
    assert shm is not None
    path = store.get("shm/path").decode()
    g = torch.Generator().manual_seed(100 + rank)
    same, calls = True, 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((1, 48), (64, 48), (7,), (3, 5, 16)):
            for _ in range(3):
                x = (torch.randn(shape, generator=g) * 300).to(dtype)
                ref = x.clone()
                dist.all_reduce(ref)
                same &= torch.equal(shm.all_reduce(x), ref)
                calls += 1
    comm = Comm(rank, WORLD, torch.float16, shm=shm)
    comm.all_reduce(torch.full((4,), 40000.0))  # each fits float16; the sum does not
    overflow = bool(comm.overflow)
    big = torch.zeros(64 * 48 * 2 + 32)  # over the capacity (bytes) in float16: gloo
    fallback = torch.equal(comm.all_reduce(big + rank), torch.full_like(big, 1.0))
    return {"same": same, "calls": calls, "overflow": overflow, "fallback": fallback,
            "file_left": os.path.exists(path), "fits_big": shm.fits(big.half())}


def _peer_dies(rank: int, store: dist.Store) -> dict[str, Any]:
    shm = ShmAllReduce.connect(store, rank, WORLD, 1024, None, 60.0)
    assert shm is not None
    shm.all_reduce(torch.ones(8))  # both alive: fine
    if rank == 1:
        os._exit(0)  # gone without a word, mid-conversation
    start = time.monotonic()
    try:
        shm.all_reduce(torch.ones(8))
        error = ""
    except PeerDiedError as e:
        error = str(e)
    return {"error": error, "waited_s": time.monotonic() - start}


def _no_shm_on_rank0(rank: int, store: dist.Store) -> dict[str, Any]:
    if rank == 0:
        shm_module.supported = lambda: False  # e.g. no /dev/shm where rank 0 runs
    shm = ShmAllReduce.connect(store, rank, WORLD, 1024, None, 30.0)
    return {"none": shm is None}


def _messages(rank: int, store: dist.Store) -> dict[str, Any]:
    """Rank 0 sends 200 step messages of random lengths (up to the capacity, and empty
    ones) back to back; rank 1 gets each one, in order, unchanged. Rank 1 reads slowly
    at times, so rank 0 must wait before reusing a slot."""
    channel = ShmChannel.connect(store, rank, WORLD, 8 * 500, None)
    assert channel is not None
    g = torch.Generator().manual_seed(7)
    messages = [torch.randint(-2**40, 2**40, (int(n),), generator=g)
                for n in torch.randint(0, 501, (200,), generator=g)]
    messages[3] = torch.empty(0, dtype=torch.int64)
    messages[4] = torch.arange(500)
    if rank == 0:
        for m in messages:
            channel.send(m)
        words = channel.capacity // 8
        return {"fits_over": channel.fits(torch.zeros(words + 1, dtype=torch.int64)),
                "fits_all": channel.fits(torch.zeros(words, dtype=torch.int64))}
    same = True
    for i, m in enumerate(messages):
        if i % 50 == 0:
            time.sleep(0.2)
        same &= torch.equal(channel.receive(), m)
    return {"same": same}


def _sender_dies(rank: int, store: dist.Store) -> dict[str, Any]:
    channel = ShmChannel.connect(store, rank, WORLD, 64, None)
    assert channel is not None
    if rank == 0:
        channel.send(torch.arange(3))
        os._exit(0)
    first = channel.receive().tolist()
    start = time.monotonic()
    try:
        channel.receive()
        error = ""
    except PeerDiedError as e:
        error = str(e)
    return {"first": first, "error": error, "waited_s": time.monotonic() - start}


IDLE_PAUSE_S = 4.0


def _idle_receive(rank: int, store: dist.Store) -> dict[str, Any]:
    """Rank 0 sends two messages back to back, then a third after IDLE_PAUSE_S, each
    carrying the time it was sent. Rank 1 sleeps through the pause: past IDLE_S it naps
    no more, and the third message wakes it although its futex waits would otherwise
    last 30 s (CHECK_PERIOD_S). Rank 0 counts its wake calls at each send."""
    calls: dict[str, int] = {"futex_wait": 0, "futex_wake": 0}
    naps: list[float] = []

    class Clock:  # replicas/shm.py's `time`, noting when it naps
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(s: float) -> None:
            naps.append(time.monotonic())
            time.sleep(s)

    def counted(name: str) -> Any:
        call = getattr(shm_module, name)

        def count(*args: Any) -> None:
            calls[name] += 1
            call(*args)
        return count

    shm_module.time = Clock  # type: ignore[assignment]
    shm_module.futex_wait = counted("futex_wait")  # type: ignore[assignment]
    shm_module.futex_wake = counted("futex_wake")  # type: ignore[assignment]
    shm_module.CHECK_PERIOD_S = 30.0
    channel = ShmChannel.connect(store, rank, WORLD, 64, None)
    assert channel is not None
    if rank == 0:
        wakes = []
        for pause in (0.0, 0.0, IDLE_PAUSE_S):
            time.sleep(pause)
            channel.send(torch.tensor([time.monotonic_ns()]))
            wakes.append(calls["futex_wake"])
        return {"wakes_after_each_send": wakes}
    late = []
    for _ in range(3):
        sent = int(channel.receive()[0])
        late.append((time.monotonic_ns() - sent) / 1e9)
        if len(late) == 2:
            idle_from, calls["futex_wait"] = time.monotonic() + ShmChannel.IDLE_S, 0
    # (a second of slack: at nice 19 on a busy machine a process can wait that long
    # between reading the clock and napping)
    return {**calls, "late_s": late, "naps_after_idle_s": [
        round(t - idle_from, 3) for t in naps if t > idle_from + 1.0]}


CHECKS = {"sums": _sums, "idle_receive": _idle_receive, "peer_dies": _peer_dies,
          "no_shm_on_rank0": _no_shm_on_rank0, "messages": _messages,
          "sender_dies": _sender_dies}


def _rank_main(rank: int, port: int, check: str, out: Any) -> None:
    try:
        store = _join(rank, port)
        with torch.inference_mode():
            out.put((rank, CHECKS[check](rank, store), None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((rank, None, traceback.format_exc()))


def run_ranks(check: str, expect: int = WORLD) -> dict[int, dict[str, Any]]:
    """Run `check` on 2 spawned ranks; the results of the `expect` ranks that report."""
    got, _ = run_spawned(_rank_main, (check,), WORLD, expect, RANK_TIMEOUT_S, join_s=10)
    return got


def test_same_sums_as_gloo_bit_for_bit_and_no_file_left() -> None:
    for rank, r in run_ranks("sums").items():
        assert r["same"], f"rank {rank}: a shared-memory sum differs from gloo's"
        assert r["calls"] == 36
        assert r["overflow"], "the float16 overflow flag must still be raised"
        assert r["fallback"] and not r["fits_big"], "a payload over capacity goes by gloo"
        assert not r["file_left"], "the file is removed once every rank mapped it"


def test_a_dead_peer_fails_the_wait_instead_of_hanging_it() -> None:
    r = run_ranks("peer_dies", expect=1)[0]
    assert "rank 1" in r["error"] and "died" in r["error"]
    assert r["waited_s"] < 5.0


def test_step_messages_arrive_in_order_unchanged() -> None:
    got = run_ranks("messages")
    assert got[1]["same"]
    assert got[0]["fits_all"] and not got[0]["fits_over"]


def test_a_dead_sender_fails_the_receiver_instead_of_hanging_it() -> None:
    r = run_ranks("sender_dies", expect=1)[1]
    assert r["first"] == [0, 1, 2]
    assert "rank 0" in r["error"] and "died" in r["error"]
    assert r["waited_s"] < 5.0


def test_an_idle_receiver_sleeps_until_the_sender_wakes_it() -> None:
    got = run_ranks("idle_receive")
    sender, receiver = got[0], got[1]
    wakes = sender["wakes_after_each_send"]
    assert wakes[2] == wakes[1] + 1, sender  # the send after the pause wakes
    # woken at once, not at the futex wait's 30 s timeout
    assert max(receiver["late_s"]) < 2.0, receiver
    # past IDLE_S no naps, one futex wait through the pause (a few more where a wait ends
    # early, e.g. at a signal)
    assert receiver["naps_after_idle_s"] == [], receiver
    assert 1 <= receiver["futex_wait"] <= 5, receiver


def test_a_send_wakes_the_receivers_only_after_a_pause(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The wake system call is made at a send only when IDLE_S / 2 has passed since the
    send before (a receiver sleeps only after waiting IDLE_S): none within a burst.
    Rank 0's side alone, on a clock of the test's."""
    now = [0.0]
    wakes: list[int] = []

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(shm_module, "time", Clock)
    monkeypatch.setattr(shm_module, "futex_wake", lambda address: wakes.append(address))
    mapping = torch.zeros(ShmChannel.size(WORLD, 64), dtype=torch.uint8)
    channel = ShmChannel(0, WORLD, 64, mapping, [os.getpid()] * WORLD)
    channel._acks[1] = 10**9  # (rank 1 has read everything: no send waits)
    made = []
    for t in (0.0, 0.01, 0.4, 0.95, 1.0, 5.0):
        now[0] = t
        before = len(wakes)
        channel.send(torch.arange(3))
        made.append(len(wakes) - before)
    assert made == [1, 0, 0, 1, 0, 1]  # the first; 0.55 s after 0.4; 4 s after 1.0
    assert set(wakes) == {channel._word}


def test_set_up_falls_back_to_gloo_on_every_rank_together() -> None:
    assert all(r["none"] for r in run_ranks("no_shm_on_rank0").values())


def test_engine_tp2_gives_the_same_logits_and_tokens_with_and_without_it() -> None:
    prompt = list(range(3, 90))
    runs = {}
    for on in (True, False):
        with Engine(EngineConfig(model=None, tp=2, shm_all_reduce=on)) as eng:
            assert (eng.worker.comm.shm is not None) == on
            tokens = eng.generate([prompt, prompt[:20]], SamplingParams(
                max_tokens=6, temperature=0.0, ignore_eos=True))
            runs[on] = ([c.token_ids for c in tokens], eng.score(prompt))
    assert runs[True][0] == runs[False][0]
    assert torch.equal(runs[True][1], runs[False][1])
