"""Tensor parallelism on two CUDA GPUs (run on the device machine: `pytest -m multigpu
tests/test_multigpu.py`), and on four where the machine has them (issue 21).

- float32: greedy tokens at tp=2 (and tp=4) equal tp=1's (the all-reduces in float32,
  through the one-shot kernel at decode and NCCL for longer prompts).
- bfloat16: tp=2 (and tp=4) logits (bfloat16 payloads, the default) are as close to the
  float32 reference as tp=1's bfloat16 logits are, within the GPU tests' tolerance. The
  test checkpoints' 4 query heads and 2 KV heads give tp=4 one query head a rank and each
  KV head to two ranks, as GLM-4-9B's 2 KV heads at tp=4.
- shutdown at tp=2 within 5 s, five cycles in one process, no rank left behind.
- a rank killed mid-stream fails every request with EngineDeadError within seconds.
- a head dim under 16 runs (tl.dot needs K >= 16: the kernels pad it).
- the one-shot all-reduce kernel sums like NCCL for each wire dtype, in and out of a CUDA
  graph, and its float16 overflow flag is set by a sum past 65504 and only then.
- the all-reduce folded into the GEMVs beside it gives the one-shot kernel's bits.
- a float16 wire that overflows is read with the tokens and re-run: float32's tokens.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch
from checkpoints import BF16_FACTOR, BF16_SLACK, CheckpointFactory, prompts

from replicas import Engine, EngineConfig, SamplingParams

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
# tp sizes the correctness tests run at: 4 only where the machine has four GPUs
TP_SIZES = [2, pytest.param(4, marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 4,
    reason="needs four CUDA GPUs"))]


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("family", ["llama", "glm", "qwen2"])
def test_tp_float32_tokens_equal_tp1(family: str, tp: int, checkpoint: CheckpointFactory
                                     ) -> None:
    ckpt = checkpoint(family)
    got = {}
    for size in (1, tp):
        config = EngineConfig(model=ckpt, tp=size, device="cuda", dtype="float32",
                              comm_dtype="float32", max_model_len=256)
        with Engine(config) as engine:
            got[size] = [o.token_ids for o in engine.generate(prompts(1000), GREEDY)]
    assert got[tp] == got[1]


@pytest.mark.parametrize("tp", TP_SIZES)
def test_tp_piece_graphs_equal_eager(tp: int, checkpoint: CheckpointFactory) -> None:
    """Pieces hold the layers' all-reduces (NCCL, or the one-shot kernel, captured): every
    rank replays the same pieces in the same order (float32 on the wire)."""
    from test_pieces import assert_same

    config = EngineConfig(model=checkpoint("glm"), tp=tp, device="cuda", dtype="float32",
                          comm_dtype="float32", max_model_len=256, max_num_batched_tokens=48,
                          piece_graph_tokens=32)
    assert assert_same(config, captured=True) >= 8


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("family", ["llama", "glm"])
def test_tp_bfloat16_logits_within_tolerance(family: str, tp: int,
                                             checkpoint: CheckpointFactory) -> None:
    ckpt = checkpoint(family)
    ids = prompts(1000)[2]
    logits = {}
    for size, dtype in ((1, "float32"), (1, "bfloat16"), (tp, "bfloat16")):
        config = EngineConfig(model=ckpt, tp=size, device="cuda", dtype=dtype,
                              comm_dtype="float32" if dtype == "float32" else "auto",
                              max_model_len=256)
        with Engine(config) as engine:
            logits[size, dtype] = engine.score(ids).float().cpu()
    ref = logits[1, "float32"]
    ours = (logits[tp, "bfloat16"] - ref).abs().max().item()
    own = (logits[1, "bfloat16"] - ref).abs().max().item()
    print(f"{family}: bf16 max|diff| vs fp32: tp={tp} {ours:.4f}, tp=1 {own:.4f}")
    assert ours <= BF16_FACTOR * own + BF16_SLACK


def test_tp2_fp8_lm_head_decodes_the_16bit_heads_tokens(checkpoint: CheckpointFactory
                                                        ) -> None:
    """FP8 weights at tp=2 on GPUs, from CUDA graphs, one sequence at a time and three at
    once: with the FP8 LM head (each rank rescores its shard's top 16 of each row in its
    own kernels, PERF.md v0.94, v0.96) the greedy tokens are the 16-bit head's."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = {}
    for head in (0, 16):
        config = EngineConfig(model=checkpoint("glm"), tp=2, device="cuda", dtype="bfloat16",
                              max_model_len=256, quantization="fp8", fp8_lm_head=head)
        with Engine(config) as engine:
            assert engine.worker.model.lm_head.candidates == head
            alone = [engine.generate([p], params)[0].token_ids for p in prompts(1000)[:3]]
            together = [out.token_ids for out in engine.generate(prompts(1000)[:3], params)]
            got[head] = alone + together
    assert got[16] == got[0]


def _folded_run(ckpt: str, fold: bool, graphs: bool, epilogue: str = "fp8"
                ) -> tuple[list[list[int]], list[list[float] | None], int]:
    """One engine of the fold test, in a process of its own (`in_fresh_process`: a second
    engine in a process that used symmetric memory falls back to NCCL, replicas/symm.py):
    its tokens and log-probabilities, and how many all-reduces it folded. The GEMV is
    forced on rank 0 (a tiny model's timing would pick cuBLAS); the other rank takes rank
    0's picks. `epilogue`: $TPSERVE_SWIGLU_EPILOGUE (MLP.gemv_kinds)."""
    import os

    from replicas import kernels

    os.environ["TPSERVE_SWIGLU_EPILOGUE"] = epilogue
    pick = kernels.pick_gemv
    kernels.pick_gemv = lambda w, b, kind="plain": (  # type: ignore[assignment]
        pick(w, b, kind)[0] or kernels.GEMV_CONFIGS[0], {"forced": 1.0})
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    config = EngineConfig(model=ckpt, tp=2, device="cuda", dtype="bfloat16",
                          max_model_len=256, max_num_seqs=4, fold_all_reduce=fold,
                          cuda_graphs=graphs)
    with Engine(config) as engine:
        outs = engine.generate(prompts(1000)[:3], params)  # batch 3: not folded
        outs += engine.generate(prompts(1000)[3:4], params)  # batch 1: folded
        return ([o.token_ids for o in outs], [o.logprobs for o in outs],
                engine.worker.comm.folded)


def test_folded_all_reduce_gives_the_one_shot_kernels_bits(checkpoint: CheckpointFactory
                                                           ) -> None:
    """Batch-1 decode at tp=2 in bfloat16 with each all-reduce folded into the GEMVs
    beside it (pushed by the row-parallel GEMV, summed by the next norm GEMV) gives the
    same tokens and the same log-probabilities, to the bit, as with the one-shot kernel:
    both sum in float32 in rank order. Each engine runs in a fresh process (on 2xH200 an
    earlier engine of the pytest process made this one fall back to NCCL: nothing
    folded). Also with SwiGLU on gate_up's GEMV (TPSERVE_SWIGLU_EPILOGUE=1, PERF.md v0.77;
    the default for FP8 weights): the norm GEMV that sums the pushed rows applies it."""
    from replicas.multigpu import in_fresh_process

    ckpt = checkpoint("qwen2")  # no o_proj / down_proj bias (a bias is not folded)
    got = {}
    for fold, graphs, epilogue in ((True, True, "fp8"), (False, True, "fp8"),
                                   (True, False, "fp8"), (True, True, "1"), (False, True, "1")):
        tokens, logprobs, folded = in_fresh_process(_folded_run, ckpt, fold, graphs, epilogue)
        assert (folded > 0) == fold, (fold, graphs, folded)
        got[fold, graphs, epilogue] = (tokens, logprobs)
    assert got[True, True, "fp8"] == got[False, True, "fp8"] == got[True, False, "fp8"]
    assert got[True, True, "1"] == got[False, True, "1"]


def test_tp2_float16_overflow_is_read_with_the_tokens_and_rerun(overflowing_model: str
                                                                ) -> None:
    """A float16 wire that overflows on every step (o_proj scaled past 65504), in bf16 on
    GPUs with graphs and asynchronous scheduling: the flag is read with each step's
    tokens, the step (and the one launched on its tokens) run again in float32, and the
    tokens equal the float32 wire's."""
    got = {}
    for comm in ("float32", "float16"):
        config = EngineConfig(model=overflowing_model, tp=2, device="cuda", dtype="bfloat16",
                              comm_dtype=comm, max_model_len=256, max_num_seqs=4)
        with Engine(config) as engine:
            outs = engine.generate(prompts(1000)[:3], GREEDY)
            outs += engine.generate(prompts(1000)[3:4], GREEDY)  # batch 1: graphed
            got[comm] = ([o.token_ids for o in outs],
                         engine.stats()["comm_overflow_retries"])
    assert got["float32"][1] == 0
    assert got["float16"][1] >= 16
    assert got["float16"][0] == got["float32"][0]


def test_one_shot_kernel_sums_like_nccl_and_flags_float16_overflow() -> None:
    from replicas.multigpu import graph_all_reduce

    rows = list(graph_all_reduce(2))
    print(rows)
    assert all(row["one_shot_sum_ok"] for row in rows)  # after 50-call graphs of each size
    first = rows[0]
    assert first["fp16_flag_clear_ok"] and first["fp16_flag_set_ok"]
    errors = {k: v for k, v in first.items() if k.startswith("max_err_")}
    assert len(errors) == 9
    for key, err in errors.items():
        # bf16 and fp32 wires give the exact sum rounded to bf16; fp16 rounds twice (one
        # bf16 step at |sum| < 16 is 1/16)
        bound = {"float32": 0.0, "float16": 1 / 16, "bfloat16": 0.0}[key.split("_")[-1]]
        assert err <= bound, (key, err)


@pytest.mark.parametrize("pieces", [0, 64])
def test_tp2_five_cycles_shut_down_within_5_s(pieces: int, checkpoint: CheckpointFactory
                                              ) -> None:
    """Also with steps admitting prompts in CUDA-graph pieces: those graphs hold NCCL's
    kernels too, and `close` drops them before the group goes."""
    ckpt = checkpoint("llama")
    tokens = []
    for _ in range(5):
        engine = Engine(EngineConfig(model=ckpt, tp=2, device="cuda", max_model_len=256,
                                     max_num_seqs=4, piece_graph_tokens=pieces))
        procs = list(engine._ranks.handles)
        tokens.append(engine.generate([[5, 6, 7, 8]], GREEDY)[0].token_ids)
        start = time.monotonic()
        engine.shutdown()
        assert time.monotonic() - start <= 5
        assert not any(p.is_alive() for p in procs)
    assert all(t == tokens[0] for t in tokens)
    assert torch.cuda.memory_allocated() < 64 * 2**20  # the model and KV pool are gone


def test_tp2_rank_killed_mid_stream_fails_requests_within_seconds(
        checkpoint: CheckpointFactory) -> None:
    """In a child process: rank 0 may be left waiting in a GPU collective with the dead
    rank, which nothing can end but the process's own end."""
    code = textwrap.dedent(f"""
        import asyncio, threading, time
        from replicas import Engine, EngineConfig, EngineDeadError, SamplingParams
        if __name__ == "__main__":
            eng = Engine(EngineConfig(model={checkpoint("llama")!r}, tp=2, device="cuda",
                                      max_model_len=2048, max_num_seqs=4))
            long = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
            errors, started = [], threading.Event()
            async def stream(p):
                try:
                    async for _ in eng.add_request(p, long):
                        started.set()
                except BaseException as e:
                    errors.append(e)
            async def run():
                await asyncio.gather(*(stream([5 + i, 6, 7]) for i in range(3)))
            t = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
            t.start()
            started.wait(120)
            time.sleep(0.5)
            killed = time.monotonic()
            eng._ranks.handles[0].kill()
            t.join(30)
            print("FAILED_AFTER", round(time.monotonic() - killed, 2), flush=True)
            print("ERRORS", [type(e).__name__ for e in errors], flush=True)
            start = time.monotonic()
            eng.shutdown()
            print("SHUTDOWN", round(time.monotonic() - start, 2), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    print(out)
    assert float(lines["FAILED_AFTER"]) < 5
    assert lines["ERRORS"] == str(["EngineDeadError"] * 3)
    assert float(lines["SHUTDOWN"]) < 10


@pytest.mark.parametrize("tp", [1, 2])
def test_head_dim_8_runs_through_the_kernels(tp: int, checkpoint: CheckpointFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = checkpoint("llama", head_dim=8)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TPSERVE_KERNELS", flag)
        config = EngineConfig(model=ckpt, tp=tp, device="cuda", dtype="float32",
                              comm_dtype="float32", max_model_len=256)
        with Engine(config) as engine:
            runs[flag] = [o.token_ids for o in engine.generate(prompts(1000), GREEDY)]
    assert runs["1"] == runs["0"]
