"""TP layers against unsharded references, the vLLM way: spawn 2 ranks on a gloo group,
load every layer from the same full random tensors through its own `load`, run it on the
same input in each rank, and compare the pieces with plain torch in the parent.

The ranks run every check once (a module fixture), send their outputs back as numpy
arrays through a queue, and are always joined or killed within a bounded time.
"""

from __future__ import annotations

import importlib
import json
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawned import run_spawned

from replicas.fp8 import quantize_head, quantize_rows
from replicas.parallel import (
    ColumnParallelLinear,
    Comm,
    Index,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_range,
)

WORLD = 2
TOKENS, HIDDEN = 5, 16
HEADS, HEAD_DIM = 4, 3
VOCAB, DIM = 11, 6  # a vocabulary that 2 ranks do not split evenly
RANK_TIMEOUT_S = 90  # the whole spawn-run-collect, generous for a loaded CI machine

Results = dict[str, np.ndarray | float | bool]


def full_tensors() -> dict[str, torch.Tensor]:
    """The unsharded checkpoint and inputs; every process rebuilds the same ones."""
    g = torch.Generator().manual_seed(1234)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "x": r(TOKENS, HIDDEN),
        # attention with 2 KV heads: q | k | v pieces of unequal size (12, 6, 6 rows)
        "q.weight": r(HEADS * HEAD_DIM, HIDDEN), "q.bias": r(HEADS * HEAD_DIM),
        "k.weight": r(2 * HEAD_DIM, HIDDEN), "k.bias": r(2 * HEAD_DIM),
        "v.weight": r(2 * HEAD_DIM, HIDDEN), "v.bias": r(2 * HEAD_DIM),
        # one KV head for 2 ranks: replicated
        "k1.weight": r(HEAD_DIM, HIDDEN), "v1.weight": r(HEAD_DIM, HIDDEN),
        # gate | up stored fused in one tensor (GLM)
        "gate_up.weight": r(2 * 10, HIDDEN),
        "row_in": r(TOKENS, 12), "o.weight": r(HIDDEN, 12), "o.bias": r(HIDDEN) + 10.0,
        "embed.weight": r(VOCAB, DIM), "ids": torch.tensor([0, 5, 6, 10, 3, 7, 10, 0]),
        "h": r(TOKENS, DIM), "head.weight": r(VOCAB, DIM),
    }


class Reader:
    """A checkpoint tensor as the loader hands it to a layer: `get(index)` reads only the
    indexed part, and we count how many elements the layer read."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.read = t, 0

    def __call__(self, index: Index) -> torch.Tensor:
        part = self.t[index]
        self.read += part.numel()
        return part


def getter(t: torch.Tensor) -> Reader:
    return Reader(t)


# ---- what each rank runs ----


def _column_qkv(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    layer = ColumnParallelLinear(HIDDEN, [HEADS * HEAD_DIM, 2 * HEAD_DIM, 2 * HEAD_DIM], True,
                                 comm)
    read = 0
    for part, name in enumerate("qkv"):
        for kind in ("weight", "bias"):
            get = getter(w[f"{name}.{kind}"])
            layer.load(f"{name}_proj.{kind}", get, part)
            read += get.read
    return {"out": layer(w["x"]).numpy(), "read": read}


def _column_replicated_kv(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    # as Attention does when num_kv_heads < tp: every rank keeps KV head 0
    kv_rows = (0, HEAD_DIM)
    layer = ColumnParallelLinear(
        HIDDEN, [HEADS * HEAD_DIM, HEAD_DIM, HEAD_DIM], False, comm,
        part_shards=[shard_range(HEADS * HEAD_DIM, comm.rank, WORLD), kv_rows, kv_rows])
    layer.load("q_proj.weight", getter(w["q.weight"]), 0)
    layer.load("k_proj.weight", getter(w["k1.weight"]), 1)
    layer.load("v_proj.weight", getter(w["v1.weight"]), 2)
    return {"out": layer(w["x"]).numpy()}


def _column_fused(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    layer = ColumnParallelLinear(HIDDEN, [10, 10], False, comm)
    layer.load("gate_up_proj.weight", getter(w["gate_up.weight"]), None)
    return {"out": layer(w["x"]).numpy()}


def _row(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    layer = RowParallelLinear(12, HIDDEN, True, comm)
    weight = getter(w["o.weight"])
    layer.load("o_proj.weight", weight, None)
    layer.load("o_proj.bias", getter(w["o.bias"]), None)
    start, end = shard_range(12, comm.rank, WORLD)
    return {"out": layer(w["row_in"][:, start:end]).numpy(), "overflow": bool(comm.overflow),
            "read": weight.read}


def _row_chunked(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    """5 tokens in chunks of 2: three asynchronous all-reduces, overlapping the matmuls."""
    comm.overlap_chunk = 2
    res = _row(comm, w)
    comm.reset_overflow()
    # only the last chunk's rows overflow float16 (70000 > 65504): the flag must see it
    big = torch.zeros(TOKENS, 6)
    big[-1, 0] = 70000.0
    comm.matmul_all_reduce(big, torch.eye(4, 6))
    res["last_chunk_overflow"] = bool(comm.overflow)
    return res


def _embedding(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    layer = VocabParallelEmbedding(VOCAB, DIM, comm)
    get = getter(w["embed.weight"])
    layer.load("embed_tokens.weight", get, None)
    return {"out": layer(w["ids"]).numpy(), "read": get.read}


def _lm_head(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    layer = ParallelLMHead(VOCAB, DIM, comm)
    layer.load("lm_head.weight", getter(w["head.weight"]), None)
    out = layer(w["h"])
    return {"out": out.numpy(), "float32": out.dtype == torch.float32}


def _lm_head_fp8(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    """An FP8 head (EngineConfig.fp8_lm_head = 2): one row; all the rows at once; and all
    at once with parallel.FP8_HEAD_ROWS below their count."""
    from replicas import parallel

    layer = ParallelLMHead(VOCAB, DIM, comm)
    layer.load("lm_head.weight", getter(w["head.weight"]), None)
    quantize_head(layer, 2)
    res = {"row": layer(w["h"][:1]).numpy(), "rows": layer(w["h"]).numpy()}
    before, parallel.FP8_HEAD_ROWS = parallel.FP8_HEAD_ROWS, 1
    try:
        res["over"] = layer(w["h"]).numpy()
    finally:
        parallel.FP8_HEAD_ROWS = before
    return res


def _all_reduce_float16(comm: Comm, w: dict[str, torch.Tensor]) -> Results:
    res: Results = {}
    res["fresh"] = bool(comm.overflow)
    comm.all_reduce(torch.full((4,), 40000.0))  # each fits float16; the sum 80000 does not
    res["sum_overflow"] = bool(comm.overflow)
    comm.reset_overflow()
    res["after_reset"] = bool(comm.overflow)
    # one rank's payload alone exceeds 65504
    big = torch.tensor([70000.0 if comm.rank == 0 else 0.0, 1.0])
    comm.all_reduce(big)
    res["big_overflow"] = bool(comm.overflow)
    comm.reset_overflow()
    normal = comm.all_reduce(torch.tensor([1.5, -2.0, 30000.0]))
    res["normal"], res["normal_overflow"] = normal.numpy(), bool(comm.overflow)
    res["normal_dtype"] = normal.dtype == torch.float32
    comm.force_float32 = True  # the re-run of an overflowed step
    exact = comm.all_reduce(torch.full((4,), 40000.0))
    comm.force_float32 = False
    res["forced"], res["forced_overflow"] = exact.numpy(), bool(comm.overflow)
    return res


CHECKS: dict[str, tuple[Callable[[Comm, dict[str, torch.Tensor]], Results], torch.dtype]] = {
    "column_qkv": (_column_qkv, torch.float32),
    "column_replicated_kv": (_column_replicated_kv, torch.float32),
    "column_fused": (_column_fused, torch.float32),
    "row": (_row, torch.float32),
    "row_float16_comm": (_row, torch.float16),
    "row_chunked": (_row_chunked, torch.float32),
    "row_chunked_float16": (_row_chunked, torch.float16),
    "embedding": (_embedding, torch.float16),  # exact=True: comm dtype must not matter
    "lm_head": (_lm_head, torch.float16),
    "lm_head_fp8": (_lm_head_fp8, torch.float16),
    "all_reduce_float16": (_all_reduce_float16, torch.float16),
}


def _rank_main(rank: int, port: int, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=timedelta(seconds=60))
        w = full_tensors()
        results = {}
        with torch.inference_mode():
            for name, (check, dtype) in CHECKS.items():
                results[name] = check(Comm(rank, WORLD, dtype), w)
        out.put((rank, results, None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Results]]:
    """Per rank, per check, what the rank computed."""
    got, codes = run_spawned(_rank_main, (), WORLD, WORLD, RANK_TIMEOUT_S, join_s=30)
    assert codes == [0] * WORLD
    return [got[r] for r in range(WORLD)]


@pytest.fixture(scope="module")
def w() -> dict[str, torch.Tensor]:
    return full_tensors()


def close(a: np.ndarray | torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.as_tensor(a), b, rtol=tol, atol=tol)


def linear(x: torch.Tensor, name: str, w: dict[str, torch.Tensor]) -> torch.Tensor:
    bias = w.get(f"{name}.bias")
    return torch.nn.functional.linear(x, w[f"{name}.weight"], bias)


# ---- the comparisons ----


def test_column_parallel_fused_qkv(ranks: list[dict[str, Results]], w: dict) -> None:
    q, k, v = (linear(w["x"], n, w) for n in "qkv")
    local = [torch.as_tensor(r["column_qkv"]["out"]) for r in ranks]
    # each rank holds [q_r | k_r | v_r]; a piece is the concatenation of its rank shards
    pieces = [t.split([6, 3, 3], dim=-1) for t in local]
    for i, ref in enumerate((q, k, v)):
        close(torch.cat([p[i] for p in pieces], dim=-1), ref)
    full = sum(w[f"{n}.{k}"].numel() for n in "qkv" for k in ("weight", "bias"))
    assert [r["column_qkv"]["read"] for r in ranks] == [full // WORLD] * WORLD


def test_column_parallel_replicated_kv_rows(ranks: list[dict[str, Results]], w: dict) -> None:
    q = torch.nn.functional.linear(w["x"], w["q.weight"])
    k = torch.nn.functional.linear(w["x"], w["k1.weight"])
    v = torch.nn.functional.linear(w["x"], w["v1.weight"])
    pieces = [torch.as_tensor(r["column_replicated_kv"]["out"]).split([6, 3, 3], dim=-1)
              for r in ranks]
    close(torch.cat([p[0] for p in pieces], dim=-1), q)
    for p in pieces:  # every rank has the whole (only) KV head
        close(p[1], k)
        close(p[2], v)


def test_column_parallel_loads_a_fused_checkpoint_tensor(ranks: list[dict[str, Results]],
                                                         w: dict) -> None:
    ref_gate, ref_up = torch.nn.functional.linear(w["x"], w["gate_up.weight"]).split(10, -1)
    pieces = [torch.as_tensor(r["column_fused"]["out"]).chunk(2, dim=-1) for r in ranks]
    close(torch.cat([p[0] for p in pieces], dim=-1), ref_gate)
    close(torch.cat([p[1] for p in pieces], dim=-1), ref_up)


@pytest.mark.parametrize(("check", "tol"), [("row", 1e-5), ("row_float16_comm", 2e-2),
                                           ("row_chunked", 1e-5),
                                           ("row_chunked_float16", 2e-2)])
def test_row_parallel_adds_the_bias_once(ranks: list[dict[str, Results]], w: dict, check: str,
                                         tol: float) -> None:
    ref = linear(w["row_in"], "o", w)
    for r in ranks:
        close(r[check]["out"], ref, tol)
        assert r[check]["overflow"] is False
        assert r[check]["read"] == w["o.weight"].numel() // WORLD  # only its columns


def test_chunked_all_reduce_flags_an_overflow_in_any_chunk(
        ranks: list[dict[str, Results]]) -> None:
    for r in ranks:
        assert r["row_chunked_float16"]["last_chunk_overflow"]
        assert not r["row_chunked"]["last_chunk_overflow"]  # float32 on the wire


def test_vocab_parallel_embedding_uneven_vocab(ranks: list[dict[str, Results]],
                                               w: dict) -> None:
    ref = w["embed.weight"][w["ids"]]
    for r in ranks:  # exact: one rank contributes each row, in the model dtype
        assert torch.equal(torch.as_tensor(r["embedding"]["out"]), ref)
    # 6 and 5 rows of the 11: each rank reads only its own
    assert [r["embedding"]["read"] for r in ranks] == [6 * DIM, 5 * DIM]


def test_parallel_lm_head_gathers_the_full_vocab(ranks: list[dict[str, Results]],
                                                 w: dict) -> None:
    ref = w["h"] @ w["head.weight"].T
    for r in ranks:
        assert r["lm_head"]["out"].shape == (TOKENS, VOCAB)  # padding row cut off
        assert r["lm_head"]["float32"]
        close(r["lm_head"]["out"], ref)


def test_fp8_lm_head_rescores_each_shards_top_logits(ranks: list[dict[str, Results]],
                                                     w: dict) -> None:
    """At tp=2 each rank rescores its own shard's top C (C = 2) of each row's FP8 logits
    from its 16-bit rows: a row's logits are the 16-bit head's there and FP8's
    elsewhere, one row alone or all at once; more rows than parallel.FP8_HEAD_ROWS get
    the 16-bit head's logits."""
    exact = w["h"] @ w["head.weight"].T
    per_rank = -(-VOCAB // WORLD)
    w8, scale = quantize_rows(w["head.weight"])
    rough = w["h"] @ (w8.float() * scale[:, None]).T
    ref = rough.clone()
    for row in range(TOKENS):
        for start in range(0, VOCAB, per_rank):  # a shard's padding row (zeros) scores 0
            shard = torch.cat([rough[row, start:start + per_rank],
                               torch.zeros(start + per_rank - min(VOCAB, start + per_rank))])
            top = [int(i) + start for i in shard.topk(2).indices if i + start < VOCAB]
            ref[row, top] = exact[row, top]
    assert not torch.allclose(rough, exact, rtol=1e-4, atol=1e-4)  # FP8 is seen
    for r in ranks:
        close(r["lm_head_fp8"]["row"], ref[:1])
        close(r["lm_head_fp8"]["rows"], ref)
        close(r["lm_head_fp8"]["over"], exact)


def test_float16_all_reduce_flags_overflow(ranks: list[dict[str, Results]]) -> None:
    for r in ranks:
        res = r["all_reduce_float16"]
        assert res["fresh"] is False
        assert res["sum_overflow"], "a float16 sum above 65504 must set the flag"
        assert res["after_reset"] is False
        assert res["big_overflow"], "a float16 payload above 65504 must set the flag"
        assert res["normal_overflow"] is False
        assert res["normal_dtype"]
        np.testing.assert_allclose(res["normal"], [3.0, -4.0, 60000.0], rtol=1e-3)
        # the float32 re-run is exact and does not flag
        np.testing.assert_array_equal(res["forced"], np.full(4, 80000.0, dtype=np.float32))
        assert res["forced_overflow"] is False


def test_single_rank_all_reduce_is_a_no_op() -> None:
    x = torch.randn(3, 4)
    for dtype in (torch.float32, torch.float16):
        comm = Comm(0, 1, dtype)
        assert comm.all_reduce(x) is x
        assert comm.all_gather_last(x) is x
    comm = Comm(0, 1, torch.float16)
    comm.all_reduce(torch.full((2,), 1e6))
    assert not bool(comm.overflow)  # nothing was sent, nothing overflowed


def test_shard_ranges_cover_the_rows() -> None:
    assert [shard_range(12, r, 2) for r in range(2)] == [(0, 6), (6, 12)]
    assert [shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]



def test_gemv_picks_are_kept_and_a_bad_cache_is_timed_again(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """tune_gemv times each shape once and keeps the pick on disk; the next start reads
    it (no timing); a torn, foreign or stale cache entry is timed again, never trusted."""
    from replicas import kernels, parallel

    timed: list[tuple[int, ...]] = []

    def pick(weight: torch.Tensor, bias: torch.Tensor | None, kind: str
             ) -> tuple[kernels.GemvConfig | None, dict[str, float]]:
        timed.append(tuple(weight.shape))
        config = kernels.GEMV_CONFIGS[1] if weight.shape[0] > 16 else None
        return config, {"cublas": 3.0, str(kernels.GEMV_CONFIGS[1]): 2.0}

    monkeypatch.setattr(kernels, "pick_gemv", pick)
    monkeypatch.setattr(parallel, "gemv_cache_key",
                        lambda w, has_bias, kind: f"cpu|{tuple(w.shape)}|{has_bias}|{kind}")

    def model() -> torch.nn.ModuleList:
        comm = Comm()
        return torch.nn.ModuleList([ColumnParallelLinear(32, [64], True, comm),
                                    ColumnParallelLinear(32, [64], True, comm),  # same shape
                                    ColumnParallelLinear(32, [8], False, comm)])

    cache = tmp_path / "picks" / "gemv_picks.json"
    first = model()
    report = parallel.tune_gemv(first, cache)
    assert timed == [(64, 32), (8, 32)]  # one timing per shape
    assert [m.gemv for m in first] == [kernels.GEMV_CONFIGS[1]] * 2 + [None]
    assert all("cached" not in r for r in report.values())

    second = model()
    report = parallel.tune_gemv(second, cache)
    assert timed == [(64, 32), (8, 32)]  # nothing timed again
    assert [m.gemv for m in second] == [m.gemv for m in first]
    assert all(r["cached"] == "yes" for r in report.values())

    kept = json.loads(cache.read_text())
    kept["cpu|(64, 32)|True|plain"]["chosen"] = "(3, 3, 3, 3)"  # not a config of the list
    cache.write_text(json.dumps(kept))
    parallel.tune_gemv(model(), cache)
    assert timed[2:] == [(64, 32)]
    cache.write_text("{torn")
    parallel.tune_gemv(model(), cache)
    assert timed[3:] == [(64, 32), (8, 32)]
    assert json.loads(cache.read_text())  # rewritten whole


def test_a_gemv_pick_is_kept_for_one_config_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept pick's key names the configs that were timed: with a config added (PERF.md
    v0.87's A/B adds some in a process, the kernels' source unchanged), a pick made
    without it is not read back as if it had been timed against it."""
    from replicas import kernels, parallel

    gemv = importlib.import_module("replicas.kernels.gemv")  # (the package's is the function)
    monkeypatch.setattr(parallel, "_gemv_stack", lambda device: "gpu|torch|triton|source")
    weight = torch.empty(64, 32)
    before = parallel.gemv_cache_key(weight, False, "norm")
    assert before == parallel.gemv_cache_key(weight, False, "norm")
    assert before != parallel.gemv_cache_key(weight, True, "norm")
    monkeypatch.setattr(gemv, "FP8_GEMV_CONFIGS", gemv.FP8_GEMV_CONFIGS[:-1])
    assert kernels.gemv_configs(fp8=True)[-1] != kernels.FP8_GEMV_CONFIGS[-1]
    assert parallel.gemv_cache_key(weight, False, "norm") != before


def test_a_kept_pick_may_be_any_config_either_kind_times() -> None:
    """FP8 weights are timed on more configs (kernels.FP8_GEMV_CONFIGS): a pick of one of
    those is kept like any other; cuBLAS is kept as None; anything else is timed again."""
    from replicas import kernels
    from replicas.parallel import kept_pick

    fp8_only = kernels.FP8_GEMV_CONFIGS[0]
    assert fp8_only not in kernels.GEMV_CONFIGS
    assert fp8_only in kernels.gemv_configs(fp8=True)
    assert fp8_only not in kernels.gemv_configs(fp8=False)
    assert kept_pick({"chosen": str(fp8_only)}) == (fp8_only,)
    assert kept_pick({"chosen": str(kernels.GEMV_CONFIGS[0])}) == (kernels.GEMV_CONFIGS[0],)
    assert kept_pick({"chosen": "cublas"}) == (None,)
    assert kept_pick({"chosen": "(3, 3, 3, 3)"}) is None and kept_pick({}) is None
