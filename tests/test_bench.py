"""`python -m replicas.bench` runs the real engine path on CPU and prints JSON lines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch


@pytest.mark.slow
@pytest.mark.serial  # (tp=2 ranks: 41.5 s in the fast tier in CI, 15.8 alone)
def test_cpu_bench_prints_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "replicas.bench", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == [json.loads(line) for line in out.read_text().splitlines()]
    cases = {row["case"]: row for row in printed}
    wanted = {"decode_b1_in128_tp1", "decode_b1_in128_tp2", "throughput_64req_in32_out32_tp2"}
    assert wanted <= set(cases)
    decode = cases["decode_b1_in128_tp1"]
    assert decode["ours"] > 0 and decode["transformers"] > 0
    ratio = decode["ours"] / decode["transformers"]
    assert abs(decode["ratio_ours_over_transformers"] - ratio) < 0.01
    assert all(row["versions"]["torch"] and row["command"] for row in printed)


@pytest.mark.parametrize("name, second", [("gpu_h200", "unit"),
                                           ("multigpu_2xh200", "unit"), ("fp8_h200", "unit"),
                                           ("fp8_h100", "unit")])
def test_table_is_made_from_the_results(name: str, second: str) -> None:
    from replicas.bench import table

    path = Path(__file__).resolve().parent.parent / f"replicas/results/{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    text = table(str(path))
    latest = {row["case"]: row for row in rows}  # (a case run again: its latest row)
    assert text.count("\n") == len(latest) + 1
    for row in latest.values():
        assert f"| {row['case']} | {row[second]} | {row['ours']}" in text  # (fp8: + cached)
    readme = (path.parent.parent.parent / "README.md").read_text()
    assert text in readme  # the README's table is the current one


def test_fp8_table_puts_each_fp8_figure_beside_bf16_and_its_target(tmp_path: Path) -> None:
    """Issue 20's table: an FP8 row beside the bf16 row of its case, its target and
    whether it is met (the decode also by its share of the floor); of the accuracy rows
    only weight-only FP8, alone and with the FP8 cache, carry the 98 % bar; a case run
    twice shows its latest row; a row beside the bf16 one of its own call (git_rev)."""
    from replicas.bench import table

    base = {"suite": "fp8", "unit": "x", "hardware": {"gpu": "H200"}}
    fp8 = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    rows = [{"case": "glm4-9b_ttft_in8192", "ours": 300.0},
            {"case": "glm4-9b_fp8_ttft_in8192", "ours": 250.0, **fp8},
            {"case": "glm4-9b_fp8_ttft_in8192", "ours": 180.0, **fp8},
            {"case": "glm4-9b_fp8_decode_b1_in128_out128", "ours": 2.5,
             "fraction_of_floor": 0.8, **fp8},
            {"case": "glm4-9b_fp8_kv_blocks_same_memory", "ours": 50, "bf16": 25,
             "ratio": 2.0, **fp8},
            {"case": "accuracy_quantization=fp8", "ours": 0.981},
            {"case": "accuracy_dtype=float32", "ours": 0.97}]
    path = tmp_path / "fp8.jsonl"
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    lines = table(str(path)).splitlines()
    assert len(lines) == 2 + 6  # the ttft case once, its latest row
    assert "| glm4-9b_fp8_ttft_in8192 | x | 180.0 | 300.0 | ≤ 190 | yes | — |" in lines
    assert lines[4].endswith("| ≤ 2.6, ≥ 85 % of its floor | no | — |")  # 80 % of the floor
    assert lines[5].endswith("| 25 | ≥ 1.9x | yes (2.0x) | — |")
    assert lines[6].endswith("| ≥ 0.98 | yes | — |") and lines[7].endswith("| — | — | — |")
    # a later call re-runs bf16 but not this mode: the mode keeps its own call's twin
    rows += [{"case": "glm4-9b_fp8_ttft_in8192", "ours": 185.0, "git_rev": "aaa", **fp8},
             {"case": "glm4-9b_ttft_in8192", "ours": 290.0, "git_rev": "aaa"},
             {"case": "glm4-9b_ttft_in8192", "ours": 310.0, "git_rev": "bbb"}]
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    assert "| glm4-9b_fp8_ttft_in8192 | x | 185.0 | 290.0 | ≤ 190 | yes | aaa |" in table(
        str(path)).splitlines()
    # two calls at one revision: each row beside its own call's bf16 (`call`)
    rows += [{"case": "glm4-9b_fp8_ttft_in8192", "ours": 186.0, "git_rev": "ccc",
              "call": "ccc/1", **fp8},
             {"case": "glm4-9b_ttft_in8192", "ours": 291.0, "git_rev": "ccc", "call": "ccc/1"},
             {"case": "glm4-9b_ttft_in8192", "ours": 292.0, "git_rev": "ccc", "call": "ccc/2"}]
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    assert "| glm4-9b_fp8_ttft_in8192 | x | 186.0 | 291.0 | ≤ 190 | yes | ccc |" in table(
        str(path)).splitlines()
    # the 256-request rows: fresh prompts and prompts cached (as the 20.2k), each
    # judged against the target
    rows += [{"case": "glm4-9b_256req_in128_out128", "ours": 15000.0,
              "ours_prompts_cached": 23000.0},
             {"case": "glm4-9b_fp8_256req_in128_out128", "ours": 22500.0,
              "ours_prompts_cached": 32300.0, **fp8}]
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in rows))
    assert ("| glm4-9b_fp8_256req_in128_out128 | x | 22500.0 (32300.0 cached) | 15000.0 "
            "(23000.0 cached) | ≥ 32000 | cached: yes; fresh: no | — |") in table(
        str(path)).splitlines()


@pytest.mark.slow
@pytest.mark.serial  # (tp=2 ranks: 282 s in the fast tier in CI, 39 alone)
def test_multigpu_suite_runs_every_case_on_cpu() -> None:
    """`--suite multigpu --smoke`: the tp=2 cases on CPU (gloo, tiny model), so that the
    harness is checked where no two GPUs are: tp=2 float32 greedy tokens equal tp=1's,
    the overlap row has both prefill times and the all-reduces timed alone, and the
    32-bit payload puts twice the bytes on the wire."""
    # (faulthandler: a crash prints every thread's stack; CI once saw this process die of
    # SIGABRT after ~126 s, its usual time, with nothing to say where)
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "replicas.bench", "--suite", "multigpu",
         "--smoke", "--tp", "2", "--repeats", "1"], capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}; rows: {proc.stdout.count(chr(10))}; stderr's end:\n"
        + proc.stderr[-4000:])
    cases = {row["case"]: row for row in map(json.loads, (
        line for line in proc.stdout.splitlines() if line.startswith("{")))}
    same = cases["tiny_tp2_correctness"]
    assert same["ours"] is True and same["float32_logits_max_abs_diff"] < 1e-4
    overlap = cases["tiny_tp2_prefill256_overlap"]
    assert overlap["ttft_overlap_on_ms"] > 0 and overlap["ttft_overlap_off_ms"] > 0
    assert overlap["allreduce_alone_ms"] > 0
    half, full = cases["tiny_tp2_comm_float16"], cases["tiny_tp2_comm_float32"]
    assert full["wire_bytes_per_token"] == 2 * half["wire_bytes_per_token"] > 0
    assert cases["tiny_tp2_decode_b1_in128_out16"]["ours"] > 0
    assert cases["tiny_tp2_decode_b1_in128_out16"]["tp1_ms"] > 0
    assert cases["tiny_tp2_ttft_in256"]["ratio_to_tp1"] > 0
    startup = cases["tiny_tp2_startup"]
    assert startup["phases"]["join"] >= 0 and startup["other_ranks_phases"]["1"]["load"] >= 0
    engines = cases["tiny_tp2_16req_in128_out8"]  # one tp=2 engine, two tp=1 at once
    assert engines["ours"] > 0 and engines["2x_tp1_tokens_per_s"] > 0
    assert engines["ratio_to_tp1_engines"] > 0 and "ratio_to_tp2_engines" not in engines
    cycles = cases["tiny_tp2_shutdown_cycles"]
    assert len(cycles["shutdown_s"]) == 2 and cycles["ranks_left"] == 0
    assert cycles["same_tokens_every_cycle"] and cycles["ours"] < 10


def test_time_per_token_runs_again_when_a_stream_came_in_one_delta() -> None:
    """A client starved while the engine decoded gets all its tokens in one delta: that
    run measures nothing (it once read 0.0 ms/token in CI) and is run again; if no run
    can be measured, an error, never a zero."""
    from replicas.bench import ours_per_token

    class Engine:
        def __init__(self, runs: list[bool]) -> None:
            self.runs = runs  # per run: True = every token in one delta

        async def add_request(self, prompt: list[int], params: Any) -> Any:
            bunched = self.runs.pop(0)
            if bunched:
                yield type("Delta", (), {"token_ids": list(range(params.max_tokens))})()
                return
            for token in range(params.max_tokens):
                await asyncio.sleep(0.002)
                yield type("Delta", (), {"token_ids": [token]})()

    engine = Engine([True, True, False])
    per = ours_per_token(engine, [[1, 2]], 4, repeats=1)  # type: ignore[arg-type]
    assert 0.001 < per < 0.5 and engine.runs == []
    with pytest.raises(RuntimeError, match="not measurable"):
        ours_per_token(Engine([True] * 5), [[1, 2]], 4, repeats=1)  # type: ignore[arg-type]


def test_w8a8_suite_rows_put_each_count_of_rows_beside_scaled_mm() -> None:
    """`--suite w8a8`: a row per (layer, rows) from pick_w8a8's times (a stand-in's here,
    on small FP8 weights): the fastest Triton config against `_scaled_mm`, the pick the
    engine would take, the weight's bytes a second; no LM head (its FP8 rows go through
    kernels.w8a16, not W8A8, and only up to parallel.FP8_HEAD_ROWS rows)."""
    from replicas.bench import w8a8_suite
    from replicas.kernels.fp8mm import W8A8_CUBLAS_CONFIGS

    seen = []

    def picker(w8: torch.Tensor, scale: torch.Tensor, has_bias: bool,
               **others: Any) -> tuple[Any, Any]:
        assert not others  # (one pick a shape: its candidates' times are the rows')
        seen.append((tuple(w8.shape), w8.dtype, scale.shape, has_bias))
        fast = (64, 64, 128, 4, 4, False)
        # (v0.71's cuBLAS runs: among the picks' own candidates, slower here)
        runs = {str(c): 30.0 - i for i, c in enumerate(W8A8_CUBLAS_CONFIGS)}
        return ((16, None), (256, fast)), {
            16: {"scaled_mm": 10.0, str(fast): 11.0, "(16, 64, 128, 4, 4, True)": 10.5,
                 **runs},
            256: {"scaled_mm": 20.0, str(fast): 12.0, **runs}}

    shapes = {"qkv": (48, 64, "norm", True), "down": (32, 128, "gated", False),
              "lm_head": (80, 64, "plain", False)}
    rows = list(w8a8_suite(1, picker, bandwidth=100.0, device="cpu", shapes=shapes))
    assert [r["case"] for r in rows] == ["glm4-9b_w8a8_qkv_m16", "glm4-9b_w8a8_qkv_m256",
                                         "glm4-9b_w8a8_down_m16", "glm4-9b_w8a8_down_m256"]
    assert seen == [((48, 64), torch.float8_e4m3fn, (48,), True),
                    ((32, 128), torch.float8_e4m3fn, (32,), False)]
    few, many = rows[0], rows[1]
    assert few["ours"] == 10.5 and few["config"] == "(16, 64, 128, 4, 4, True)"
    assert few["picked"] == "scaled_mm" and few["over_scaled_mm"] == 1.05
    assert many["picked"] == "(64, 64, 128, 4, 4, False)" and many["over_scaled_mm"] == 0.6
    assert many["fraction_of_copy"] == round(48 * 64 / 12.0 / 1e3 / 100.0, 3)
    assert not any(key.startswith("split") for r in rows for key in r)  # (v0.68's: gone)
    assert "cublas_error" not in rows[2]
    last = str(W8A8_CUBLAS_CONFIGS[-1])
    assert rows[2]["cublas_best"] == last and len(rows[2]["cublas_us"]) == len(
        W8A8_CUBLAS_CONFIGS) and rows[2]["cublas_over_scaled_mm"] == round(
        (31.0 - len(W8A8_CUBLAS_CONFIGS)) / 10.0, 3)  # (16 rows: _scaled_mm 10 us)


def test_gemv_suite_rows_name_the_fastest_config() -> None:
    """`--suite gemv`: a row per weight dtype and layer from pick_gemv's times (here a
    stand-in's, on small shapes): the fastest config and its bytes a second; FP8 weights
    also on the trial configs (PERF.md v0.85), the LM head too (the FP8 head, v0.94)."""
    from replicas.bench import gemv_suite

    seen = []

    def picker(w: torch.Tensor, bias: Any, kind: str, scale: Any = None,
               dtype: Any = None, trials: bool = False) -> tuple[Any, dict[str, float]]:
        seen.append((tuple(w.shape), w.dtype, kind, bias is not None, scale is not None,
                     trials))
        times = {"cublas": 9.0, "(16, 1024, 8, 3)": 8.0, "(4, 1024, 4, 3)": 7.0}
        if scale is not None:
            times["(32, 512, 8, 3)"] = 5.6
            if kind == "plain":  # a trial beats the engine's configs on the plain kind
                times["(8, 1024, 8, 3, 80)"] = 5.04
        return None, times

    shapes = {"qkv": (48, 64, "norm", True), "down": (32, 128, "gated", False),
              "lm_head": (80, 64, "plain", False)}
    rows = list(gemv_suite(1, picker, bandwidth=100.0, device="cpu", shapes=shapes))
    assert [r["case"] for r in rows] == [
        "glm4-9b_gemv_bfloat16_qkv", "glm4-9b_gemv_bfloat16_down",
        "glm4-9b_gemv_bfloat16_lm_head", "glm4-9b_gemv_fp8_qkv", "glm4-9b_gemv_fp8_down",
        "glm4-9b_gemv_fp8_lm_head"]
    assert seen[5] == ((80, 64), torch.float8_e4m3fn, "plain", False, True, True)
    assert seen[0] == ((48, 64), torch.bfloat16, "norm", True, False, False)
    assert seen[3][1] == torch.float8_e4m3fn and seen[3][4] and seen[3][5]  # (trials: FP8)
    # down as the engine runs it: SwiGLU inside with bf16 weights, plain with FP8 ones
    assert seen[1][2] == rows[1]["kind"] == "gated"
    assert seen[4][2] == rows[4]["kind"] == "plain"
    bf16, fp8 = rows[0], rows[3]
    assert bf16["ours"] == 7.0 and bf16["config"] == "(4, 1024, 4, 3)"
    assert bf16["gb_s"] == round(48 * 64 * 2 / 7.0 / 1e3, 1)
    assert fp8["ours"] == 5.6 and fp8["config"] == "(32, 512, 8, 3)"
    assert fp8["fraction_of_copy"] == round(48 * 64 / 5.6 / 1e3 / 100.0, 3)
    # FP8 rows say the engine's own pick and how the best (a trial's, maybe) compares
    assert fp8["engine_config"] == "(32, 512, 8, 3)" and fp8["best_over_engine"] == 1.0
    down = rows[4]  # (plain with FP8 weights: the trial wins)
    assert down["config"] == "(8, 1024, 8, 3, 80)" and down["engine_config"] == "(32, 512, 8, 3)"
    assert down["best_over_engine"] == 0.9 and "engine_config" not in bf16


def stand_in_timer(timed: list[str]) -> Callable[[Any, list[Any]], float]:
    """A probe's timer on CPU: runs the candidate once on the last copy (as the GPU's
    timer does), notes its keywords in `timed`, and reads each later one as faster."""
    def timer(fn: Any, copies: list[Any]) -> float:
        fn(copies[-1])
        timed.append(str(fn.keywords))
        return 10.0 - len(timed) * 0.1

    return timer


def test_attention_probe_times_every_tile_and_split_against_the_engines() -> None:
    """`--suite attention`'s rows (here on CPU, Triton's interpreter, small shapes and a
    stand-in timer): per cache dtype and (sequences, keys), the engine's tile and splits
    first, then each tile at the engine's splits, the engine's tile and its F16 form also
    at twice and half of them (F16 with the 8-bit caches only); every variant
    computes what the engine's does (none failed); the floor is the keys' and values'
    bytes at the given rate."""
    pytest.importorskip("triton")
    from replicas import kernels
    from replicas.bench import attention_probe

    timed: list[str] = []
    timer = stand_in_timer(timed)
    # (float16: Triton's interpreter multiplies bf16 dots' bit patterns, triton-lang/triton
    # issue 11584, so every bf16 variant would "agree" with the engine's)
    rows = list(attention_probe([(2, 40), (3, 9)], "cpu", timer, bandwidth=1.0,
                                tiles=[(16, 4), (64, 4), (64, 4, 1)],
                                cache_dtypes=("float16", "int8", "fp8"), dtype=torch.float16,
                                heads=4, kv_heads=2, d=16, rotary_dim=8, block_size=4))
    assert [r["case"] for r in rows] == [
        "glm4-9b_decode_attention_float16_2x40", "glm4-9b_decode_attention_float16_3x9",
        "glm4-9b_decode_attention_int8_2x40", "glm4-9b_decode_attention_int8_3x9",
        "glm4-9b_decode_attention_fp8_2x40", "glm4-9b_decode_attention_fp8_3x9"]
    first = rows[0]
    splits = kernels.decode_splits(2, 2, 40)
    assert first["engine_tile"] == list(kernels.DECODE_TILE) and first["engine_splits"] == splits
    names = list(first["times_us"])
    assert names[0] == f"tile {kernels.DECODE_TILE[0]}x{kernels.DECODE_TILE[1]}w splits {splits}"
    others = {splits, 2 * splits, max(1, splits // 2)}  # the engine's tile only
    want = {f"tile 16x4w splits {splits}"} | {f"tile 64x4w splits {s}" for s in others}
    assert set(names) == want and len(names) == len(want) and not first["failed"]
    f16 = {f"tile 64x4w f16 splits {s}" for s in others}  # (the 8-bit caches' only)
    assert set(rows[2]["times_us"]) == want | f16
    assert set(rows[4]["times_us"]) == want | f16
    assert first["ours"] == first["times_us"][names[0]] and first["best"] == names[-1]
    assert first["floor_us"] == round(2 * 2 * 40 * 2 * 16 * 2 / 1e3, 2)  # 16-bit K and V
    assert rows[2]["floor_us"] == round(2 * 2 * 40 * 2 * (16 + 4) / 1e3, 2)  # int8 + scales
    assert rows[4]["floor_us"] == round(2 * 2 * 40 * 2 * 16 / 1e3, 2)  # e4m3
    assert all(not r["failed"] for r in rows)
    with pytest.raises(ValueError, match="16-bit cache"):
        next(attention_probe([(2, 40)], "cpu", timer, 1.0, tiles=[], heads=4, kv_heads=2,
                             d=16, rotary_dim=8, block_size=4, dtype=torch.float16))


def test_attention_probe_names_stages_and_register_caps() -> None:
    """PERF.md v0.84's candidates: a tile with the key loop's stages and a register cap
    (ignored by the interpreter) runs at the engine's splits only, under a name that says
    both, and computes the engine's attention; a candidate that does not build (keys a
    tile not a power of two) is listed in `failed` with its error, the rest still timed."""
    pytest.importorskip("triton")
    from replicas.bench import attention_probe

    timer = stand_in_timer([])
    row, = attention_probe([(2, 12)], "cpu", timer, 1.0,
                           tiles=[(16, 4, 0, 1), (16, 4, 0, 2, 128), (3, 4, 0, 1)],
                           cache_dtypes=("float16",), dtype=torch.float16, heads=4,
                           kv_heads=2, d=16, rotary_dim=8, block_size=4)
    splits = row["engine_splits"]
    assert {f"tile 16x4w s1 splits {splits}", f"tile 16x4w r128 splits {splits}"} < set(
        row["times_us"])
    assert len(row["failed"]) == 1 and row["failed"][0].startswith(
        f"tile 3x4w s1 splits {splits}: "), row["failed"]


def test_throughput_layouts_share_the_same_gpus() -> None:
    """The throughput case's layouts: one tp engine, tp engines of tp=1, and from tp=4
    on tp / 2 engines of tp=2 (issue 21's comparison), each layout on exactly tp GPUs."""
    from replicas.multigpu import throughput_layouts

    assert throughput_layouts(2) == [(2, 1), (1, 2)]
    assert throughput_layouts(4) == [(4, 1), (1, 4), (2, 2)]
    assert throughput_layouts(8) == [(8, 1), (1, 8), (2, 4)]
    for tp in (2, 4, 8):
        assert all(size * count == tp for size, count in throughput_layouts(tp))


def test_kernel_table_groups_a_profiles_gpu_kernels_by_name_largest_first() -> None:
    """What the 8192-token TTFT rows and the multigpu suite's prefill and decode
    breakdowns record (`run_kernels`, `decode_kernels`): the GPU kernels of a profile
    by name, per step, the CPU's events left out; each kernel's own time leaves out what
    an earlier kernel on its GPU still ran (a kernel launched early, as programmatic
    dependent launch does, waits inside its span), each GPU on its own."""
    from replicas.bench import kernel_table

    def event(name: str, start: float, us: float, device: str = "CUDA", index: int = 0
              ) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device),
                               device_index=index, time_range=SimpleNamespace(
                                   start=start, end=start + us, elapsed_us=lambda: us))

    prof = SimpleNamespace(events=lambda: [
        event("gemm", 0.0, 30.0), event("norm", 5.0, 27.0),  # norm waits 25 of its 27
        event("gemm", 40.0, 50.0), event("widen", 90.0, 6.0),
        event("attention", 100.0, 20.0), event("aten::mm", 0.0, 99.0, "CPU"),
        event("gemm", 10.0, 4.0, index=1)])  # another GPU's: its own
    table = kernel_table(prof, steps=2, top=3)
    assert table["kernels_us"] == 68.5 and table["busy_us"] == 56.0
    assert table["kernel_calls"] == 3.0
    assert table["top"] == [{"name": "gemm", "calls": 1.5, "us": 42.0, "own_us": 42.0},
                            {"name": "attention", "calls": 0.5, "us": 10.0, "own_us": 10.0},
                            {"name": "widen", "calls": 0.5, "us": 3.0, "own_us": 3.0}]


def test_gemv_roles_name_each_gemv_by_where_it_sits_in_the_step() -> None:
    """bench.gemv_roles (PERF.md v0.92): the GEMVs share a kernel's name; in a decode
    step a lone one before attention is the first layer's qkv, the four after an
    attention are o, gate_up, down and the next layer's qkv, the last layer's three stop
    at down (the final norm runs next), and the one alone before the argmax is the LM
    head; a prefill's other GEMVs are "other". Own time as kernel_table's (an overlapping
    start waits inside its span)."""
    from replicas.bench import gemv_roles

    clock = [0.0]

    def event(name: str, us: float, overlap: float = 0.0) -> SimpleNamespace:
        start = clock[0] - overlap
        clock[0] = start + us
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name="CUDA"),
                               device_index=0, time_range=SimpleNamespace(
                                   start=start, end=start + us, elapsed_us=lambda: us))

    def step() -> list[SimpleNamespace]:  # two layers, then the LM head
        g = "_gemv_kernel"
        return [event("embed", 1), event(g, 6), event("_decode_kernel", 4),
                event(g, 5), event(g, 30, overlap=2), event(g, 16), event(g, 7),
                event("_decode_kernel", 4), event(g, 5), event(g, 30), event(g, 16),
                event("_rms_norm_kernel", 1), event(g, 270), event("copy", 1),
                event("_argmax_part_kernel", 2)]  # (on the H200 the argmax was not next)

    prefill = [event("_w8a16_kernel", 50), event("_gemv_kernel", 9), event("norm", 1),
               event("_gemv_kernel", 3), event("_gemv_kernel", 3), event("embed", 1)]
    prof = SimpleNamespace(events=lambda: [*prefill, *step(), *step()])
    roles = gemv_roles(prof, steps=2)
    assert set(roles) == {"qkv", "o", "gate_up", "down", "lm_head", "other"}
    assert roles["qkv"] == {"calls": 2.0, "us": 13.0, "own_us": 13.0}  # 6 + 7 a step
    assert roles["gate_up"] == {"calls": 2.0, "us": 60.0, "own_us": 58.0}  # 2 us waited
    assert roles["o"]["calls"] == 2.0 and roles["down"]["us"] == 32.0
    assert roles["lm_head"] == {"calls": 1.0, "us": 270.0, "own_us": 270.0}
    assert roles["other"]["calls"] == 1.5  # the prefill's lone GEMV and its pair


def test_gpu_gaps_sums_the_idle_stretches_between_kernels_by_their_neighbours() -> None:
    """decode_gaps's reading of a profile (PERF.md v0.79): a stretch with nothing on a GPU
    of at least `least_us` counts, named by the kernel that ended last before it and the
    one after; overlapping kernels (PDL) leave no gap; the CPU's events and another GPU's
    timeline do not close one."""
    from types import SimpleNamespace

    from replicas.bench import gpu_gaps

    def event(name: str, start: float, end: float, device: str = "CUDA", index: int = 0
              ) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device),
                               device_index=index,
                               time_range=SimpleNamespace(start=start, end=end))

    prof = SimpleNamespace(events=lambda: [
        event("argmax", 0.0, 10.0), event("embed", 40.0, 45.0),  # 30 idle
        event("norm", 44.0, 50.0),  # overlaps: no gap
        event("gemm", 51.0, 60.0),  # 1 us: under least_us
        event("long", 55.0, 80.0), event("attn", 70.0, 75.0),  # inside long's span
        event("argmax", 100.0, 110.0), event("embed", 150.0, 151.0),  # 20, then 40
        event("aten::mm", 10.0, 40.0, "CPU"), event("gemm", 12.0, 30.0, index=1)])
    gaps = gpu_gaps(prof, least_us=2.0)
    assert gaps["idle_us"] == 90.0 and gaps["gaps"] == 3
    assert gaps["top"] == [
        {"after": "argmax", "before": "embed", "count": 2, "us": 70.0, "max_us": 40.0},
        {"after": "long", "before": "argmax", "count": 1, "us": 20.0, "max_us": 20.0}]


def test_256_requests_time_new_prompts_and_beside_them_cached_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """_run_256 warms up on one batch of prompts, times each run on prompts of its own
    (their prefill computed, as transformers' side computes it), then times the warm-up's
    prompts again, which the prefix cache serves (the measure before v0.30), then
    profiles one more run of new prompts; output tok/s of both, and the profile."""
    from replicas import bench

    calls: list[tuple[tuple[int, ...], int]] = []

    class Recorder:  # stands for the engine: what it was asked to generate
        def generate(self, prompts: list[list[int]], params: Any) -> None:
            assert len(prompts) == 256 and all(len(p) == 128 for p in prompts)
            calls.append((tuple(prompts[0][:8]), params.max_tokens))

    profiled: list[tuple[tuple[int, ...], int]] = []

    def run_kernels(engine: Any, prompts: list[list[int]], top: int, tokens: int) -> dict:
        profiled.append((tuple(prompts[0][:8]), tokens))
        return {"wall_ms": 1.0}

    monkeypatch.setattr(bench, "run_kernels", run_kernels)
    row = bench._run_256(Recorder(), repeats=2)  # type: ignore[arg-type]
    assert row["ours"] > 0 and row["ours_prompts_cached"] > 0
    assert row["kernels"] == {"wall_ms": 1.0}
    warm, *timed = calls
    assert warm[1] == 4 and [t[1] for t in timed] == [128] * 4
    new, again = timed[:2], timed[2:]
    assert len({warm[0], *(p for p, _ in new), profiled[0][0]}) == 4  # new prompts each
    assert all(p == warm[0] for p, _ in again)  # then the cached ones
    assert profiled[0][1] == 128


def test_fp8_rows_come_one_by_one_in_each_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp8 suite's FP8 part (fp8_rows) yields each row as soon as it is measured (a
    device call cut short keeps the rows before), in the modes and cases the README's
    table reads: weight-only with each cache, W8A8, and W8A8 with qkv weight-only and
    runs of 32 with the int8 cache; the engines it starts are the ones each case needs.
    (The engine and the measures are stand-ins here: on a GPU they are the real ones.)"""
    import contextlib

    from replicas import EngineConfig, bench

    started: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def engine(config: EngineConfig) -> Any:
        started.append({k: getattr(config, k) for k in (
            "quantization", "kv_cache_dtype", "keep_16bit", "max_num_seqs")})
        yield type("E", (), {"stats": lambda self: {"num_kv_blocks": 52}})()

    monkeypatch.setattr(bench, "Engine", engine)
    monkeypatch.setattr(bench, "decode_row", lambda *a: {"case": "x", "ours": 3.0})
    monkeypatch.setattr(bench, "_run_256", lambda *a: {"ours": 1.0})
    monkeypatch.setattr(bench, "_ttft_8192", lambda *a: 0.25)
    monkeypatch.setattr(bench, "_ttft_kernels", lambda *a: {})
    monkeypatch.setattr(bench, "accuracy_rows", lambda: iter([{"case": "accuracy_x"}]))
    config = EngineConfig(max_num_seqs=256)
    rows = bench.fp8_rows(config, dataclasses.replace(config, max_num_seqs=1), 1.0, 1, 26)
    first = next(rows)
    assert first["case"] == "glm4-9b_fp8_decode_b1_in128_out128" and len(started) == 1
    cases = [first["case"]] + [r["case"] for r in rows]
    assert cases == [
        "glm4-9b_fp8_decode_b1_in128_out128", "glm4-9b_fp8_kv_blocks_same_memory",
        "glm4-9b_fp8_256req_in128_out128", "glm4-9b_fp8_ttft_in8192",
        "glm4-9b_fp8_int8kv_decode_b1_in128_out128",
        "glm4-9b_fp8_int8kv_kv_blocks_same_memory", "glm4-9b_fp8_int8kv_256req_in128_out128",
        "glm4-9b_fp8-w8a8_256req_in128_out128", "glm4-9b_fp8-w8a8_ttft_in8192",
        "glm4-9b_fp8-w8a8-gateup_int8kv_decode_b1_in128_out128",
        "glm4-9b_fp8-w8a8-gateup_int8kv_kv_blocks_same_memory",
        "glm4-9b_fp8-w8a8-gateup_int8kv_256req_in128_out128",
        "glm4-9b_fp8-w8a8-gateup_ttft_in8192",
        "glm4-9b_fp8-w8a8-keepqkv_int8kv_decode_b1_in128_out128",
        "glm4-9b_fp8-w8a8-keepqkv_int8kv_kv_blocks_same_memory",
        "glm4-9b_fp8-w8a8-keepqkv_int8kv_256req_in128_out128",
        "glm4-9b_fp8-w8a8-keepqkv_ttft_in8192",
        # -keepqkv with the 16-bit cache: no TTFT row of its own (its int8 twin's is the
        # same case, measured above)
        "glm4-9b_fp8-w8a8-keepqkv_decode_b1_in128_out128",
        "glm4-9b_fp8-w8a8-keepqkv_kv_blocks_same_memory",
        "glm4-9b_fp8-w8a8-keepqkv_256req_in128_out128", "accuracy_x"]
    assert started[-4] == {"quantization": "fp8-w8a8", "kv_cache_dtype": "int8",
                           "keep_16bit": "qkv_proj,o_proj,down_proj", "max_num_seqs": 1}
    assert started[-2] == {"quantization": "fp8-w8a8", "kv_cache_dtype": "int8",
                           "keep_16bit": "qkv_proj", "max_num_seqs": 1}
    assert started[-1] == {"quantization": "fp8-w8a8", "kv_cache_dtype": "auto",
                           "keep_16bit": "qkv_proj", "max_num_seqs": 256}
    assert len(started) == 10  # two engines a mode, one for the int8 cache's and -keepqkv's
    # chosen without its int8 twin, -keepqkv measures the TTFT case itself
    monkeypatch.setenv("TPSERVE_FP8_MODES", "fp8-w8a8-keepqkv")
    alone = [r["case"] for r in bench.fp8_rows(config, dataclasses.replace(
        config, max_num_seqs=1), 1.0, 1, 26, accuracy=False)]
    assert alone[-1] == "glm4-9b_fp8-w8a8-keepqkv_ttft_in8192" and len(alone) == 4


def test_fp8_suite_runs_each_mode_in_a_process_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.79: the fp8 suite's bf16 rows, then each chosen FP8 mode's rows from a
    child process of its own (fp8_mode_process: a W8A8 engine's cuBLASLt setting is read
    once a process), in the suite's order, then the accuracy rows; the child runs
    fp8_rows of that mode alone, without the accuracy rows."""
    from replicas import bench

    monkeypatch.setenv("TPSERVE_FP8_MODES", "fp8-w8a8-keepqkv_int8kv,fp8")
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4000.0)
    monkeypatch.setattr(bench, "_glm_rows", lambda repeats, bandwidth: (
        [{"case": "bf16"}], None, None, 26))
    children: list[tuple[str, int, float, int]] = []

    def child(name: str, repeats: int, bandwidth: float, blocks: int) -> Any:
        children.append((name, repeats, bandwidth, blocks))
        yield {"case": f"{name}_row"}

    monkeypatch.setattr(bench, "fp8_mode_process", child)
    monkeypatch.setattr(bench, "accuracy_rows", lambda: iter([{"case": "accuracy"}]))
    assert [r["case"] for r in bench.fp8_suite(2)] == [
        "bf16", "fp8_row", "fp8-w8a8-keepqkv_int8kv_row", "accuracy"]
    assert children == [("fp8", 2, 4000.0, 26), ("fp8-w8a8-keepqkv_int8kv", 2, 4000.0, 26)]
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(bench, "fp8_rows", lambda *a, **k: calls.append(k) or iter([]))
    list(bench.fp8_mode_child("fp8-w8a8", 1, 4000.0, 26))
    assert calls == [{"modes": [m for m in bench.FP8_MODES if m[3] == "fp8-w8a8"],
                      "accuracy": False}]


def test_fp8_mode_process_yields_the_childs_rows_and_raises_when_it_fails(
        capsys: pytest.CaptureFixture[str]) -> None:
    """fp8_mode_process reads the child's rows as it prints them (its other lines pass
    through to stdout), and a child that exits non-zero raises after the rows it gave."""
    import sys

    from replicas.bench import fp8_mode_process

    def child(code: int) -> list[str]:
        script = ("import json\n"
                  "print('FP8ROW ' + json.dumps({'case': 'a', 'ours': 1.5}), flush=True)\n"
                  "print('loading weights', flush=True)\n"
                  "print('FP8ROW ' + json.dumps({'case': 'b'}), flush=True)\n"
                  f"raise SystemExit({code})")
        return [sys.executable, "-c", script]

    rows = list(fp8_mode_process("fp8", 1, 1.0, 1, command=child(0)))
    assert rows == [{"case": "a", "ours": 1.5}, {"case": "b"}]
    assert "loading weights" in capsys.readouterr().out
    got: list[dict[str, Any]] = []
    with pytest.raises(RuntimeError, match="mode 'fp8-w8a8' failed .*exit 3"):
        for row in fp8_mode_process("fp8-w8a8", 1, 1.0, 1, command=child(3)):
            got.append(row)
    assert [r["case"] for r in got] == ["a", "b"]


def test_fp8_modes_can_be_chosen_for_a_short_device_call(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """$TPSERVE_FP8_MODES names the fp8 suite's modes to run (rows' names), in the suite's
    order; the accuracy cases follow (each chosen mode's weights and options, either
    cache, and the float32 baseline); an unknown name is refused with the list."""
    from replicas import bench

    monkeypatch.setenv("TPSERVE_FP8_MODES", "fp8-w8a8-keepqkv_int8kv, fp8-w8a8")
    assert [m[3] for m in bench.fp8_modes()] == ["fp8-w8a8", "fp8-w8a8-keepqkv_int8kv"]
    assert [c for c, _ in bench.accuracy_cases()] == [
        {"quantization": "fp8-w8a8"},
        {"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj"},
        {"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj", "kv_cache_dtype": "int8"},
        {"dtype": "float32"}]
    monkeypatch.setenv("TPSERVE_FP8_MODES", "fp8-w8a8,keepqkv")
    with pytest.raises(ValueError, match="unknown \\['keepqkv'\\].*fp8-w8a8-gateup_int8kv"):
        bench.fp8_modes()

    def measured() -> float:
        raise AssertionError("the suite measured before it checked its modes")

    # the suite refuses the name before its bf16 rows (a device call once lost ~60 s so)
    monkeypatch.setattr(bench, "copy_bandwidth", measured)
    with pytest.raises(ValueError, match="unknown \\['keepqkv'\\]"):
        next(bench.fp8_suite(1))
    monkeypatch.delenv("TPSERVE_FP8_MODES")
    assert len(bench.fp8_modes()) == 6 and bench.accuracy_cases() == list(bench.ACCURACY_CASES)


def test_prefill_host_probe_times_an_eager_step_and_profiles_the_driver(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m replicas.multigpu --prefill-host` (PERF.md v0.42) on the tiny CPU model:
    a bare wall time, no kernel table off CUDA, and the driver thread's functions from
    cProfile (the step runs there, not in the caller), with the step restored after."""
    import replicas.multigpu as multigpu
    from replicas.engine import Engine

    step = Engine._step
    smoke = multigpu._shapes(True)
    monkeypatch.setattr(multigpu, "_shapes", lambda smoke_, name="glm4-9b": smoke)
    # every function (which ten lead by own time depends on the machine's load: CI once
    # saw none of the model's `forward`s among them), ordered by own time
    row = multigpu.prefill_host("tiny", 1, {}, prompts=3, length=20, top=100_000)
    assert row["case"] == "tiny_tp1_prefill_3x20_host" and row["kernels"] is None
    assert row["bare_ms"] > 0 and row["cprofile_ms"] > 0 and len(row["functions"]) > 10
    own = [f["own_ms"] for f in row["functions"]]
    assert own == sorted(own, reverse=True)
    forwards = [f for f in row["functions"] if "forward" in f["where"]]
    assert forwards and max(f["cum_ms"] for f in forwards) > 0  # the model, profiled
    assert Engine._step is step and row["piece_steps"] == 0
    pieces = multigpu.prefill_host("tiny", 1, {"piece_graph_tokens": 64}, prompts=3,
                                   length=20, top=10)
    assert pieces["settings"] == {"piece_graph_tokens": 64} and len(pieces["functions"]) == 10
    assert pieces["piece_steps"] >= 5  # every admitting step of its runs (60 tokens)


def test_attention_probe_takes_a_larger_pool_and_the_block_managers_order() -> None:
    """attention_probe's `pool` and `prompt_blocks` (bench.attention_pdl_gap's engine-like
    tables): the tables index a pool larger than the sequences' blocks, handed out as the
    block manager does or at random, and every variant still computes the engine's tile's
    attention (none failed); the floor stays the keys' bytes, not the pool's."""
    pytest.importorskip("triton")
    from replicas.bench import attention_probe

    def timer(fn: Any, copies: list[Any]) -> float:
        fn(copies[-1])
        return 1.0

    shape = {"heads": 4, "kv_heads": 2, "d": 16, "rotary_dim": 8, "block_size": 4}
    plain = list(attention_probe([(2, 12)], "cpu", timer, 1.0, tiles=[(16, 4)],
                                 cache_dtypes=("float16",), dtype=torch.float16, **shape))
    for prompt_blocks in (2, 0):
        row, = attention_probe([(2, 12)], "cpu", timer, 1.0, tiles=[(16, 4)],
                               cache_dtypes=("float16",), dtype=torch.float16, pool=40,
                               prompt_blocks=prompt_blocks, **shape)
        assert not row["failed"] and len(row["times_us"]) == 2, row
        assert row["floor_us"] == plain[0]["floor_us"]


def test_wide_tile_search_ab_tests_the_fastest_candidate_that_clearly_wins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.84's search: per cache, the fastest candidate at 256 x 192 goes to the
    engine A/B (as TPSERVE_WIDE_DECODE_TILES writes a tile, in the cache's mode) only
    when it takes under `least` of the engine tile's time; the probe's rows come first."""
    from replicas import bench

    calls: list[tuple[Any, ...]] = []

    def probe(cases: Any, device: str, timer: Any, bandwidth: float, tiles: Any,
              cache_dtypes: Any) -> Any:
        cache, = cache_dtypes
        for seqs, keys in cases:  # int8: a clear winner; bf16: 2 % only
            best = 0.7 if cache == "int8" else 0.98
            times = {"engine": 10.0, **{bench._tile_name(t, 1): 10.0 for t in tiles}}
            times[bench._tile_name(tiles[1], 1)] = 10.0 * best
            yield {"case": f"x_{cache}_{seqs}x{keys}", "ours": 10.0, "engine_splits": 1,
                   "times_us": times}

    monkeypatch.setattr(bench, "attention_probe", probe)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 1.0)
    monkeypatch.setattr(bench, "decode_tile_ab", lambda rounds, switches, modes: calls.append(
        (rounds, switches, modes)) or iter([{"case": "ab"}]))
    rows = list(bench.wide_tile_search(rounds=2, caches=("bfloat16", "int8")))
    assert [r["case"] for r in rows] == ["x_bfloat16_256x192", "x_bfloat16_256x1024",
                                        "x_int8_256x192", "x_int8_256x1024", "ab"]
    winner = ",".join(map(str, bench.WIDE_TILE_CANDIDATES["int8"][1]))
    assert calls == [(2, ("1", winner), ("fp8-w8a8-keepqkv_int8kv",))]
    calls.clear()
    assert len(list(bench.wide_tile_search(caches=("int8",), ab=()))) == 2 and not calls


def test_a_modes_settings_come_from_its_fp8_modes_entry() -> None:
    """The A/Bs' modes by their rows' names (decode_tile_ab, decode_gaps): bf16 none, an
    FP8 mode its FP8_MODES entry's settings, and an unknown name an error naming them."""
    from replicas.bench import _mode_settings

    assert _mode_settings("bf16") == {}
    assert _mode_settings("fp8-w8a8-keepqkv_int8kv") == {
        "quantization": "fp8-w8a8", "kv_cache_dtype": "int8", "keep_16bit": "qkv_proj"}
    assert _mode_settings("fp8-w8a8-keepqkv") == {  # (the 16-bit cache, PERF.md v1.07)
        "quantization": "fp8-w8a8", "kv_cache_dtype": "auto", "keep_16bit": "qkv_proj"}
    with pytest.raises(ValueError, match="fp8-w8a8-gateup_int8kv"):
        _mode_settings("fp8-w8a8-gateup")


def test_an_ab_reverses_its_arms_every_other_round() -> None:
    """The A/Bs in one process (w8a8_fold_ab, decode_tile_ab, swiglu_epilogue_ab,
    gemv_trials_ab) run every arm each round, round 1 in the reverse order of round 0."""
    from replicas.bench import _turn_order

    orders = [list(_turn_order(("with", "without"), turn)) for turn in range(3)]
    assert orders == [["with", "without"], ["without", "with"], ["with", "without"]]
    assert list(_turn_order(("1", "64,4,1,1"), 1)) == ["64,4,1,1", "1"]


def test_the_gemv_trials_ab_runs_the_engine_with_and_without_the_winners(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.gemv_trials_ab's arms: "with" picks among all of FP8_GEMV_CONFIGS, "without"
    among them less GEMV_TRIAL_WINNERS (each winner is among the configs), each arm an
    FP8 batch-1 engine; the module's configs are whole again afterwards."""
    import importlib

    from replicas import bench

    gemv_module = importlib.import_module("replicas.kernels.gemv")
    every = gemv_module.FP8_GEMV_CONFIGS
    assert set(bench.GEMV_TRIAL_WINNERS) <= set(every)
    seen: list[tuple[tuple[int, ...], ...]] = []

    def decode(config: Any, prompt: list[list[int]]) -> tuple[float, float, dict[Any, Any]]:
        assert (config.quantization, config.max_num_seqs, len(prompt)) == ("fp8", 1, 1)
        seen.append(gemv_module.FP8_GEMV_CONFIGS)
        return 3.0, 2.9, {}

    monkeypatch.setattr(bench, "_b1_decode", decode)
    rows = list(bench.gemv_trials_ab(rounds=2))
    assert [r["trial_winners"] for r in rows] == [True, False, False, True]
    assert seen[0] == every and seen[3] == every
    assert seen[1] == seen[2] == tuple(c for c in every if c not in bench.GEMV_TRIAL_WINNERS)
    assert len(seen[1]) == len(every) - len(bench.GEMV_TRIAL_WINNERS)
    assert gemv_module.FP8_GEMV_CONFIGS == every


def fake_b1_engines(monkeypatch: pytest.MonkeyPatch,
                    made: Callable[[Any], dict[str, Any]],
                    tokens: Callable[[], list[Any]]) -> None:
    """bench's batch-1 A/Bs on CPU: each Engine a stand-in that calls `made(config)` as it
    starts (its GEMV report what that returns) and answers `tokens()` for 8 greedy
    tokens; 3.0 ms a token; the profiler records nothing."""
    from replicas import bench

    class FakeEngine:
        def __init__(self, config: Any) -> None:
            self.worker = SimpleNamespace(gemv_report=made(config))

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def generate(self, prompts: Any, params: Any) -> list[Any]:
            assert params.max_tokens == 8 and params.greedy
            return [SimpleNamespace(token_ids=tokens())]

    monkeypatch.setattr(bench, "Engine", FakeEngine)
    monkeypatch.setattr(bench, "ours_per_token", lambda *a: 0.003)
    fake_profiler(monkeypatch)


def fake_profiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.profiler.profile as a stand-in that records nothing (a CPU build refuses
    CUDA activities)."""
    import contextlib

    import torch.profiler

    class FakeProfile(contextlib.nullcontext):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(self)

        def events(self) -> list[Any]:
            return []

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)


def test_the_b1_kernels_ab_profiles_each_arm_and_leaves_the_configs_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.b1_kernels_ab's arms: the engine's FP8 GEMV picks among FP8_GEMV_CONFIGS as
    they are, then with `extra` too; an FP8 batch-1 engine each, its tokens under the
    profiler; a row each, the second with the share of its tokens the first's match; the
    module's configs as they were afterwards. b1_head_ab's: the 16-bit head, then the FP8
    head (fp8_lm_head)."""
    import importlib

    from replicas import bench

    gemv_module = importlib.import_module("replicas.kernels.gemv")
    every = gemv_module.FP8_GEMV_CONFIGS
    seen: list[tuple[Any, ...]] = []
    heads: list[int] = []

    def made(config: Any) -> dict[str, Any]:
        assert (config.quantization, config.kv_cache_dtype, config.max_num_seqs) == (
            "fp8", "fp8", 1)
        seen.append(gemv_module.FP8_GEMV_CONFIGS)
        heads.append(config.lm_head_candidates())
        return {"qkv": {"chosen": "(1,)"}}

    # each later engine's tokens differ from the first's at one of the eight
    fake_b1_engines(monkeypatch, made, lambda: [len(seen) > 1, *range(7)])
    extra = ((8, 2048, 4, 3, 96, 1),)
    rows = list(bench.b1_kernels_ab(extra, tokens=8))
    assert [r["case"] for r in rows] == ["glm4-9b_fp8_decode_b1_kernels_picks",
                                         "glm4-9b_fp8_decode_b1_kernels_picks_extra"]
    assert seen == [every, every + extra]
    assert rows[0]["ours"] == 3.0 and rows[0]["picks"] == {"qkv": "(1,)"}
    assert "agree" not in rows[0] and rows[1]["agree"] == 0.875
    assert gemv_module.FP8_GEMV_CONFIGS == every
    seen.clear()  # with no extra configs, the picks alone
    assert len(list(bench.b1_kernels_ab(tokens=8))) == 1 and seen == [every]
    seen.clear()
    heads.clear()
    rows = list(bench.b1_head_ab(12, tokens=8))
    assert [r["case"][-8:] for r in rows] == ["s_head16", "head_fp8"]
    assert heads == [0, 12] and seen == [every, every]
    assert [r["changes"] for r in rows] == [{"fp8_lm_head": 0}, {"fp8_lm_head": 12}]


def test_the_read_kernel_reads_every_word_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.stream.read_all (the read floor's kernel, in Triton's interpreter here):
    each program's sum is that of its own words, the last program's cut at the end, for
    every READ_CONFIGS entry; a buffer of odd bytes or a short `out` is refused."""
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    from replicas.kernels.stream import READ_CONFIGS, read_all, read_programs

    words = 5000  # not a multiple of any config's words a program: the last is cut
    values = torch.arange(1, words + 1, dtype=torch.int64) % 97
    data = values.view(torch.uint8)  # the kernel sees bytes, reads them as words
    for config in READ_CONFIGS:
        programs = read_programs(data.numel(), config)
        out = torch.full((programs + 1,), -1, dtype=torch.int64)
        read_all(data, out, config)
        each = config[0] * config[1]
        expected = [int(values[p * each:(p + 1) * each].sum()) for p in range(programs)]
        assert out[:programs].tolist() == expected, config
        assert out[programs] == -1  # no program beyond the buffer
    with pytest.raises(ValueError, match="8-byte words"):
        read_all(torch.zeros(12, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64),
                 READ_CONFIGS[0])
    with pytest.raises(ValueError, match="out needs"):
        read_all(data, torch.zeros(1, dtype=torch.int64), READ_CONFIGS[0])


def test_the_read_floor_times_every_config_on_each_weights_bytes() -> None:
    """bench.read_floor with the GPU timer stood in (each config's time its words a tile,
    so the widest wins): a row per weight, its bytes, every config timed on cold copies
    of a buffer that size, the fastest chosen and its TB/s from the bytes."""
    from replicas import bench
    from replicas.kernels.stream import READ_CONFIGS

    seen: list[tuple[str, int, int]] = []

    def timer(fn: Any, copies: list[torch.Tensor]) -> float:
        config = fn.keywords["config"]
        seen.append((str(config), len(copies), copies[0].numel()))
        return 100.0 / config[0]

    rows = list(bench.read_floor({"a": 4096, "b": 8 * 3000}, device="cpu", timer=timer))
    assert [r["case"] for r in rows] == ["glm4-9b_read_floor_a", "glm4-9b_read_floor_b"]
    assert [r["bytes"] for r in rows] == [4096, 24000]
    assert len(seen) == 2 * len(READ_CONFIGS) and all(n >= 2 for _, n, _ in seen)
    widest = max(READ_CONFIGS, key=lambda c: c[0])
    assert rows[0]["config"] == str(widest) and rows[0]["ours"] == round(100 / widest[0], 2)
    assert set(rows[0]["times_us"]) == {str(c) for c in READ_CONFIGS}
    assert rows[1]["tb_s"] == round(24000 / (100 / widest[0]) / 1e6, 3)


def test_ncu_subjects_name_each_gemv_role_and_a_read_of_its_bytes() -> None:
    """NCU_S's subjects (bench.ncu_subject): beside the W8A8 step's kernels, a GEMV and a
    read of the same bytes for each role of batch-1 FP8 decode, each selected by its
    kernel's name; a name outside them is refused before any GPU work."""
    import re

    from replicas.bench import GEMV_ROLES, GEMV_SHAPES, NCU_SUBJECTS, ncu_subject

    assert set(GEMV_ROLES) == set(GEMV_SHAPES)
    for role in GEMV_ROLES:
        assert re.search(NCU_SUBJECTS[f"gemv_{role}"], "_gemv_kernel")
        assert re.search(NCU_SUBJECTS[f"read_{role}"], "_read_kernel")
    # the weight-only batch kernel at 256 rows beside cuBLAS's 16-bit matmul, one profile
    assert all(re.search(NCU_SUBJECTS["w8a16_gate_up"], kernel) for kernel in (
        "_w8a16_kernel", "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT"))
    for bad in ("gemv_mlp", "read", "attn"):
        with pytest.raises(ValueError, match="unknown ncu subject"):
            ncu_subject(bad)


def test_ncu_gemv_config_is_an_engines_pick_or_refused(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """$TPSERVE_NCU_GEMV_CONFIG: unset, the gemv subjects time their own pick (None);
    set, a GEMV config as an engine reports it, which must be one of the FP8 configs (a
    typo fails before any GPU work)."""
    from replicas.bench import ncu_gemv_config

    monkeypatch.delenv("TPSERVE_NCU_GEMV_CONFIG", raising=False)
    assert ncu_gemv_config() is None
    monkeypatch.setenv("TPSERVE_NCU_GEMV_CONFIG", "(4, 2048, 4, 3, 96, 1)")
    assert ncu_gemv_config() == (4, 2048, 4, 3, 96, 1)
    for bad in ("(4, 2048, 4, 3, 97, 1)", "[4, 2048, 4, 3, 96, 1]"):
        monkeypatch.setenv("TPSERVE_NCU_GEMV_CONFIG", bad)
        with pytest.raises(ValueError, match="not one of the FP8 GEMV configs"):
            ncu_gemv_config()


def test_lm_head_rows_probes_the_heads_shape_at_a_few_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.lm_head_rows: w8a16_probe on GLM-4-9B's LM head at 2 to 128 rows (or the
    rows asked), on the GPU's timer and measured copy rate."""
    from replicas import bench

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 3000.0)
    monkeypatch.setattr(bench, "w8a16_probe", lambda *a: calls.append(a) or [{"case": "x"}])
    assert list(bench.lm_head_rows()) == [{"case": "x"}]
    assert list(bench.lm_head_rows((16,))) == [{"case": "x"}]
    shapes, rows, device, _, rate = calls[0]
    assert shapes == {"lm_head": (151552, 4096)} and rows == (2, 4, 8, 16, 32, 64, 128)
    assert device == "cuda" and rate == 3000.0 and calls[1][1] == (16,)


def test_head_rows_ab_runs_an_engine_per_row_limit_and_compares_their_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.head_rows_ab (PERF.md v0.96): an FP8 engine (FP8 head) with
    parallel.FP8_HEAD_ROWS at 1, then at `rows`, set while it is built and runs and put
    back after; a row per batch each, and for the second engine the share of its greedy
    tokens that the first's match."""
    from replicas import bench, parallel

    before = parallel.FP8_HEAD_ROWS
    built: list[tuple[int, Any]] = []

    class FakeEngine:
        def __init__(self, config: Any) -> None:
            built.append((parallel.FP8_HEAD_ROWS, config))

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def generate(self, prompts: Any, params: Any) -> list[Any]:
            assert params.greedy and params.max_tokens == 4 and parallel.FP8_HEAD_ROWS > 0
            wrong = parallel.FP8_HEAD_ROWS > 1 and len(prompts) == 2  # one token differs
            return [SimpleNamespace(token_ids=[i, 7, 7, 9 if wrong and i == 0 else 8])
                    for i in range(len(prompts))]

    monkeypatch.setattr(bench, "Engine", FakeEngine)
    monkeypatch.setattr(bench, "ours_per_token", lambda e, p, n, r: len(p) / 1000)
    fake_profiler(monkeypatch)
    rows = list(bench.head_rows_ab((2, 3), rows=8, tokens=4))
    assert all(r["kernels"]["top"] == [] for r in rows)
    assert [r["case"] for r in rows] == [f"glm4-9b_fp8_decode_b{b}_head_rows{n}"
                                         for n in (1, 8) for b in (2, 3)]
    assert [r["ours"] for r in rows] == [2.0, 3.0, 2.0, 3.0]
    assert "agree" not in rows[0] and [r["agree"] for r in rows[2:]] == [0.875, 1.0]
    assert [n for n, _ in built] == [1, 8] and parallel.FP8_HEAD_ROWS == before
    config = built[0][1]
    assert config.max_num_seqs == 3 and config.quantization == "fp8"
    assert config.fp8_lm_head == 16 and config.kv_cache_dtype == "fp8"


def test_device_engine_steps_call_functions_the_bench_has() -> None:
    """Each `bench_rows SECONDS NAME` step of infra/device_engine.sh names a function of
    replicas.bench (a renamed one would fail on the device, after minutes of device
    time), and each step's bound is a variable of its own."""
    import re

    from replicas import bench

    script = (Path(__file__).parents[1] / "infra" / "device_engine.sh").read_text()
    steps = re.findall(r'bench_rows "\$(\w+)" (\w+)', script)
    assert len(steps) >= 13
    for bound, name in steps:
        assert callable(getattr(bench, name, None)), name
        assert re.search(rf'"\${{{bound}:-0}}" != 0', script), bound


def test_quant_warps_ab_runs_the_modes_named_and_refuses_an_unknown_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.quant_warps_ab (PERF.md v1.05) A/Bs $TPSERVE_QUANT_WARPS at 0 (the rule) and
    `warps` in the 256-request runs of the modes it is given, each engine under its
    value (the caller's environment back after); a mode name FP8_MODES lacks fails before
    any engine starts."""
    import os

    from replicas import bench

    ran: list[tuple[str, str | None]] = []

    def run_in(config: Any, mode: Any, context: Any) -> tuple[dict[str, str], dict[str, Any]]:
        with context:
            ran.append((mode[3], os.environ.get("TPSERVE_QUANT_WARPS")))
        return {}, {"ours": 1.0}

    monkeypatch.delenv("TPSERVE_QUANT_WARPS", raising=False)
    monkeypatch.setattr(bench, "_glm_config", lambda: None)
    monkeypatch.setattr(bench, "_run_256_in", run_in)
    rows = list(bench.quant_warps_ab(32, batches=(),
                                     modes=("fp8-w8a8-keepqkv", "fp8")))
    assert ran == [("fp8", "0"), ("fp8", "32"), ("fp8-w8a8-keepqkv", "0"),
                   ("fp8-w8a8-keepqkv", "32")]  # (FP8_MODES' order)
    assert [r["case"] for r in rows][-1] == (
        "glm4-9b_fp8-w8a8-keepqkv_256req_in128_out128_quant_warps_32")
    assert "TPSERVE_QUANT_WARPS" not in os.environ
    ran.clear()
    with pytest.raises(ValueError, match="unknown modes \\['keepqkv'\\]"):
        list(bench.quant_warps_ab(32, batches=(), modes=("fp8", "keepqkv")))
    assert not ran


def test_two_terms_next_ab_sets_each_arms_switches_as_its_engine_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.two_terms_next_ab (PERF.md v1.04 + v1.06): each arm's engine, decode and 256
    requests alike, runs under its own TPSERVE_FP8_TWO_TERMS_FOLD and _NORM (set as it
    starts: arms made up front must not leave the last one's settings on all), and the
    caller's environment is back after."""
    import os

    from replicas import bench

    seen: list[tuple[str, str | None, str | None]] = []

    def record(name: str) -> None:
        seen.append((name, os.environ.get("TPSERVE_FP8_TWO_TERMS_FOLD"),
                     os.environ.get("TPSERVE_FP8_TWO_TERMS_NORM")))

    def batch_arms(arms: dict[str, Any], *_: Any) -> Iterator[dict[str, Any]]:
        for name, (patch, _fields) in arms.items():
            with patch:
                record(name)
            yield {}

    def runs_256(rounds: int, modes: Any, values: Any, label: str,
                 context_of: Any) -> Iterator[dict[str, Any]]:
        for value in values:
            with context_of(value):
                record(value)
            yield {}

    for name in ("TPSERVE_FP8_TWO_TERMS_FOLD", "TPSERVE_FP8_TWO_TERMS_NORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bench, "_fp8_batch_arms", batch_arms)
    monkeypatch.setattr(bench, "_256_ab", runs_256)
    list(bench.two_terms_next_ab())
    arms = [(a, fold, norm) for a, fold, norm in bench.TWO_TERMS_NEXT_ARMS]
    assert seen == [(f"two_terms_{a}", f, n) for a, f, n in arms] + arms
    assert "TPSERVE_FP8_TWO_TERMS_FOLD" not in os.environ
    assert "TPSERVE_FP8_TWO_TERMS_NORM" not in os.environ
