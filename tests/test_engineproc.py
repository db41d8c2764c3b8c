"""The engine in a process of its own (replicas/engineproc.py), on the tiny model (CPU):
the same tokens as the engine in the caller's process, refusals, aborts, a child that
dies, start-up errors, and ranks launched through the caller at tp=2."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from probes import run_probe

from replicas import (
    ConfigError,
    Engine,
    EngineConfig,
    EngineDeadError,
    RequestError,
    SamplingParams,
)
from replicas.engineproc import EngineProcess
from replicas.ranks import RankHandle, spawn_rank

# an engine process and its caller wait on each other: in the fast tier's nice-19 workers
# beside the other tier three of its tests took 83, 76 and 24 s in CI; alone 3, 13 and 7
pytestmark = pytest.mark.serial

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(10, 15)), list(range(100, 131)), [7] * 3]


async def tokens(engine: Any, prompt: list[int], params: SamplingParams = GREEDY
                 ) -> list[int]:
    out: list[int] = []
    async for delta in engine.add_request(prompt, params):
        out += delta.token_ids
    return out


async def all_tokens(engine: Any) -> list[list[int]]:
    return list(await asyncio.gather(*(tokens(engine, p) for p in PROMPTS)))


@pytest.fixture(scope="module")
def child() -> EngineProcess:
    engine = EngineProcess(EngineConfig(model=None, max_num_batched_tokens=64))
    yield engine
    engine.shutdown()


def test_same_tokens_as_the_engine_in_process(child: EngineProcess) -> None:
    assert child.pid != os.getpid()
    with Engine(EngineConfig(model=None, max_num_batched_tokens=64)) as engine:
        want = asyncio.run(all_tokens(engine))
    assert asyncio.run(all_tokens(child)) == want
    stats = child.stats()
    assert stats["engine_process"] == child.pid
    assert stats["ttft_ms"]["n"] >= len(PROMPTS)  # measured here, over the pipe
    assert stats["running"] == 0 and child.healthy()


def test_refusal_before_any_delta_and_serving_on(child: EngineProcess) -> None:
    async def refused() -> None:
        with pytest.raises(RequestError, match="empty"):
            await tokens(child, [])
        with pytest.raises(RequestError, match="max_model_len"):
            await tokens(child, [1, 2], SamplingParams(max_tokens=10**6))
        with pytest.raises(RequestError):
            # (a grammar the library refuses: compiled in the child, raised here)
            await asyncio.to_thread(child.check_structured, _bad_grammar())

    asyncio.run(refused())
    assert asyncio.run(tokens(child, PROMPTS[0])) == asyncio.run(tokens(child, PROMPTS[0]))


def _bad_grammar() -> Any:
    from replicas import StructuredSpec

    return StructuredSpec(kind="ebnf", spec="root ::= undefined_rule")


def test_leaving_early_aborts_in_the_child(child: EngineProcess) -> None:
    async def leave() -> int:
        got = 0
        params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
        async for delta in child.add_request([5, 6, 7], params):
            got += len(delta.token_ids)
            if got >= 3:
                break
        return got

    assert asyncio.run(leave()) >= 3
    deadline = time.monotonic() + 10
    while child.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = child.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_a_killed_child_fails_its_streams_and_reports_unhealthy() -> None:
    engine = EngineProcess(EngineConfig(model=None))
    try:
        async def killed() -> None:
            params = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
            killed = False
            with pytest.raises(EngineDeadError, match="exited"):
                async for _delta in engine.add_request([1, 2, 3], params):
                    if not killed:  # (a late reader's first delta may hold several)
                        os.kill(engine.pid, signal.SIGKILL)
                        killed = True
            with pytest.raises(EngineDeadError):
                await tokens(engine, [1, 2, 3])

        asyncio.run(killed())
        assert not engine.healthy()
    finally:
        engine.shutdown()
    engine.shutdown()  # idempotent
    assert not engine._proc.is_alive()


def test_shutdown_ends_the_child_and_refuses_after() -> None:
    """(And the start's phases count from the caller's `started_at`, in their order.)"""
    started = time.monotonic() - 100.0
    engine = EngineProcess(EngineConfig(model=None), started_at=started)
    phases = engine.start_s
    assert 100.0 <= phases["model_config"] <= phases["forked"] <= phases["ready"]
    assert phases["tokenizer"] <= phases["ready"] <= time.monotonic() - started + 0.001
    pid = engine.pid
    engine.shutdown()
    assert not engine._proc.is_alive() and engine._proc.exitcode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not engine.healthy()
    with pytest.raises(EngineDeadError, match="not serving"):
        asyncio.run(tokens(engine, [1, 2]))


def test_an_engine_that_cannot_start_raises_its_error_here(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        EngineProcess(EngineConfig(model=None, max_model_len=10**7))


def test_ranks_launched_through_the_caller_at_tp2() -> None:
    """With a launcher (a Ray replica's rank actors), the child's rank 1 is started and
    watched through the caller: the launcher runs here, and rank 1 is this process's."""
    launched: list[int] = []

    def launch(config: EngineConfig, model_dir: str, rank: int, init_method: str
               ) -> RankHandle:
        launched.append(rank)
        return spawn_rank(config, model_dir, rank, init_method)

    # (on the CPU wherever it runs: the relay is the point, and two GPUs may not be there)
    config = EngineConfig(model=None, tp=2, comm_dtype="float32", dtype="float32",
                          device="cpu")
    engine = EngineProcess(config, launch=launch)
    try:
        assert launched == [1] and engine.healthy()
        got = asyncio.run(tokens(engine, PROMPTS[0]))
    finally:
        engine.shutdown()
    handle = engine._ranks[1]
    assert not handle.is_alive()  # the child's shutdown stopped the caller's rank
    with Engine(EngineConfig(model=None, tp=1, dtype="float32", device="cpu")) as one:
        assert got == asyncio.run(tokens(one, PROMPTS[0]))


def test_a_child_whose_caller_is_killed_shuts_down_and_exits(tmp_path: Any) -> None:
    """The replica's process killed (SIGKILL: Ray's kill, a crash): its engine process
    sees the pipe close, shuts its engine down and exits, so no process is left holding
    the engine's memory (on a GPU, its share of the device)."""
    import subprocess
    import sys

    script = tmp_path / "caller.py"
    script.write_text(
        "import sys, time\n"
        "from replicas import EngineConfig\n"
        "from replicas.engineproc import EngineProcess\n"
        "if __name__ == '__main__':\n"
        "    engine = EngineProcess(EngineConfig(model=None))\n"
        "    print(engine.pid, flush=True)\n"
        "    time.sleep(600)\n")
    root = str(Path(__file__).resolve().parent.parent)
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    try:
        line = caller.stdout.readline() if caller.stdout else ""
        child = int(line)
        os.kill(child, 0)  # running
        caller.kill()
        caller.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            if _zombie(child):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the engine process {child} outlived its caller by 30 s")
    finally:
        caller.kill()


def _zombie(pid: int) -> bool:
    """Exited but not yet reaped (its parent, the killed caller, is gone: init reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_callers_process_imports_no_torch() -> None:
    """The caller (an engine replica's Serve process) reads config.json and the tokenizer
    without torch: only the engine's own process imports it (~5 s of CPU, and ~400 MB, a
    replica otherwise, before its engine process could start). It still serves, and has
    the engine's model spec once the child is ready."""

    from replicas.tiny import tiny_model_dir

    model = tiny_model_dir()  # (made here if it is not yet: that takes torch)
    probe = (
        "import asyncio, sys\n"
        "from replicas import EngineConfig, SamplingParams\n"
        "from replicas.engineproc import EngineProcess\n"
        f"engine = EngineProcess(EngineConfig(model={model!r}, max_num_batched_tokens=64))\n"
        "async def go():\n"
        "    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)\n"
        "    return [t async for d in engine.add_request([5, 6, 7], params)\n"
        "            for t in d.token_ids]\n"
        "print('TOKENS', len(asyncio.run(go())), engine.spec.family, "
        "engine.start_s['model_config'] < 1.0)\n"
        "engine.shutdown()\n")
    out, loaded = run_probe(probe, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("TOKENS")]
    assert lines == ["TOKENS 4 llama True"], out.stdout[-2000:] + out.stderr[-2000:]
    assert not loaded & {"torch", "triton"}, loaded
