"""Engine benchmarks: `python -m replicas.bench [--suite cpu] [--out FILE]`.

Each case prints one JSON line (and appends it to --out): our figure, transformers'
figure measured in the same run on the same shapes and tokens, their ratio, and the
hardware, versions and command. The CPU suite runs on the built-in tiny model; absolute
times there only say that the path works, the ratios say more. The GPU suite comes with
the GPU-speed issue; `--suite fp8` (issue 20) runs its GLM-4-9B bf16 rows and, in the
same call, the FP8 ones (weight-only and W8A8, FP8 KV cache) with each mode's accuracy
(replicas/accuracy.py); `--suite w8a16` times the FP8 weight-only batch matmul's configs
on GLM-4-9B's layer shapes.

`pinning_engine` is the engine-alone side of the pinning payoff: multi-turn chats, each
turn's TTFT with the previous turn cached and with nothing cached (`python -m infra.load
--mode pinning-engine` runs it and writes its row with the stack's).

Decode time per token is (time of N new tokens - time of 1 new token) / (N - 1), so
prefill and start-up cancel out, for both engines alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from replicas import Engine, EngineConfig, SamplingParams
from replicas.jsonlines import emit
from replicas.tiny import tiny_model_dir


def environment(module: str = "replicas.bench") -> dict[str, Any]:
    """Where a row was measured: hardware, versions, and the command (`python -m module`
    with this process's arguments)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hardware": {"cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "gpu": gpu,
                     "gpus": torch.cuda.device_count() if gpu else 0},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        # file arguments by name only: no machine's paths in committed results
        "command": " ".join([f"python -m {module}",
                             *(os.path.basename(a) if os.sep in a else a for a in sys.argv[1:])]),
    }


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one run of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` runs, in seconds."""
    return min(seconds(fn) for _ in range(repeats))


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def ours_per_token(engine: Engine, prompts: list[list[int]], new: int, repeats: int) -> float:
    """Seconds per decoded token as a streaming client sees them (TPOT): from each
    request's first token to its last, over new - 1 tokens, averaged over the requests;
    fastest of `repeats` runs. The prefill is not in it: T(new) - T(1), as for
    transformers, carried the prefill's host-launch jitter (12.6 to 25 ms for the same
    prompt on the H200) into every batch-1 figure, +-0.09 ms per token.

    A run in which some request's tokens all came in one delta (its client starved
    while the engine decoded: CI once read 0.0 ms/token so) measures nothing and is run
    again, up to `repeats` + 4 runs; RuntimeError if no run could be measured."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

    async def stream(prompt: list[int]) -> float | None:
        arrivals = []
        async for delta in engine.add_request(prompt, params):
            arrivals += [time.perf_counter()] * len(delta.token_ids)
        spread = arrivals[-1] - arrivals[0]
        return spread / (len(arrivals) - 1) if spread > 0 else None

    async def run() -> float | None:
        per = await asyncio.gather(*(stream(p) for p in prompts))
        return None if None in per else sum(v for v in per if v is not None) / len(per)

    measured: list[float] = []
    for _ in range(repeats + 4):
        got = asyncio.run(run())
        if got is not None:
            measured.append(got)
        if len(measured) == repeats:
            break
    if not measured:
        raise RuntimeError(f"no run of {repeats + 4} had its tokens in more than one delta "
                           "per request: time per token not measurable")
    return min(measured)


def by_difference(run: Callable[[int], Callable[[], object]], new: int, repeats: int
                  ) -> float:
    """(T(new) - T(1)) / (new - 1) seconds per token, fastest runs of `run(n)`, a
    generation of n tokens."""
    return (best_of(run(new), repeats) - best_of(run(1), repeats)) / (new - 1)


def ours_by_difference(engine: Engine, prompts: list[list[int]], new: int,
                       repeats: int) -> float:
    """transformers' method on our engine, kept for the record beside the streaming
    figure."""
    def run(n: int) -> Callable[[], object]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return lambda: engine.generate(prompts, params)

    return by_difference(run, new, repeats)


def hf_per_token(model: Any, prompts: list[list[int]], new: int, repeats: int) -> float:
    ids = torch.tensor(prompts, device=model.device)  # equal lengths: no padding needed

    def run(n: int) -> Callable[[], object]:
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)

    return by_difference(run, new, repeats)


def cpu_suite(repeats: int) -> list[dict[str, Any]]:
    model_dir = tiny_model_dir()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for tp in (1, 2):
        with Engine(EngineConfig(model=model_dir, tp=tp)) as engine:
            vocab = engine.spec.vocab_size
            for batch, prompt_len, new in ((1, 128, 64), (16, 128, 32)):
                prompts = prompts_for(batch, prompt_len, vocab)
                ours = ours_per_token(engine, prompts, new, repeats)
                theirs = hf_per_token(hf, prompts, new, repeats) if tp == 1 else None
                rows.append(_row(f"decode_b{batch}_in{prompt_len}_tp{tp}", "ms/token", ours,
                                 theirs, batch=batch, prompt_len=prompt_len, new_tokens=new,
                                 tp=tp))
            prompts = prompts_for(64, 32, vocab)
            params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
            wall = best_of(lambda e=engine, p=params, q=prompts: e.generate(q, p), repeats)
            rows.append({"case": f"throughput_64req_in32_out32_tp{tp}", "unit": "tokens/s",
                         "ours": round(64 * 32 / wall, 1), "tp": tp})
    return rows


GLM4_9B = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696,
               num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
               max_position_embeddings=8192 + 512, attention_bias=True)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, max_position_embeddings=8192,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
# one rank's share of GLM-4-9B at tp=2 (half the heads, KV heads and MLP; the whole
# vocabulary, as the gathered logits have it), run whole on one GPU: a tp=2 rank's GPU
# work without its all-reduces, for host-side probes when only one GPU is at hand
GLM4_9B_RANK_OF_2 = {**GLM4_9B, "num_attention_heads": 16, "num_key_value_heads": 1,
                     "intermediate_size": 13696 // 2}
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {  # name: (transformers config class, shapes)
    "glm4-9b": ("GlmConfig", GLM4_9B), "llama3-8b": ("LlamaConfig", LLAMA3_8B),
    "glm4-9b-rank-of-2": ("GlmConfig", GLM4_9B_RANK_OF_2)}


def hf_config(name: str) -> Any:
    cls, shapes = SHAPES[name]
    config = getattr(transformers, cls)(**shapes)
    config.architectures = [cls.replace("Config", "ForCausalLM")]
    config.eos_token_id = None
    return config


def copy_bandwidth() -> float:
    """Measured device-to-device copy rate, GB/s (read + write), as the anchors do."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() / ((time.perf_counter() - start) / 20) / 1e9


def matmul_rate() -> float:
    """bf16 matrix product rate on random data, TFLOP/s (8192^3)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 / ((time.perf_counter() - start) / 10) / 1e12


def graph_step_ms(engine: Engine) -> float:
    """GPU time of one captured batch-1 decode step alone (CUDA events, 50 replays, every
    rank replaying together): the difference to the measured ms/token is host work
    between steps."""
    return engine.replay_graph_ms(50)


def device_wait_ms(engine: Engine, prompts: list[list[int]], new: int) -> float:
    """ms per decoded token that the driver waited for the GPU's tokens: near the step
    time when the GPU is the bottleneck, near 0 when the host is (the GPU then idles)."""
    before = engine.stats()["device_wait_s"]
    engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    return (engine.stats()["device_wait_s"] - before) / new * 1e3


def model_dir(name: str) -> str:
    """A model directory with the config of `name` in SHAPES (weights random:
    load_format='random')."""
    import tempfile

    from replicas.tiny import build_tokenizer

    path = tempfile.mkdtemp(prefix=f"tpserve-{name}-")
    hf_config(name).save_pretrained(path)
    build_tokenizer(path)
    return path


def read_bytes(engine: Engine) -> int:
    """Weight bytes a decode step reads: all but the embedding (one row is gathered), FP8
    layers' scales included; an FP8 LM head's FP8 rows, not the 16-bit ones it keeps
    (a batch-1 step reads C of them)."""
    model = engine.worker.model
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers()
                                            if n.endswith("weight_scale"))]
    return sum(t.numel() * t.element_size() for n, t in tensors if "embed_tokens" not in n)


# The floors' weight bytes as the issue's table states them: GLM-4-9B's bytes read per
# step (the embedding left out), Llama-3-8B's all weights (its embedding, 1.05 GB, counted)
ISSUE_FLOOR_BYTES = {"glm4-9b": 17.56e9, "llama3-8b": 16.06e9}


def decode_row(name: str, engine: Engine, bandwidth: float, repeats: int) -> dict[str, Any]:
    """Batch 1, 128-token prompt, 128 new tokens: ms per decoded token against the
    bandwidth floor of the bytes a step reads (and of the issue's stated bytes)."""
    weights = read_bytes(engine)
    floor, stated = weights / (bandwidth * 1e9), ISSUE_FLOOR_BYTES[name] / (bandwidth * 1e9)
    prompt = prompts_for(1, 128, SHAPES[name][1]["vocab_size"])
    ours = ours_per_token(engine, prompt, 128, repeats)
    return {"case": f"{name}_decode_b1_in128_out128", "unit": "ms/token",
            "ours": round(ours * 1e3, 3), "floor_ms": round(floor * 1e3, 3),
            "fraction_of_floor": round(floor / ours, 3), "weights_gb": round(weights / 1e9, 2),
            "issue_floor_ms": round(stated * 1e3, 3),
            "fraction_of_issue_floor": round(stated / ours, 3), "copy_gb_s": round(bandwidth),
            "graph_replay_ms": round(graph_step_ms(engine), 3),
            "ms_by_difference": round(ours_by_difference(engine, prompt, 128, repeats) * 1e3, 3),
            "device_wait_ms": round(device_wait_ms(engine, prompt, 128), 3),
            "gemv_us": engine.worker.gemv_report}


def gpu_suite(repeats: int) -> list[dict[str, Any]]:
    """GLM-4-9B shapes, random bf16 weights, one GPU: ours and transformers side by side."""
    bandwidth = copy_bandwidth()
    rows, config, _, _ = _glm_rows(repeats, bandwidth)
    llama = dataclasses.replace(config, model=model_dir("llama3-8b"), max_num_seqs=1)
    with Engine(llama) as engine:
        rows.append(decode_row("llama3-8b", engine, bandwidth, repeats))
    torch.cuda.empty_cache()
    _hf_side_by_side(rows, repeats)
    return rows


def fp8_suite(repeats: int) -> Iterator[dict[str, Any]]:
    """Issue 20: the GLM-4-9B bf16 rows and, in the same call, the FP8 ones, each row as
    soon as it is measured: each FP8 mode in a process of its own (`fp8_mode_process`),
    as an engine runs in its own (PyTorch reads settings such as a W8A8 engine's
    cuBLASLt workspace once a process, PERF.md v0.79), then the accuracy rows."""
    modes = fp8_modes()  # (an unknown $TPSERVE_FP8_MODES name fails here, before bf16's)
    bandwidth = copy_bandwidth()
    rows, _, _, bf16_blocks = _glm_rows(repeats, bandwidth)
    yield from rows
    for mode in modes:
        yield from fp8_mode_process(mode[3], repeats, bandwidth, bf16_blocks)
    yield from accuracy_rows()


def fp8_mode_process(name: str, repeats: int, bandwidth: float, bf16_blocks: int,
                     command: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """fp8_rows of the one FP8 mode `name` (without the accuracy rows) in a child
    process, each of its rows as the child prints it (its other output passes through);
    a child that fails raises, naming the mode, after the rows it gave. `command`: the
    child's (a test's stand-in)."""
    import subprocess
    import sys

    command = command or [sys.executable, "-c", (
        "import json, sys\n"
        "from replicas.bench import fp8_mode_child\n"
        "for row in fp8_mode_child(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), "
        "int(sys.argv[4])):\n"
        "    print('FP8ROW ' + json.dumps(row), flush=True)"),
        name, str(repeats), repr(bandwidth), str(bf16_blocks)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("FP8ROW "):
                yield json.loads(line.removeprefix("FP8ROW "))
            else:
                sys.stdout.write(line)
    if child.returncode:
        raise RuntimeError(f"the fp8 suite's mode {name!r} failed in its process "
                           f"(exit {child.returncode})")


def fp8_mode_child(name: str, repeats: int, bandwidth: float, bf16_blocks: int
                   ) -> Iterator[dict[str, Any]]:
    """fp8_mode_process's child: fp8_rows of mode `name` alone, no accuracy rows."""
    config = _glm_config()
    yield from fp8_rows(config, _long_config(config), bandwidth, repeats, bf16_blocks,
                        modes=fp8_modes_named([name]), accuracy=False)


def _glm_config() -> EngineConfig:
    """GLM-4-9B shapes, random bf16 weights, as the suites' decode and 256-request rows
    run them (512-token sequences, 256 at once, a 16 GiB KV pool)."""
    return EngineConfig(model=model_dir("glm4-9b"), load_format="random", dtype="bfloat16",
                        max_model_len=512, max_num_seqs=256, max_num_batched_tokens=8192,
                        kv_cache_memory=16 * 2**30)


def _glm_rows(repeats: int, bandwidth: float
              ) -> tuple[list[dict[str, Any]], EngineConfig, EngineConfig, int]:
    """GLM-4-9B shapes in bf16: batch-1 decode, 256 x 128/128, the 8192-token TTFT; and
    the configs they ran with and the KV pool's blocks (the FP8 rows' baseline)."""
    rate = matmul_rate()
    rows: list[dict[str, Any]] = []
    config = _glm_config()
    with Engine(config) as engine:
        weights = read_bytes(engine)
        bf16_blocks = engine.stats()["num_kv_blocks"]
        b1 = decode_row("glm4-9b", engine, bandwidth, repeats)
        run_256 = _run_256(engine, repeats)
        peak = torch.cuda.max_memory_allocated() / 1e9
    rows.append({**b1, "peak_mem_gb": round(peak, 1)})
    rows.append({"case": "glm4-9b_256req_in128_out128", "unit": "tokens/s", **run_256,
                 "peak_mem_gb": round(peak, 1)})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    long_config = _long_config(config)
    with Engine(long_config) as engine:
        ttft = _ttft_8192(engine, repeats, iter(range(1, 100)))
        kernels = _ttft_kernels(engine, 100)
        flops = 2 * (weights // 2) * 8192  # 2 FLOPs per bf16 weight per token
    rows.append({"case": "glm4-9b_ttft_in8192", "unit": "ms", "ours": round(ttft * 1e3, 1),
                 "matmul_floor_ms": round(flops / (rate * 1e12) * 1e3, 1),
                 "ratio_to_floor": round(ttft / (flops / (rate * 1e12)), 2),
                 "bf16_tflops": round(rate), "kernels": kernels})
    torch.cuda.empty_cache()
    return rows, config, long_config, bf16_blocks


def _run_256(engine: Engine, repeats: int) -> dict[str, Any]:
    """256 requests of 128 tokens out on 128-token prompts (GLM-4-9B's vocabulary), in
    steady state (a short run first compiles what the batch shape needs): output tok/s
    with each run on prompts of its own, their prefill computed, as a client's new prompts
    are and as transformers computes them (`ours`); the warm-up's prompts again, their
    prefill served from the prefix cache, as this was measured until v0.30
    (`ours_prompts_cached`); and one more run of new prompts under the profiler
    (`kernels`: where its GPU time goes)."""
    vocab = GLM4_9B["vocab_size"]
    batches = [prompts_for(256, 128, vocab, seed=seed) for seed in range(repeats + 2)]
    engine.generate(batches[0], SamplingParams(max_tokens=4, temperature=0.0,
                                               ignore_eos=True))
    greedy = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    fresh = iter(batches[1:-1])
    new = best_of(lambda: engine.generate(next(fresh), greedy), repeats)
    cached = best_of(lambda: engine.generate(batches[0], greedy), repeats)
    try:  # (a first profile of decode's graphs: a failure is recorded, not fatal)
        kernels = run_kernels(engine, batches[-1], top=16, tokens=128)
    except Exception as e:  # noqa: BLE001 - the profiler's errors vary
        kernels = {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"ours": round(256 * 128 / new, 1),
            "ours_prompts_cached": round(256 * 128 / cached, 1), "kernels": kernels}


def kernel_table(prof: Any, steps: int, top: int) -> dict[str, Any]:
    """GPU kernels of a profile by name: calls and µs per step, the largest own time
    first. `us` is each kernel's span, start to end; `own_us` leaves out the part of it
    that an earlier kernel on its GPU still ran. Under programmatic dependent launch a
    kernel starts while the one before it runs and waits for it, so its span holds that
    wait: an RMSNorm after the FP8 batch matmul spanned 105 µs a call where its own time
    is a few (PERF.md v0.36). `busy_us`: the GPU time no two kernels share (the own
    times' sum), against `kernels_us`, the spans' sum."""
    spans: dict[str, list[float]] = {}
    own: dict[str, float] = {}
    for events in gpu_timelines(prof).values():
        for event in events:
            spans.setdefault(event.name, []).append(event.time_range.elapsed_us())
        for event, mine in _own_times(events):
            own[event.name] = own.get(event.name, 0.0) + mine
    rows = sorted(((k[:90], len(v) / steps, sum(v) / steps, own[k] / steps)
                   for k, v in spans.items()), key=lambda r: -r[3])
    return {"kernels_us": round(sum(r[2] for r in rows), 1),
            "busy_us": round(sum(r[3] for r in rows), 1),
            "kernel_calls": round(sum(r[1] for r in rows), 1),
            "top": [{"name": n, "calls": round(c, 1), "us": round(t, 1),
                     "own_us": round(o, 1)} for n, c, t, o in rows[:top]]}


def gpu_timelines(prof: Any) -> dict[int, list[Any]]:
    """A profile's GPU events (kernels, copies, memsets) by the GPU they ran on, each
    GPU's in the profile's order."""
    by_device: dict[int, list[Any]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            by_device.setdefault(getattr(event, "device_index", 0), []).append(event)
    return by_device


def _own_times(events: list[Any]) -> list[tuple[Any, float]]:
    """One GPU's kernels in start order, each with its own time: its span less the part
    that an earlier kernel still ran (kernel_table's `own_us`)."""
    reached, owned = -math.inf, []
    for event in sorted(events, key=lambda e: e.time_range.start):
        start, end = event.time_range.start, event.time_range.end
        owned.append((event, max(0.0, end - max(start, reached))))
        reached = max(reached, end)
    return owned


# a decode step's GEMVs at tp=1, as a decoder layer runs them: qkv (the norm fused in)
# before attention; after it o, gate_up (SwiGLU fused in), down, then the next layer's qkv;
# after the last layer's down the final norm (a kernel of its own), then the LM head alone
# before the argmax
GEMV_AFTER_ATTENTION = ("o", "gate_up", "down")


def gemv_roles(prof: Any, steps: int, gemv: str = "_gemv_kernel",
               attention: str = "_decode_kernel", argmax: str = "_argmax_part_kernel",
               norm: str = "_rms_norm_kernel") -> dict[str, dict[str, float]]:
    """The GEMVs of a profile of decode steps split by the weight each reads, from where
    each sits (they share a kernel's name): the run of GEMVs after an attention kernel is
    o, gate_up, down, then qkv where another attention follows the run (the last layer's
    run stops at down); a lone GEMV before an attention (the first layer's) is qkv, one
    after the final norm or before the argmax the LM head (a prefill's too: its last
    token's); any other run is "other". Calls, span and own time (as kernel_table's) per
    step, by role."""
    roles: dict[str, list[float]] = {}

    def add(role: str, event: Any, own: float) -> None:
        calls, span, owned = roles.setdefault(role, [0.0, 0.0, 0.0])
        roles[role] = [calls + 1, span + event.time_range.elapsed_us(), owned + own]

    for events in gpu_timelines(prof).values():
        owned = _own_times(events)
        i = 0
        while i < len(owned):
            if owned[i][0].name != gemv:
                i += 1
                continue
            j = i
            while j < len(owned) and owned[j][0].name == gemv:
                j += 1  # owned[i:j]: a run of GEMVs
            before = owned[i - 1][0].name if i else ""
            after = owned[j][0].name if j < len(owned) else ""
            run = owned[i:j]
            if before == attention and len(run) == 4 and after == attention:
                names = [*GEMV_AFTER_ATTENTION, "qkv"]
            elif before == attention and len(run) == 3:
                names = list(GEMV_AFTER_ATTENTION)
            elif len(run) == 1 and after == attention:
                names = ["qkv"]
            elif len(run) == 1 and (after == argmax or before == norm):
                names = ["lm_head"]
            else:
                names = ["other"] * len(run)
            for name, (event, own) in zip(names, run, strict=True):
                add(name, event, own)
            i = j
    return {role: {"calls": round(c / steps, 1), "us": round(t / steps, 1),
                   "own_us": round(o / steps, 1)} for role, (c, t, o) in sorted(roles.items())}


def run_kernels(engine: Engine, prompts: list[list[int]], top: int = 12, tokens: int = 1
                ) -> dict[str, Any]:
    """Where a run's GPU time goes: `prompts` (new to the prefix cache) generating
    `tokens` tokens each (1: their prefill alone) under PyTorch's profiler, kernels
    grouped by name (`kernel_table`, totals of the run), with the wall time, which against
    the kernels' says whether the host or the GPU sets the pace."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = seconds(lambda: engine.generate(prompts, params))
    return {"wall_ms": round(wall * 1e3, 2), **kernel_table(prof, 1, top)}


def _ttft_kernels(engine: Engine, seed: int) -> dict[str, Any]:
    """run_kernels of one more 8192-token prompt's prefill (seed `seed`), as _ttft_8192
    runs."""
    return run_kernels(engine, prompts_for(1, 8192, GLM4_9B["vocab_size"], seed=seed))


def _ttft_8192(engine: Engine, repeats: int, seeds: Iterator[int]) -> float:
    """Seconds to the first token of an 8192-token prompt: a new prompt each time (from
    the next of `seeds`), as a repeated one would be served from the prefix cache; one
    untimed first, which compiles what the prefill needs (with --repeats 1 the timed
    one was that first: 1.9 s against 0.27 on the H200, PERF.md v0.30); then the best of
    at least 3, whatever `repeats` (one prefill is ~0.2 s; a single timed one read 208 ms
    where its profiled twin took 188, PERF.md v0.40)."""
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def prefill() -> None:
        engine.generate(prompts_for(1, 8192, GLM4_9B["vocab_size"], seed=next(seeds)), one)

    prefill()
    return best_of(prefill, max(repeats, 3))


def _long_config(config: EngineConfig) -> EngineConfig:
    """The 8192-token TTFT's engine: one sequence of 8192 tokens, no CUDA graphs."""
    return dataclasses.replace(config, max_model_len=8192 + 64, max_num_seqs=1,
                               max_num_batched_tokens=8192, cuda_graphs=False)


def fp8_rows(config: EngineConfig, long_config: EngineConfig, bandwidth: float,
             repeats: int, bf16_blocks: int,
             modes: Sequence[tuple[str, str, dict[str, str], str]] | None = None,
             accuracy: bool = True) -> Iterator[dict[str, Any]]:
    """Issue 20's cases with FP8 weights and FP8 KV cache, in the call of the bf16 rows:
    batch-1 decode against the floor of the bytes an FP8 step reads, 256 x 128/128
    output tok/s and the 8192-token TTFT (weight-only FP8, and W8A8 on FP8 tensor
    cores), the KV pool's blocks in the same memory, and each mode's accuracy; each row
    as soon as it is measured (a call cut short keeps the rows before). `modes`: these
    (FP8_MODES' entries) instead of fp8_modes(); `accuracy` False: no accuracy rows."""
    fresh = iter(range(200, 300))  # prompt seeds: no prompt twice, none of the bf16 rows
    # (weights, KV cache, options, the name's suffix): the int8 cache (a scale per token and
    # head) is the one that holds the accuracy bar (PERF.md), its name gets "_int8kv";
    # "-gateup": W8A8 with qkv, o and down kept 16-bit, only gate_up on FP8 tensor cores,
    # over the bar on CPU and on the GPU with those weight-only (PERF.md v0.47, v0.50) and
    # nothing widened (v0.52); "-keepqkv": W8A8 with only qkv kept 16-bit (o, gate_up
    # and down on FP8 tensor cores, ~91 % of a layer's matmul FLOPs), over the bar on the
    # four 300-step CPU checkpoints with the int8 cache (v0.56). (W8A8 with qkv weight-only
    # and inputs in runs of 32 columns, "-qkv16-g32", ran until 2319b5c: its kernel is 3x
    # slower than `_scaled_mm`.)
    from replicas.kernels.fp8mm import fast_accum_on

    suite = [m[3] for m in fp8_modes()]  # (this suite run's modes, for the TTFT twins)
    for mode in fp8_modes() if modes is None else modes:
        quantization, kv, options, name = mode
        fp8 = _fp8_settings(mode)
        tags = {**fp8, **({"w8a8_fast_accum": fast_accum_on()}  # (an A/B switch, v0.82)
                          if quantization == "fp8-w8a8" else {})}
        with Engine(dataclasses.replace(config, **fp8)) as engine:
            # (batch 1 runs the same GEMV in both FP8 modes; -gateup and -keepqkv keep
            # some projections 16-bit)
            if quantization == "fp8" or options:
                b1 = decode_row("glm4-9b", engine, bandwidth, repeats)
                yield {**b1, "case": f"glm4-9b_{name}_decode_b1_in128_out128", **tags}
                blocks = engine.stats()["num_kv_blocks"]
                yield {"case": f"glm4-9b_{name}_kv_blocks_same_memory", "unit": "blocks",
                       "ours": blocks, "bf16": bf16_blocks,
                       "ratio": round(blocks / bf16_blocks, 3), **tags}
            run_256 = _run_256(engine, repeats)
        yield {"case": f"glm4-9b_{name}_256req_in128_out128", "unit": "tokens/s",
               **run_256, **tags}
        torch.cuda.empty_cache()
        if kv == "int8" and not options:  # (a prompt's prefill attends over its own
            continue                          # 16-bit keys: the cache changes nothing)
        if kv == "auto" and f"{name}_int8kv" in suite:
            continue  # (the same case, measured by its int8 twin in this suite's run)
        with Engine(dataclasses.replace(long_config, **fp8)) as engine:
            ttft = _ttft_8192(engine, repeats, fresh)
            kernels = _ttft_kernels(engine, next(fresh))
        yield {"case": f"glm4-9b_{name.removesuffix('_int8kv')}_ttft_in8192", "unit": "ms",
               "ours": round(ttft * 1e3, 1), **tags, "kernels": kernels}
        torch.cuda.empty_cache()
    if accuracy:
        yield from accuracy_rows()


def gpu_gaps(prof: Any, least_us: float = 2.0, top: int = 10) -> dict[str, Any]:
    """Where a profiled run's GPU sat idle: the stretches of at least `least_us` when no
    kernel, copy or memset ran, grouped by the kernels on either side (names cut to 60),
    the largest total first; `idle_us` sums them all, `gaps` counts them; each GPU's
    timeline on its own."""
    groups: dict[tuple[str, str], list[float]] = {}
    for events in gpu_timelines(prof).values():  # each GPU's idle time on its own
        reached, before = -math.inf, ""
        for event in sorted(events, key=lambda e: e.time_range.start):
            gap = event.time_range.start - reached
            if gap >= least_us and before:
                groups.setdefault((before, event.name[:60]), []).append(gap)
            if event.time_range.end > reached:
                reached, before = event.time_range.end, event.name[:60]
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    return {"idle_us": round(sum(sum(v) for v in groups.values()), 1),
            "gaps": sum(len(v) for v in groups.values()),
            "top": [{"after": a, "before": b, "count": len(v), "us": round(sum(v), 1),
                     "max_us": round(max(v), 1)} for (a, b), v in rows[:top]]}


# ncu_subject's kernels: each subject's name, and a regex of the kernels ncu profiles
# (and per role of batch-1 FP8 decode's GEMVs, its picked GEMV and a kernel that only
# reads the same bytes, PERF.md v0.91: what holds a GEMV back that a read does not)
GEMV_ROLES = ("qkv", "o", "gate_up", "down", "lm_head")
NCU_SUBJECTS = {"attention": "_decode_kernel", "swiglu_quant": "_silu_mul_quant_kernel",
                "gate_up_mm": "nvjet|gemm", "gemv": "_gemv",
                "w8a16_gate_up": "_w8a16_kernel|nvjet|gemm",
                **{f"gemv_{role}": "_gemv_kernel" for role in GEMV_ROLES},
                **{f"read_{role}": "_read_kernel" for role in GEMV_ROLES}}


def ncu_subject(name: str, calls: int = 2) -> None:
    """One kernel of a 256-request W8A8 decode step (or of batch-1 decode), at the
    engine's shape and config, for a hardware-counter profile (PERF.md v0.82's next
    call, `NCU_S` in infra/device_engine.sh, ncu --profile-from-start off): run once
    (compiled, picked, checked), then `calls` times between cudaProfilerStart and Stop.
    "attention" (256 sequences x 192 keys, the e4m3 cache, the engine's tile and splits),
    "swiglu_quant" (SwiGLU + the per-token quantization of 256 x 27,392), "gate_up_mm"
    (gate_up's `_scaled_mm` at 256 rows, `calls` times without fast accumulation, then
    `calls` times with it); "w8a16_gate_up" (gate_up's weight-only FP8 batch kernel at 256
    rows in the engine's config, then the 16-bit matmul on the same weight widened: why
    the kernel is 1.44x cuBLAS there, PERF.md's outcomes at 5791d5b); "gemv_ROLE" (ROLE
    of GEMV_ROLES: GLM-4-9B's FP8 GEMV at batch 1 in the kind the engine runs it,
    `_fp8_gemv_call`; "gemv" is o_proj's) and "read_ROLE"
    (its weight's bytes read by `kernels.stream`'s fastest config, as `read_floor` times
    them)."""
    from replicas import kernels
    from replicas.fp8 import quantize_rows

    if name not in NCU_SUBJECTS:
        raise ValueError(f"unknown ncu subject {name!r}: one of {', '.join(NCU_SUBJECTS)}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls_of: Callable[[], Any]
    kind, _, role = ("gemv_o" if name == "gemv" else name).partition("_")
    if kind in ("gemv", "read") and role in GEMV_ROLES:
        if kind == "gemv":
            calls_of = _fp8_gemv_call(role, gen)
        else:
            from replicas.kernels.gemv import _cycled_us
            from replicas.kernels.stream import read_all

            n, k = GEMV_SHAPES[role][:2]
            copies, out, times = _read_times(n * k, "cuda", _cycled_us)
            best = min(times, key=times.__getitem__)
            calls_of = functools.partial(read_all, copies[0], out, best)
        calls_of()
        _profiled(calls_of, calls)
        return
    if name == "attention":
        def once(fn: Callable[[Any], Any], copies: list[Any]) -> float:
            _profiled(lambda: fn(copies[0]), calls)
            return 1.0

        for _ in attention_probe([(256, 192)], "cuda", once, 1.0, tiles=(),
                                 cache_dtypes=("fp8",)):
            pass  # (the engine's variant: run and checked, then `once`)
        return
    if name == "swiglu_quant":
        x = torch.randn(256, 27392, device="cuda", dtype=torch.bfloat16, generator=gen)
        calls_of = functools.partial(kernels.silu_mul_quantize_fp8, x)
    else:  # gate_up at 256 rows: "gate_up_mm" W8A8, "w8a16_gate_up" weight-only
        w8, scale = quantize_rows(torch.randn(27392, 4096, device="cuda", generator=gen) * 0.02)
        x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
        if name == "w8a16_gate_up":
            calls_of = functools.partial(_w8a16_and_widened, x, w8, scale,
                                         kernels.widen_fp8(w8, scale, x.dtype))
        else:
            calls_of = functools.partial(_scaled_mm_both, *kernels.quantize_tokens_fp8(x),
                                         w8, scale)
    calls_of()
    _profiled(calls_of, calls)


def _w8a16_and_widened(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                       w16: torch.Tensor) -> None:
    """The "w8a16_gate_up" ncu subject's call: x @ (w8 * scale)^T by the weight-only
    batch kernel in its default config, then by cuBLAS on the widened weight `w16`."""
    from replicas import kernels

    kernels.w8a16(x, w8, scale)
    torch.nn.functional.linear(x, w16)


def ncu_gemv_config() -> tuple[int, ...] | None:
    """$TPSERVE_NCU_GEMV_CONFIG, a GEMV config written as a tuple (an engine's pick, as
    its `gemv_report` or a b1 row's "picks" names it), for the "gemv_ROLE" ncu subjects;
    None where unset. PERF.md's ncu at f4c7ca0: the subject's own timing picked a
    128-program config for down (43 us under ncu) where the engine runs (4, 2048, 4, 3,
    96, 1) (19.4 us a call in the step)."""
    import ast

    from replicas import kernels

    text = os.environ.get("TPSERVE_NCU_GEMV_CONFIG", "").strip()
    if not text:
        return None
    config = ast.literal_eval(text)
    if not isinstance(config, tuple) or config not in kernels.gemv_configs(True, True):
        raise ValueError(f"TPSERVE_NCU_GEMV_CONFIG={text!r}: not one of the FP8 GEMV "
                         "configs (kernels.gemv_configs(fp8=True, trials=True))")
    return config


def _fp8_gemv_call(role: str, gen: torch.Generator) -> Callable[[], Any]:
    """GLM-4-9B's batch-1 GEMV of `role` (GEMV_SHAPES) on random FP8 weights, in the kind
    the engine calls it with FP8 weights (`mlp_gemv_kinds`; the FP8 LM head plain) and
    `ncu_gemv_config()` where given, else the fastest config `pick_gemv` times for it, as
    a call without arguments: even where the FP8 matmul comes within pick_gemv's margin
    here (down did on an H100, PERF.md v0.96, while the engine picked a GEMV for it)."""
    from replicas import kernels
    from replicas.fp8 import quantize_rows
    from replicas.kernels.gemv import gemv_of_kind

    n, k, kind, has_bias = GEMV_SHAPES[role]
    kind = _engine_gemv_kind(role, kind, fp8=True)
    w8, scale = quantize_rows(torch.randn(n, k, device="cuda", generator=gen) * 0.02)

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    bias = make(n) if has_bias else None
    config = ncu_gemv_config()
    if config is None:
        config, _ = kernels.pick_gemv(w8, bias, kind, margin=math.inf, scale=scale,
                                      dtype=torch.bfloat16)
    assert config is not None  # (with no margin the fastest GEMV config)
    x = make(1, 2 * k if kind == "gated" else k)
    return functools.partial(gemv_of_kind, kind, x, make(1, k), make(k), w8, bias, config,
                             scale)


def _engine_gemv_kind(name: str, kind: str, fp8: bool) -> str:
    """GEMV_SHAPES' layer `name` in the kind the engine runs it with FP8 weights or not:
    gate_up's and down's follow them (`mlp_gemv_kinds`), the others keep `kind`."""
    from replicas.model import mlp_gemv_kinds

    return dict(zip(("gate_up", "down"), mlp_gemv_kinds(fp8), strict=True)).get(name, kind)


def _scaled_mm_both(x8: torch.Tensor, xs: torch.Tensor, w8: torch.Tensor,
                    scale: torch.Tensor) -> None:
    """ncu_subject's "gate_up_mm": the product without fast accumulation, then with."""
    for fast in (False, True):
        torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=scale.view(1, -1),
                         out_dtype=torch.bfloat16, use_fast_accum=fast)


def _profiled(fn: Callable[[], Any], calls: int) -> None:
    """`fn` `calls` times between cudaProfilerStart and cudaProfilerStop (what ncu
    --profile-from-start off profiles), the GPU idle before and after."""
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def decode_gaps(modes: tuple[str, ...] = ("fp8-w8a8",), tokens: int = 128
                ) -> Iterator[dict[str, Any]]:
    """PERF.md v0.79: the 256 x 128/128 run with the prompts cached (the issue's 256-request
    measure, decode steps almost alone), once timed and once under the profiler, for each
    FP8 mode named (and "bf16"): wall against the GPU's busy time, and where the GPU sat
    idle (`gpu_gaps`), per decode step (`tokens` steps)."""
    from torch.profiler import ProfilerActivity, profile

    config = _glm_config()
    vocab = GLM4_9B["vocab_size"]
    prompts = prompts_for(256, 128, vocab, seed=0)
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    settings = [(mode, _mode_settings(mode)) for mode in modes]  # (a typo: before any engine)
    for mode, fp8 in settings:
        with Engine(dataclasses.replace(config, **fp8)) as engine:
            engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                    ignore_eos=True))
            wall = best_of(lambda: engine.generate(prompts, greedy), 2)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                profiled = seconds(lambda: engine.generate(prompts, greedy))
            table = kernel_table(prof, 1, 12)
            gaps = gpu_gaps(prof)
        yield {"case": f"glm4-9b_{mode}_256req_cached_gaps", "unit": "ms/step",
               "ours": round(wall * 1e3 / tokens, 3),
               "tok_s_cached": round(256 * tokens / wall, 1),
               "profiled_ms_per_step": round(profiled * 1e3 / tokens, 3),
               "busy_ms_per_step": round(table["busy_us"] / 1e3 / tokens, 3),
               "idle_ms_per_step": round(gaps["idle_us"] / 1e3 / tokens, 3),
               "cublaslt_workspace_kib": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
               "gaps": gaps, "kernels": table, **fp8}
        torch.cuda.empty_cache()


def _turn_order(arms: Sequence[str], turn: int) -> Sequence[str]:
    """The arms of an A/B in one process in round `turn`'s order: as given, reversed every
    other round (a drift over the call favours neither arm)."""
    return arms if turn % 2 == 0 else arms[::-1]


def w8a8_cublas_ab(rounds: int = 2, modes: tuple[str, ...] = ("fp8-w8a8",)
                   ) -> Iterator[dict[str, Any]]:
    """PERF.md v0.71 A/B in one process: the 256 x 128/128 run of each FP8 mode named
    (FP8_MODES' names) with the W8A8 picks free to take cuBLAS in runs of K, then not
    (TPSERVE_W8A8_CUBLAS=0), `rounds` times in turn; an engine each, its picks timed
    afresh. A row per run: output tok/s new and cached, and the picks the engine took."""
    from replicas.kernels import fp8mm

    chosen = fp8_modes_named(modes)
    config = _glm_config()
    for turn in range(rounds):
        for mode in chosen:
            for on in ("1", "0"):
                fp8mm.W8A8_PICKS.clear()  # (kept once a process: timed again here)
                fp8, run = _run_256_with(config, mode, "TPSERVE_W8A8_CUBLAS", on)
                yield {"case": f"glm4-9b_{mode[3]}_256req_in128_out128_cublas_runs_{on}",
                       "unit": "tokens/s", "round": turn, "cublas_runs": on == "1",
                       **run, **fp8, "w8a8_picks": _w8a8_picks_taken()}


def _w8a8_picks_taken() -> dict[str, list[list[Any]]]:
    """The W8A8 picks this process's engines took, by weight shape, as JSON."""
    from replicas.kernels import fp8mm

    return {str(shape): [[rows, list(c) if c else None] for rows, c in p]
            for shape, p in fp8mm.W8A8_PICKS.items()}


def w8a8_fold_ab(rounds: int = 2, modes: tuple[str, ...] = ("fp8-w8a8",),
                 switch: str = "TPSERVE_W8A8_FOLD", picks: bool = False
                 ) -> Iterator[dict[str, Any]]:
    """PERF.md v0.80 A/B in one process: the 256 x 128/128 run (`_run_256`) of each FP8
    mode named with W8A8's runs of K added by the next norm, then not
    (TPSERVE_W8A8_FOLD=0), `rounds` times in turn, the order reversed every other round;
    an engine each. A row per run: output tok/s new and cached, and the kernel table.
    `switch`: another such variable read at each call, "1" against "0" (PERF.md v0.82:
    TPSERVE_W8A8_FAST_ACCUM); `picks`: one the W8A8 picks depend on, timed again for each
    run (they are kept once a process) and recorded in its row."""
    from replicas.kernels import fp8mm

    chosen = fp8_modes_named(modes)
    config = _glm_config()
    label = switch.removeprefix("TPSERVE_W8A8_").lower()
    for turn in range(rounds):
        for mode in chosen:
            for fold in _turn_order(("1", "0"), turn):
                if picks:
                    fp8mm.W8A8_PICKS.clear()
                fp8, run = _run_256_with(config, mode, switch, fold)
                took = {"w8a8_picks": _w8a8_picks_taken()} if picks else {}
                yield {"case": f"glm4-9b_{mode[3]}_256req_in128_out128_{label}_{fold}",
                       "unit": "tokens/s", "round": turn, label: fold == "1",
                       "cublaslt_workspace_kib": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
                       **run, **fp8, **took}


def w8a8_slices_ab(rounds: int = 1, modes: tuple[str, ...] = ("fp8-w8a8-keepqkv_int8kv",)
                   ) -> Iterator[dict[str, Any]]:
    """PERF.md v0.99 A/B in one process (`w8a8_fold_ab`): the 256 x 128/128 run with the
    W8A8 picks free to take per-token tiles in slices of K, then not
    (TPSERVE_W8A8_SLICES=0), the picks timed again for each run."""
    yield from w8a8_fold_ab(rounds, modes, "TPSERVE_W8A8_SLICES", picks=True)


def dequant_rows_ab(rounds: int = 2, limits: tuple[int, ...] = (160, 257),
                    modes: tuple[str, ...] = ("fp8",)) -> Iterator[dict[str, Any]]:
    """PERF.md v1.00's next, in one process: the 256 x 128/128 run of each weight-only FP8
    mode named with fp8.DEQUANT_ROWS at each of `limits` (160: a 256-row decode step
    widens its weights for cuBLAS, ~6.3 ms a step of copies on the H200; 257: the batch
    kernel in its picks and slices runs it), `rounds` times, the order reversed every
    other round; an engine each. A row per run: output tok/s new and cached, the kernel
    table."""
    from unittest import mock

    from replicas import fp8

    yield from _256_ab(rounds, modes, limits, "dequant_rows",
                       lambda limit: mock.patch.object(fp8, "DEQUANT_ROWS", limit))


def _256_ab(rounds: int, modes: tuple[str, ...], values: tuple[Any, ...], label: str,
            context_of: Callable[[Any], contextlib.AbstractContextManager[Any]]
            ) -> Iterator[dict[str, Any]]:
    """An A/B of the 256 x 128/128 run in one process: each FP8 mode named, an engine
    each in `context_of(value)` for each of `values`, `rounds` times, the order reversed
    every other round. A row per run (case ..._LABEL_VALUE, field LABEL: value): output
    tok/s new and cached, the kernel table."""
    chosen = fp8_modes_named(modes)
    config = _glm_config()
    for turn in range(rounds):
        for mode in chosen:
            for value in _turn_order(values, turn):
                settings, run = _run_256_in(config, mode, context_of(value))
                yield {"case": f"glm4-9b_{mode[3]}_256req_in128_out128_{label}_{value}",
                       "unit": "tokens/s", "round": turn, label: value, **run, **settings}


# PERF.md v1.02: weight-only FP8 with x in two FP8 terms, at the rows where the batch
# kernel is bound by the tensor cores (128-256) and below
TWO_TERM_PROBE_ROWS = (32, 64, 128, 256)


def two_terms_probe(rows: tuple[int, ...] = TWO_TERM_PROBE_ROWS) -> Iterator[dict[str, Any]]:
    """PERF.md v1.02, the products alone (`_cycled_us`, cold weights, a CUDA graph): on
    GLM-4-9B's four layer shapes at `rows` rows, us of weight-only `fp8_linear` as it
    runs now (the batch kernel below DEQUANT_ROWS, widening then cuBLAS from it), of
    x's two FP8 terms (the kernel, `_scaled_mm` on twice the rows, the add:
    `fp8_linear` with TWO_TERM_ROWS 1), of the batch kernel alone and of bf16 cuBLAS on
    the widened weight; and each product's largest error against the float64 product of
    x and the FP8 weight, over that product's largest value. PERF.md v1.03 beside them:
    the two terms in one kernel (`fp8_linear` with $TPSERVE_FP8_TWO_TERMS_FUSED=1: its
    time and error, "fused"), and the quantization then that kernel in each of
    TWO_TERMS_CONFIGS ("fused_" and the config)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from replicas import fp8, kernels
    from replicas.kernels.fp8mm import TWO_TERMS_CONFIGS
    from replicas.kernels.gemv import _cycled_us

    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in W8A16_PROBE_SHAPES.items():
        w8, scale, dense, copies8, copies16 = _probe_weights(n, k, "cuda", torch.bfloat16,
                                                             gen)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            exact = x.double() @ (w8.double() * scale.double()[:, None]).T
            top = float(exact.abs().max())
            times, errors = {}, {}
            for arm, least, fused in (("now", 0, "0"), ("two_terms", 1, "0"),
                                      ("fused", 1, "1")):
                with (_env("TPSERVE_FP8_TWO_TERMS", str(least)),
                      _env("TPSERVE_FP8_TWO_TERMS_FUSED", fused)):
                    times[arm] = _cycled_us(
                        lambda c, x=x, s=scale: fp8.fp8_linear(x, c, s), copies8)
                    got = fp8.fp8_linear(x, w8, scale)
                errors[arm] = round(float((got.double() - exact).abs().max()) / top, 6)
            for config in TWO_TERMS_CONFIGS:
                try:
                    times[f"fused_{config}"] = _cycled_us(
                        lambda c, x=x, s=scale, config=config: kernels.w8a8_two_terms(
                            *kernels.quantize_two_terms_fp8(x), c, s, None, x.dtype,
                            config), copies8)
                except (OutOfResources, CompilationError):  # (a tile this GPU cannot
                    # build: its row says so, the rest go on)
                    times[f"fused_{config}"] = float("nan")
            times["w8a16_kernel"] = _cycled_us(
                lambda c, x=x, s=scale: kernels.w8a16(x, c, s), copies8)
            times["bf16_cublas"] = _cycled_us(
                lambda c, x=x: torch.nn.functional.linear(x, c), copies16)
            errors["bf16_cublas"] = round(float((torch.nn.functional.linear(x, dense).double()
                                                 - exact).abs().max()) / top, 6)
            yield {"case": f"two_terms_{name}_m{m}", "unit": "us", "n": n, "k": k, "rows": m,
                   "ours": round(times["two_terms"], 2),
                   "times_us": {a: round(t, 2) for a, t in times.items()},
                   "max_error_over_max": errors, "dequant_rows": fp8.DEQUANT_ROWS}


def two_terms_ab(rounds: int = 1, least: int = 64, batches: tuple[int, ...] = (64, 128),
                 tokens: int = 64, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v1.02 in the engine: $TPSERVE_FP8_TWO_TERMS 0 against `least` rows
    (`_fp8_env_ab`)."""
    yield from _fp8_env_ab("TPSERVE_FP8_TWO_TERMS", (0, least), "two_terms", rounds,
                           batches, tokens, repeats)


def two_terms_fused_ab(rounds: int = 1, batches: tuple[int, ...] = (96, 128, 160),
                       tokens: int = 64, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v1.03 in the engine: the two terms (from TWO_TERM_ROWS rows) through
    `_scaled_mm` on 2M rows and an add (fused 0) against one kernel (fused 1)."""
    yield from _fp8_env_ab("TPSERVE_FP8_TWO_TERMS_FUSED", (0, 1), "two_terms_fused",
                           rounds, batches, tokens, repeats)


def two_terms_fold_ab(rounds: int = 1, batches: tuple[int, ...] = (96, 128, 160),
                      tokens: int = 64, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v1.04 in the engine: the two terms' products added by an add kernel
    ($TPSERVE_FP8_TWO_TERMS_FOLD 0) against left to the next norm and SwiGLU (1)."""
    yield from _fp8_env_ab("TPSERVE_FP8_TWO_TERMS_FOLD", (0, 1), "two_terms_fold", rounds,
                           batches, tokens, repeats)


def two_terms_norm_ab(rounds: int = 1, batches: tuple[int, ...] = (96, 128, 160),
                      tokens: int = 64, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v1.06 in the engine: qkv_proj's and gate_up_proj's two terms made by the
    quantization kernel after the norm ($TPSERVE_FP8_TWO_TERMS_NORM 0) against by the
    norm's own kernel (1)."""
    yield from _fp8_env_ab("TPSERVE_FP8_TWO_TERMS_NORM", (0, 1), "two_terms_norm", rounds,
                           batches, tokens, repeats)


# PERF.md v1.04 + v1.06 in one call: (arm, $TPSERVE_FP8_TWO_TERMS_FOLD, _NORM)
TWO_TERMS_NEXT_ARMS = (("plain", "0", "0"), ("fold", "1", "0"), ("fold_norm", "1", "1"))


def two_terms_next_ab(rounds: int = 1, batches: tuple[int, ...] = (96, 128, 160),
                      tokens: int = 64, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v1.04 and v1.06 in the engine, one process, three arms
    (TWO_TERMS_NEXT_ARMS): the two terms' adds and quantization kernels as now, v1.04's
    products left to their readers, and v1.06's terms made by the norm on top; FP8 decode
    at `batches` sequences, then weight-only FP8 at 256 requests; an engine each (6)."""
    @contextlib.contextmanager
    def patch(arm: str) -> Iterator[None]:  # (set as an arm's engine starts, not before)
        _, fold, norm = next(a for a in TWO_TERMS_NEXT_ARMS if a[0] == arm)
        with (_env("TPSERVE_FP8_TWO_TERMS_FOLD", fold),
              _env("TPSERVE_FP8_TWO_TERMS_NORM", norm)):
            yield

    arms = tuple(a[0] for a in TWO_TERMS_NEXT_ARMS)
    yield from _fp8_batch_arms({f"two_terms_{a}": (patch(a), {"two_terms_next": a})
                                for a in arms}, batches, tokens, repeats)
    yield from _256_ab(rounds, ("fp8",), arms, "two_terms_next", patch)


def _fp8_env_ab(env: str, values: tuple[int, ...], label: str, rounds: int,
                batches: tuple[int, ...], tokens: int, repeats: int,
                modes: tuple[str, ...] = ("fp8",)) -> Iterator[dict[str, Any]]:
    """An A/B of $env in one process: FP8 decode (weight-only, e4m3 cache, the FP8 head)
    at `batches` sequences with $env at each of `values` (`_fp8_batch_arms`, rows
    ..._LABEL_VALUE); then each FP8 mode of `modes` (weight-only by default) at 256
    requests (the 256 x 128/128 run, prompts cached and not) at each, `rounds` times, the
    order reversed every other round; an engine each."""
    yield from _fp8_batch_arms(
        {f"{label}_{v}": (_env(env, str(v)), {label: v}) for v in values}, batches, tokens,
        repeats)
    yield from _256_ab(rounds, modes, values, label, lambda v: _env(env, str(v)))


# PERF.md v1.05: the row-quantizing kernels, by name: (columns of x, the launcher's name
# in replicas.kernels); GLM-4-9B's widths (SwiGLU's input is gate_up's 2 x 13,696)
QUANT_PROBE = {"quant_rows": (4096, "quantize_tokens_fp8"),
               "quant_two": (4096, "quantize_two_terms_fp8"),
               "quant_two_down": (13696, "quantize_two_terms_fp8"),
               "silu_mul_quant": (2 * 13696, "silu_mul_quantize_fp8")}


def quant_warps_probe(rows: tuple[int, ...] = (64, 128, 256),
                      warps: tuple[int, ...] = (4, 8, 16, 32)) -> Iterator[dict[str, Any]]:
    """PERF.md v1.05, the row-quantizing kernels alone (QUANT_PROBE; a CUDA graph of 20
    calls on one input, hot in L2 as a step's is): us a call at `rows` rows with the
    rule's warps ($TPSERVE_QUANT_WARPS 0: "0") and each of `warps`, and whether each
    arm's output is the rule's bit for bit."""
    from replicas import kernels
    from replicas.fp8 import FP8
    from replicas.kernels.common import _pow2
    from replicas.kernels.gemv import _cycled_us
    from replicas.kernels.quant import quant_warps

    def bits(outs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:  # (FP8 as bytes)
        return [t.view(torch.uint8) if t.dtype == FP8 else t for t in outs]

    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, launcher) in QUANT_PROBE.items():
        fn = getattr(kernels, launcher)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            want = bits(fn(x))
            times, same = {}, {}
            for w in (0, *warps):
                with _env("TPSERVE_QUANT_WARPS", str(w)):
                    times[str(w)] = round(_cycled_us(fn, [x] * 20), 2)
                    got = bits(fn(x))
                same[str(w)] = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            yield {"case": f"quant_warps_{name}_m{m}", "unit": "us", "k": k, "rows": m,
                   "ours": times["0"], "times_us": times, "same_as_rule": same,
                   "rule_warps": quant_warps(_pow2(k // 2 if name == "silu_mul_quant" else k))}


def quant_warps_ab(warps: int = 16, rounds: int = 1, batches: tuple[int, ...] = (128,),
                   tokens: int = 64, repeats: int = 3,
                   modes: tuple[str, ...] = ("fp8", "fp8-w8a8-keepqkv_int8kv")
                   ) -> Iterator[dict[str, Any]]:
    """PERF.md v1.05 in the engine: the row-quantizing kernels with the rule's warps
    ($TPSERVE_QUANT_WARPS 0) against `warps`: FP8 decode at `batches` sequences
    (weight-only's two terms from 96 rows), then `modes` (FP8_MODES' names; weight-only
    FP8 and W8A8 -keepqkv, its SwiGLU quantized in one pass) at 256 requests."""
    yield from _fp8_env_ab("TPSERVE_QUANT_WARPS", (0, warps), "quant_warps", rounds,
                           batches, tokens, repeats, modes)


def _fp8_settings(mode: tuple[str, str, dict[str, str], str]) -> dict[str, str]:
    """An FP8_MODES entry's engine settings: quantization, KV cache, its options."""
    quantization, kv, options, _ = mode
    return {"quantization": quantization, "kv_cache_dtype": kv, **options}


def _mode_settings(name: str) -> dict[str, str]:
    """A mode's engine settings by its rows' name: "bf16" none, else its FP8_MODES
    entry's (an unknown name is an error that lists them)."""
    if name == "bf16":
        return {}
    mode, = fp8_modes_named([name], "unknown mode (bf16, or one of FP8_MODES)")
    return _fp8_settings(mode)


def _run_256_with(config: EngineConfig, mode: tuple[str, str, dict[str, str], str],
                  name: str, value: str) -> tuple[dict[str, str], dict[str, Any]]:
    """`_run_256_in` with $name set to `value` while the engine lives."""
    return _run_256_in(config, mode, _env(name, value))


def _run_256_in(config: EngineConfig, mode: tuple[str, str, dict[str, str], str],
                context: contextlib.AbstractContextManager[Any]
                ) -> tuple[dict[str, str], dict[str, Any]]:
    """(the mode's settings, `_run_256` of an engine of `config` in that FP8 mode) inside
    `context` while the engine lives (an A/B's one run); the GPU's cache emptied after."""
    fp8 = _fp8_settings(mode)
    with context, Engine(dataclasses.replace(config, **fp8)) as engine:
        run = _run_256(engine, 1)
    torch.cuda.empty_cache()
    return fp8, run


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """$name set to `value` inside, the caller's setting back after, even when cut short."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def attention_pdl_gap() -> Iterator[dict[str, Any]]:
    """PERF.md v0.74: why decode attention took ~32 us a call in the 256-request run and
    ~24 in the probe (256 x 192 keys, e4m3 and bf16 caches): the probe with PDL on (its
    kernels back to back, each one's start overlapping the one before) and off (each
    alone, as the engine's follows a cuBLAS matmul), with its own block tables and with
    engine-like ones (a prompt's 8 blocks sequence by sequence, then decode's step by
    step) from pools of up to 52,427 blocks (the W8A8 run's pool), and random ones from
    that pool: the engine's tile and (64, 4), the tile the engine ran then."""
    from replicas import kernels
    from replicas.kernels.gemv import _cycled_us

    rate = copy_bandwidth()
    for pool, prompt_blocks in ((0, 0), (3072 * 4, 8), (52427, 8), (52427, 0)):
        for pdl in ("1", "0"):
            with _env("TPSERVE_PDL", pdl):
                for r in attention_probe([(256, 192)], "cuda", _cycled_us, rate,
                                         tiles=[kernels.DECODE_TILE],
                                         cache_dtypes=("fp8", "bfloat16"), pool=pool,
                                         prompt_blocks=prompt_blocks):
                    yield {"case": r["case"], "pdl": pdl, "pool": pool or 256 * 12,
                           "order": "alloc" if prompt_blocks else "random",
                           "times_us": r["times_us"], "failed": r["failed"]}


def decode_tile_ab(rounds: int = 1, switches: Sequence[str] = ("1", "0"),
                   modes: Sequence[str] = ("bf16", "fp8-w8a8")) -> Iterator[dict[str, Any]]:
    """PERF.md v0.74 A/B in one process: 256 x 128/128 in bf16 (16-bit cache) and W8A8
    (e4m3 cache) with decode attention's wide-step tiles (engine_decode_tile) and without
    (TPSERVE_WIDE_DECODE_TILES=0), or each of `switches` (a tile written out: v0.84),
    `rounds` times in turn, the order reversed every other round; an engine each. A row
    per run: output tok/s new and cached, GPU busy time, decode attention's calls and
    time."""
    config = _glm_config()
    modes_of = {name: _mode_settings(name) for name in modes}
    for turn in range(rounds):
        for name, options in modes_of.items():
            for on in _turn_order(switches, turn):
                with _env("TPSERVE_WIDE_DECODE_TILES", on), \
                        Engine(dataclasses.replace(config, **options)) as engine:
                    run = _run_256(engine, 1)
                table = run.pop("kernels")
                decode = [t for t in table.get("top", []) if t["name"] == "_decode_kernel"]
                yield {"case": f"glm4-9b_{name}_256req_in128_out128_wide_tiles_"
                               f"{on.replace(',', '-')}",
                       "unit": "tokens/s", "round": turn, "wide_tiles": on, **run,
                       **options, "busy_us": table.get("busy_us"),
                       "wall_ms": table.get("wall_ms"), "decode_kernel": decode}
                torch.cuda.empty_cache()


# PERF.md v0.84's candidates for the wide decode steps' attention tile: fewer stages in
# the key loop, and a cap on a thread's registers (ncu: 220 registers, 2 programs an SM)
WIDE_TILE_CANDIDATES = {
    "fp8": ((64, 4, 1, 1), (64, 4, 1, 2, 168), (64, 4, 1, 2, 128), (64, 4, 1, 1, 168),
            (64, 4, 1, 1, 128), (32, 4, 1, 1), (32, 4, 1, 2, 128), (128, 4, 1, 1, 168),
            (64, 8, 1, 1)),
    "bfloat16": ((32, 4, 0, 1), (32, 4, 0, 2, 168), (32, 4, 0, 2, 128), (32, 4, 0, 1, 128),
                 (64, 4, 0, 1, 128), (64, 4, 0, 2, 168)),
    # (v0.84's e4m3 winner and its neighbours, on the int8 cache the modes over the
    # accuracy bar run: not yet timed)
    "int8": ((64, 4, 1, 1, 128), (64, 4, 1, 2, 128), (64, 4, 1, 1), (32, 4, 1, 2, 128))}
# the 256-request mode wide_tile_search's A/B runs on each cache
WIDE_TILE_MODES = {"fp8": "fp8-w8a8", "bfloat16": "bf16", "int8": "fp8-w8a8-keepqkv_int8kv"}


def wide_tile_search(rounds: int = 2, least: float = 0.95,
                     ab: Sequence[str] = ("fp8", "bfloat16", "int8"),
                     caches: Sequence[str] = tuple(WIDE_TILE_CANDIDATES)
                     ) -> Iterator[dict[str, Any]]:
    """PERF.md v0.84 in one call: the attention probe of WIDE_TILE_CANDIDATES against the
    engine's tile at 256 sequences of 192 and 1,024 keys (on `caches`), then, for each
    cache whose fastest candidate at 256 x 192 takes under `least` of the engine's tile's
    time, decode_tile_ab of the engine's wide tile against that one
    (TPSERVE_WIDE_DECODE_TILES) in the cache's WIDE_TILE_MODES mode, `rounds` times (the
    caches in `ab` only). Every row as it is measured."""
    from replicas.kernels.gemv import _cycled_us

    bandwidth = copy_bandwidth()
    winners: dict[str, str] = {}
    for cache in caches:
        tiles = WIDE_TILE_CANDIDATES[cache]
        for row in attention_probe([(256, 192), (256, 1024)], "cuda", _cycled_us, bandwidth,
                                   tiles=tiles, cache_dtypes=(cache,)):
            yield row
            if row["case"].endswith("_256x192"):
                names = {_tile_name(t, row["engine_splits"]): t for t in tiles}
                fastest = min((n for n in row["times_us"] if n in names),
                              key=row["times_us"].__getitem__, default=None)
                if fastest is not None and row["times_us"][fastest] < least * row["ours"]:
                    winners[cache] = ",".join(str(part) for part in names[fastest])
    for cache, tile in winners.items():
        if cache not in ab:
            continue
        yield from decode_tile_ab(rounds, ("1", tile), (WIDE_TILE_MODES[cache],))


def swiglu_epilogue_ab(rounds: int = 2) -> Iterator[dict[str, Any]]:
    """PERF.md v0.77 A/B in one process: GLM-4-9B batch-1 decode (128-token prompt, 128
    new tokens) in bf16 and weight-only FP8 (e4m3 cache) with SwiGLU on gate_up's GEMV
    and a plain down GEMV (TPSERVE_SWIGLU_EPILOGUE=1) and with SwiGLU inside the down
    GEMV (0), `rounds` times, the order reversed every other round; an engine each. A
    row per run: ms a token, the graph's replay, and the MLP GEMVs' picks and times."""
    config = dataclasses.replace(_glm_config(), max_num_seqs=1, kv_cache_memory=2**31)
    modes = {"bf16": {}, "fp8": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}
    prompt = prompts_for(1, 128, SHAPES["glm4-9b"][1]["vocab_size"])
    for turn in range(rounds):
        for name, options in modes.items():
            for on in _turn_order(("1", "0"), turn):
                with _env("TPSERVE_SWIGLU_EPILOGUE", on):
                    ms, graph, report = _b1_decode(dataclasses.replace(config, **options),
                                                   prompt)
                mlp = {key: times for key, times in report.items()
                       if any(kind in key for kind in ("swiglu", "gated", "'plain'"))}
                yield {"case": f"glm4-9b_{name}_decode_b1_swiglu_epilogue_{on}",
                       "unit": "ms/token", "ours": round(ms, 3), "round": turn,
                       "swiglu_epilogue": on == "1", "graph_replay_ms": round(graph, 3),
                       "gemv_us": mlp, **options}


def _b1_decode(config: EngineConfig, prompt: list[list[int]]
               ) -> tuple[float, float, dict[Any, Any]]:
    """An engine's batch-1 decode for the A/Bs: ms a token (128 new tokens, best of 3),
    its graph's replay in ms, and its GEMVs' report (picks and times); the engine is
    closed and its memory handed back before the next."""
    with Engine(config) as engine:
        ms = ours_per_token(engine, prompt, 128, 3) * 1e3
        graph = graph_step_ms(engine)
        report = dict(engine.worker.gemv_report)
    torch.cuda.empty_cache()
    return ms, graph, report


# PERF.md v0.85's trials that won on the H200 (in kernels.FP8_GEMV_CONFIGS since v0.87;
# v0.89 A/B'd v0.88's qkv winner so, and took it out again: no gain in the engine)
GEMV_TRIAL_WINNERS: tuple[tuple[int, ...], ...] = (
    (16, 512, 8, 4, 80), (4, 2048, 4, 3, 96, 1), (16, 512, 8, 4, 0, 1))


def gemv_trials_ab(rounds: int = 2) -> Iterator[dict[str, Any]]:
    """PERF.md v0.87 A/B in one process: GLM-4-9B batch-1 decode (128-token prompt, 128
    new tokens) with FP8 weights and an e4m3 cache, the engine's GEMVs picked among
    FP8_GEMV_CONFIGS with GEMV_TRIAL_WINNERS ("with") and without them ("without"),
    `rounds` times, the order reversed every other round; an engine each. A row per run:
    ms a token, the graph's replay, and the GEMVs' picks and times."""
    config, prompt = _b1_fp8()
    every = _gemv_module().FP8_GEMV_CONFIGS
    sets = {"with": every, "without": tuple(c for c in every if c not in GEMV_TRIAL_WINNERS)}
    for turn in range(rounds):
        for name in _turn_order(("with", "without"), turn):
            with _fp8_gemv_configs(sets[name]):
                ms, graph, report = _b1_decode(config, prompt)
            yield {"case": f"glm4-9b_fp8_decode_b1_gemv_trials_{name}",
                   "unit": "ms/token", "ours": round(ms, 3), "round": turn,
                   "trial_winners": name == "with", "graph_replay_ms": round(graph, 3),
                   "gemv_us": report}


def b1_kernels_ab(extra: tuple[tuple[int, ...], ...] = (),
                  tokens: int = 64) -> Iterator[dict[str, Any]]:
    """PERF.md v0.90, v0.92, v0.93: where GLM-4-9B batch-1 FP8 decode's ~3.03 ms go (FP8
    weights, e4m3 cache, 128-token prompt), the engine's GEMVs picked among
    FP8_GEMV_CONFIGS as they are ("picks") and, with `extra` given, among those too
    ("picks_extra"; v0.90 ran v0.89's qkv GEMV, v0.93 the LATE configs since removed:
    faster alone, no faster in the step); an engine each (`_b1_kernels_rows`)."""
    every = _gemv_module().FP8_GEMV_CONFIGS
    arms = {"picks": (every, {})}
    if extra:
        arms["picks_extra"] = (every + extra, {})
    yield from _b1_kernels_rows(arms, tokens)


def b1_head_ab(candidates: int = 16, tokens: int = 64) -> Iterator[dict[str, Any]]:
    """PERF.md v0.94: batch-1 FP8 decode with the 16-bit LM head ("head16") and with the
    FP8 head rescoring each step's `candidates` highest logits ("head_fp8"), an engine
    each (`_b1_kernels_rows`)."""
    every = _gemv_module().FP8_GEMV_CONFIGS
    yield from _b1_kernels_rows({"head16": (every, {"fp8_lm_head": 0}),
                                 "head_fp8": (every, {"fp8_lm_head": candidates})}, tokens)


# PERF.md v0.96: the decode batches at which the FP8 head's rows are tried in the step
# (32: W8A16_HEAD_PICKS' second config, v0.97)
HEAD_ROWS_BATCHES = (4, 16, 32, 64)


def _fp8_batch_arms(arms: dict[str, tuple[Any, dict[str, Any]]],
                    batches: tuple[int, ...], tokens: int, repeats: int
                    ) -> Iterator[dict[str, Any]]:
    """GLM-4-9B FP8 decode (FP8 weights, e4m3 cache, the FP8 LM head rescoring 16) at
    each of `batches` sequences of 128-token prompts, an engine per arm (its name: the
    patch it runs under, the fields its rows carry): ms a step (TPOT), the share of each
    later arm's greedy tokens that the first's match ("agree"), and the kernels' own times
    a step as those tokens were made (kernel_table's 12 longest)."""
    from torch.profiler import ProfilerActivity, profile

    if not batches:  # (an A/B of the 256-request runs alone: `batches=()`)
        return
    config = dataclasses.replace(_glm_config(), max_num_seqs=max(batches),
                                 quantization="fp8", kv_cache_dtype="fp8", fp8_lm_head=16)
    vocab = SHAPES["glm4-9b"][1]["vocab_size"]
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first: dict[int, list[list[int]]] = {}
    for arm, (patch, fields) in arms.items():
        with patch, Engine(config) as engine:
            for batch in batches:
                prompts = prompts_for(batch, 128, vocab, seed=batch)
                ms = ours_per_token(engine, prompts, tokens, repeats) * 1e3
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    outs = engine.generate(prompts, greedy)
                got = [out.token_ids for out in outs]
                ref = first.setdefault(batch, got)
                same = [a == b for seq, want in zip(got, ref, strict=True)
                        for a, b in zip(seq, want, strict=True)]
                yield {"case": f"glm4-9b_fp8_decode_b{batch}_{arm}", "unit": "ms/step",
                       "ours": round(ms, 3), "batch": batch, **fields,
                       "kernels": kernel_table(prof, tokens, 12),
                       **({} if got is ref else {"agree": round(sum(same) / len(same), 4)})}
        torch.cuda.empty_cache()


def head_rows_ab(batches: tuple[int, ...] = HEAD_ROWS_BATCHES, rows: int = 64,
                 tokens: int = 64, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v0.96 (`_fp8_batch_arms`): the head's FP8 rows read in steps of one row
    only (parallel.FP8_HEAD_ROWS = 1, before v0.96: "head_rows1") and in steps of up to
    `rows` rows ("head_rows<rows>")."""
    from unittest import mock

    from replicas import parallel

    yield from _fp8_batch_arms(
        {f"head_rows{limit}": (mock.patch.object(parallel, "FP8_HEAD_ROWS", limit),
                               {"fp8_head_rows": limit}) for limit in (1, rows)},
        batches, tokens, repeats)


# PERF.md v0.98: the weight-only FP8 matmul's configs with K in slices, at a decode step's
# rows: the engine's picks (W8A16_PICKS up to 16 rows, W8A16_MANY_ROWS beyond) and the
# configs next to them, each in 2, 4 and 8 slices and as w8a16_split chooses (0)
W8A16_SPLIT_BASES = ((16, 32, 128, 4, 4, False), (16, 64, 128, 4, 4, False),
                     (32, 64, 128, 4, 4, False), (64, 64, 128, 4, 4, True))
W8A16_SPLIT_TRIALS = tuple((*base, split) for base in W8A16_SPLIT_BASES
                           for split in (1, 2, 4, 8, 0))
W8A16_SPLIT_ROWS = (4, 16, 32, 64)
# and from 128 rows, where fp8_linear widens the weight for cuBLAS from DEQUANT_ROWS (160):
# the wide tiles in slices (their 36-72 programs on qkv, o and down at 256 rows), against
# widening then cuBLAS (the probe's "widen+cublas")
W8A16_SPLIT_WIDE_TRIALS = tuple((*base, split) for base in (
    (64, 64, 128, 4, 4, True), (128, 128, 64, 8, 3, True), (256, 128, 64, 8, 3, True))
    for split in (1, 2, 4, 0))
W8A16_SPLIT_WIDE_ROWS = (128, 256)


def w8a16_split_probe() -> Iterator[dict[str, Any]]:
    """PERF.md v0.98, the kernel alone: `w8a16_probe` on GLM-4-9B's four layer shapes at
    W8A16_SPLIT_ROWS over W8A16_SPLIT_TRIALS, then at W8A16_SPLIT_WIDE_ROWS over
    W8A16_SPLIT_WIDE_TRIALS; each row also names the slices w8a16_split chose for the
    split-0 configs ("auto_split")."""
    yield from _w8a16_split_rows(W8A16_SPLIT_ROWS, W8A16_SPLIT_TRIALS)
    yield from _w8a16_split_rows(W8A16_SPLIT_WIDE_ROWS, W8A16_SPLIT_WIDE_TRIALS)


def _w8a16_split_rows(rows: tuple[int, ...], trials: tuple[tuple[int, ...], ...]
                      ) -> Iterator[dict[str, Any]]:
    """w8a16_split_probe's rows at `rows` over `trials`."""
    from replicas.kernels.fp8mm import _sms, w8a16_parts, w8a16_split
    from replicas.kernels.gemv import _cycled_us

    sms = _sms(torch.device("cuda"))
    for row in w8a16_probe(W8A16_PROBE_SHAPES, rows, "cuda", _cycled_us, copy_bandwidth(),
                           configs=trials):
        auto = {}
        for config in trials:
            bm, bn, bk, *_, split = w8a16_parts(config)
            if split == 0:
                tiles = -(-row["rows"] // bm) * -(-row["n"] // bn)
                auto[str(config)] = w8a16_split(0, tiles, -(-row["k"] // bk), sms)
        yield {**row, "auto_split": auto}


def w8a16_split_ab(batches: tuple[int, ...] = (*W8A16_SPLIT_ROWS, 128), tokens: int = 64,
                   repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v0.98 and v1.00 in the step (`_fp8_batch_arms`): the weight-only matmul as
    before them (K whole in each program, the swapped (64, 64, 128) from 17 rows on every
    weight: "w8a16_split1") and as the kernels choose now (K in w8a16_split's slices,
    W8A16_PICKS, W8A16_WIDE_PICKS: "w8a16_split0")."""
    from unittest import mock

    from replicas.kernels import fp8mm

    before = mock.patch.multiple(fp8mm, W8A16_SPLIT=1, W8A16_WIDE_N=1 << 62,
                                 W8A16_LONG_K=1 << 62,
                                 W8A16_SHORT_K_MANY_ROWS=fp8mm.W8A16_MANY_ROWS,
                                 W8A16_PICKS=((16, (16, 32, 128, 4, 4, False)),))
    yield from _fp8_batch_arms(
        {"w8a16_split1": (before, {"w8a16_split": 1}),
         "w8a16_split0": (contextlib.nullcontext(), {"w8a16_split": fp8mm.W8A16_SPLIT})},
        batches, tokens, repeats)


def w8a16_by_k_ab(batches: tuple[int, ...] = (96, 128, 152), tokens: int = 64,
                  repeats: int = 3) -> Iterator[dict[str, Any]]:
    """PERF.md v1.01 in the step (`_fp8_batch_arms`), past 64 rows and below
    fp8.DEQUANT_ROWS: the narrower weights in W8A16_MANY_ROWS as v1.00 had them
    ("w8a16_by_k0") and by K as now (W8A16_LONG_K_PICKS, W8A16_SHORT_K_MANY_ROWS:
    "w8a16_by_k1")."""
    from unittest import mock

    from replicas.kernels import fp8mm

    before = mock.patch.multiple(fp8mm, W8A16_LONG_K=1 << 62,
                                 W8A16_SHORT_K_MANY_ROWS=fp8mm.W8A16_MANY_ROWS)
    yield from _fp8_batch_arms(
        {"w8a16_by_k0": (before, {"w8a16_by_k": 0}),
         "w8a16_by_k1": (contextlib.nullcontext(), {"w8a16_by_k": 1})},
        batches, tokens, repeats)


def _b1_kernels_rows(arms: dict[str, tuple[tuple[tuple[int, ...], ...], dict[str, Any]]],
                     tokens: int) -> Iterator[dict[str, Any]]:
    """Per arm (name: the FP8 GEMV configs the engine picks among, EngineConfig changes),
    `_b1_fp8`'s engine: a row of ms a token, then `tokens` new tokens under the profiler:
    the kernels' spans and own times a step (kernel_table), the GEMVs' by the weight each
    reads (gemv_roles), where the GPU sat idle (gpu_gaps), the GEMVs' picks; and after
    the first arm, the share of its greedy tokens that the first arm's match ("agree")."""
    from torch.profiler import ProfilerActivity, profile

    base, prompt = _b1_fp8()
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first: list[int] | None = None
    for name, (configs, changes) in arms.items():
        config = dataclasses.replace(base, **changes)
        with _fp8_gemv_configs(configs), Engine(config) as engine:
            ms = ours_per_token(engine, prompt, 128, 3) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out = engine.generate(prompt, greedy)
            picks = {key: report.get("chosen")
                     for key, report in engine.worker.gemv_report.items()}
        table, gaps = kernel_table(prof, tokens, 16), gpu_gaps(prof)
        got = out[0].token_ids
        first = got if first is None else first
        yield {"case": f"glm4-9b_fp8_decode_b1_kernels_{name}", "unit": "ms/token",
               "ours": round(ms, 3), "busy_ms_per_step": round(table["busy_us"] / 1e3, 3),
               "kernels_ms_per_step": round(table["kernels_us"] / 1e3, 3),
               "idle_ms_per_step": round(gaps["idle_us"] / 1e3 / tokens, 3),
               "gemv_roles": gemv_roles(prof, tokens), "kernels": table, "gaps": gaps,
               "picks": picks, "changes": changes,
               **({} if got is first else {"agree": round(
                   sum(a == b for a, b in zip(first, got, strict=True)) / tokens, 4)})}
        torch.cuda.empty_cache()


def read_floor(sizes: dict[str, int] | None = None, device: str = "cuda",
               timer: Callable[..., float] | None = None) -> Iterator[dict[str, Any]]:
    """PERF.md v0.91: the read floor of each weight a batch-1 FP8 decode step reads
    (GLM-4-9B; `sizes`: bytes by name, by default its four FP8 products'
    W8A16_PROBE_SHAPES and the 16-bit LM head): a kernel that only reads its bytes
    (kernels.stream), timed as the GEMV probe times a GEMV (copies cycled past L2, a graph
    of back-to-back launches with PDL), at each of READ_CONFIGS; a row per weight with the
    fastest, its TB/s and every config's time. The GEMV probe's time for the same weight
    over this is what the GEMV spends beyond reading."""
    from replicas.kernels.gemv import _cycled_us

    time_us = timer or _cycled_us
    if sizes is None:  # the layers' FP8 products (a byte a weight), the 16-bit LM head
        vocab, hidden = GEMV_SHAPES["lm_head"][:2]
        sizes = {**{name: n * k for name, (n, k) in W8A16_PROBE_SHAPES.items()},
                 "lm_head_bf16": vocab * hidden * 2}
    for name, nbytes in sizes.items():
        copies, _, by_config = _read_times(nbytes, device, time_us)
        times = {str(c): t for c, t in by_config.items()}
        best = min(times, key=times.__getitem__)
        yield {"case": f"glm4-9b_read_floor_{name}", "unit": "us", "bytes": nbytes,
               "ours": round(times[best], 2), "config": best,
               "tb_s": round(nbytes / times[best] / 1e6, 3),
               "times_us": {c: round(t, 2) for c, t in times.items()}}
        del copies
        if device == "cuda":
            torch.cuda.empty_cache()


def _read_times(nbytes: int, device: str, time_us: Callable[..., float]
                ) -> tuple[list[torch.Tensor], torch.Tensor, dict[Any, float]]:
    """`nbytes` read cold by `kernels.stream.read_all` at each READ_CONFIGS entry: the
    copies cycled (cold_set), the programs' output and the time of each config."""
    from replicas.kernels.gemv import cold_set
    from replicas.kernels.stream import READ_CONFIGS, read_all, read_programs

    copies = cold_set(torch.zeros(nbytes, dtype=torch.uint8, device=device))
    out = torch.empty(max(read_programs(nbytes, c) for c in READ_CONFIGS),
                      dtype=torch.int64, device=device)
    return copies, out, {c: time_us(functools.partial(read_all, out=out, config=c), copies)
                         for c in READ_CONFIGS}


def _b1_fp8() -> tuple[EngineConfig, list[list[int]]]:
    """The batch-1 FP8 A/Bs' engine (GLM-4-9B shapes, FP8 weights, e4m3 cache) and prompt
    (128 tokens)."""
    config = dataclasses.replace(_glm_config(), max_num_seqs=1, kv_cache_memory=2**31,
                                 quantization="fp8", kv_cache_dtype="fp8")
    return config, prompts_for(1, 128, SHAPES["glm4-9b"][1]["vocab_size"])


def _gemv_module() -> Any:
    """replicas.kernels.gemv, the module (the package's `gemv` is the function)."""
    return importlib.import_module("replicas.kernels.gemv")


@contextlib.contextmanager
def _fp8_gemv_configs(configs: tuple[tuple[int, ...], ...]) -> Iterator[None]:
    """The engine's FP8 GEMVs picked among `configs` inside (an engine reads
    FP8_GEMV_CONFIGS as it loads), the module's own back after, even when cut short."""
    module = _gemv_module()
    before = module.FP8_GEMV_CONFIGS
    module.FP8_GEMV_CONFIGS = configs
    try:
        yield
    finally:
        module.FP8_GEMV_CONFIGS = before


# the fp8 suite's modes: (weights, KV cache, options, the rows' name)
FP8_MODES: tuple[tuple[str, str, dict[str, str], str], ...] = (
    ("fp8", "fp8", {}, "fp8"), ("fp8", "int8", {}, "fp8_int8kv"),
    ("fp8-w8a8", "fp8", {}, "fp8-w8a8"),
    ("fp8-w8a8", "int8", {"keep_16bit": "qkv_proj,o_proj,down_proj"},
     "fp8-w8a8-gateup_int8kv"),
    ("fp8-w8a8", "int8", {"keep_16bit": "qkv_proj"}, "fp8-w8a8-keepqkv_int8kv"),
    # -keepqkv with the 16-bit cache: the W8A8 mode that holds the accuracy bar (98.14 %
    # at 363991a, 97.85 % with the int8 cache) with most of a layer on FP8 tensor cores;
    # its prefill is the int8 twin's, so one TTFT row serves both (PERF.md v1.07)
    ("fp8-w8a8", "auto", {"keep_16bit": "qkv_proj"}, "fp8-w8a8-keepqkv"))


def fp8_modes() -> list[tuple[str, str, dict[str, str], str]]:
    """FP8_MODES, or those named in $TPSERVE_FP8_MODES (comma-separated rows' names, e.g.
    "fp8-w8a8-keepqkv_int8kv,fp8-w8a8": a device call short of time runs what it needs;
    an unknown name is an error that lists them)."""
    chosen = [n.strip() for n in os.environ.get("TPSERVE_FP8_MODES", "").split(",")
              if n.strip()]
    if not chosen:
        return list(FP8_MODES)
    return fp8_modes_named(chosen, "TPSERVE_FP8_MODES: unknown")


def fp8_modes_named(names: Sequence[str], refusal: str = "unknown modes"
                    ) -> list[tuple[str, str, dict[str, str], str]]:
    """The FP8_MODES entries of `names` (rows' names), in FP8_MODES' order; a name it
    lacks is a ValueError ("`refusal` [names]; the modes are [...]"), raised before a
    caller starts an engine: a device call's typo costs nothing."""
    known = [mode[3] for mode in FP8_MODES]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{refusal} {unknown}; the modes are {known}")
    return [m for m in FP8_MODES if m[3] in names]


# GLM-4-9B's linear layers at tp=1 (out, in): qkv, o, gate_up, down
W8A16_PROBE_SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096),
                      "down": (4096, 13696)}
W8A16_PROBE_ROWS = (16, 64, 128, 256)


def lm_head_rows(rows: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)) -> Iterator[dict[str, Any]]:
    """PERF.md v0.94's next: GLM-4-9B's LM head in FP8 at 2-128 rows (`kernels.w8a16`'s
    configs, widening then cuBLAS) against the 16-bit matmul those steps run now, as
    w8a16_suite times a layer: where the FP8 rows win, parallel.FP8_HEAD_ROWS can grow."""
    from replicas.kernels.gemv import _cycled_us

    vocab, hidden = GEMV_SHAPES["lm_head"][:2]
    yield from w8a16_probe({"lm_head": (vocab, hidden)}, rows, "cuda", _cycled_us,
                           copy_bandwidth())


def w8a16_suite(repeats: int) -> Iterator[dict[str, Any]]:
    """Issue 20's weight-only batch matmul (`kernels.w8a16`, FP8 weight tiles widened in
    registers): its default config and each of W8A16_CONFIGS against bf16 cuBLAS and
    against widening then cuBLAS, on GLM-4-9B's layer shapes at decode batches of 16, 64,
    128 and 256 rows, each timed in a CUDA graph over cycled weight copies (cold, as a
    decode step reads them: gemv's _cycled_us); the floor is the FP8 weight's bytes at the
    measured copy rate. The default (W8A16_PICKS) and DEQUANT_ROWS are read from these
    rows. (`repeats`: unused, each time is already a mean of 10 graph replays.)"""
    from replicas.kernels.gemv import _cycled_us

    yield from w8a16_probe(W8A16_PROBE_SHAPES, W8A16_PROBE_ROWS, "cuda", _cycled_us,
                           copy_bandwidth())  # (these before the next probe starts)
    yield from w8a8_groups_probe(W8A16_PROBE_SHAPES, W8A16_PROBE_ROWS, "cuda", _cycled_us)


# GLM-4-9B's batch-1 GEMVs as a decoder layer calls them (its qkv has a bias; the LM
# head's FP8 GEMV is batch-1 decode's with FP8 weights, PERF.md v0.94): name: (out, in,
# kind, bias); gate_up's and down's kinds are the engine's for the weights' dtype
# (_engine_gemv_kind)
GEMV_SHAPES = {"qkv": (4608, 4096, "norm", True), "o": (4096, 4096, "plain", False),
               "gate_up": (27392, 4096, "norm", False), "down": (4096, 13696, "gated", False),
               "lm_head": (151552, 4096, "plain", False)}


def gemv_suite(repeats: int, picker: Callable[..., tuple[Any, dict[str, float]]] | None = None,
               bandwidth: float | None = None, device: str = "cuda",
               shapes: dict[str, tuple[int, int, str, bool]] | None = None
               ) -> Iterator[dict[str, Any]]:
    """The batch-1 GEMV alone, every config `pick_gemv` times, on GLM-4-9B's shapes with
    random bf16 and FP8 weights (cold, in a CUDA graph, as a decode step reads them): a
    row per (weight dtype, layer) with the fastest config, its bytes a second against
    the measured copy rate, and what the layer runs otherwise (cuBLAS; FP8's matmul).
    About a minute on the H200, most of it compiling. FP8 weights are also timed on
    FP8_GEMV_TRIALS' configs (PERF.md v0.85), and gate_up's and down's in the kinds the
    engine runs with them (`mlp_gemv_kinds`: SwiGLU on gate_up's output, a plain down,
    since PERF.md v0.77; v0.88). (`repeats`: unused; each time is a mean over 10 graph
    replays.)"""
    from replicas.fp8 import quantize_rows
    from replicas.kernels import gemv_configs, pick_gemv

    pick = picker or pick_gemv
    rate = bandwidth if bandwidth is not None else copy_bandwidth()
    gen = torch.Generator(device=device).manual_seed(0)
    known = {str(c) for c in gemv_configs(fp8=True)}  # (the engine's, trials left out)
    for dtype in ("bfloat16", "fp8"):
        for name, (n, k, kind, has_bias) in (shapes or GEMV_SHAPES).items():
            kind = _engine_gemv_kind(name, kind, fp8=dtype == "fp8")
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
            bias = (torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
                    if has_bias else None)
            fp8: dict[str, Any] = {}
            if dtype == "fp8":
                w, scale = quantize_rows(w)
                fp8 = {"scale": scale, "dtype": torch.bfloat16}
            _, times = pick(w, bias, kind, **fp8, **({"trials": True} if fp8 else {}))
            configs = {c: t for c, t in times.items() if c != "cublas"}
            best = min(configs, key=configs.__getitem__)
            nbytes = w.numel() * w.element_size()
            row: dict[str, Any] = {
                "case": f"glm4-9b_gemv_{dtype}_{name}", "unit": "us", "shape": [n, k],
                "kind": kind, "ours": round(configs[best], 2), "config": best,
                "cublas_us": round(times["cublas"], 2),
                "gb_s": round(nbytes / configs[best] / 1e3, 1),
                "fraction_of_copy": round(nbytes / configs[best] / 1e3 / rate, 3),
                "times_us": {c: round(t, 2) for c, t in times.items()}}
            if fp8:  # the engine's own pick (no trials) and the best's time over it: a
                # trial under 0.97 of it is worth a place in FP8_GEMV_CONFIGS (v0.85)
                engine = min((c for c in configs if c in known), key=configs.__getitem__,
                             default=None)
                if engine is not None:
                    row["engine_config"] = engine
                    row["best_over_engine"] = round(configs[best] / configs[engine], 3)
            yield row


def w8a8_suite(repeats: int, picker: Callable[..., tuple[Any, Any]] | None = None,
               bandwidth: float | None = None, device: str = "cuda",
               shapes: dict[str, tuple[int, int, str, bool]] | None = None
               ) -> Iterator[dict[str, Any]]:
    """W8A8 with a scale per token at a decode step's rows (16, 64, 128, 256), on
    GLM-4-9B's four layer shapes: `torch._scaled_mm` (what fp8-w8a8 ran until v0.62)
    against each config `kernels.pick_w8a8` times (Triton's tiles and cuBLAS in runs of
    K; weights cold, in a CUDA graph), a row per (layer, rows) with the fastest, the
    weight's bytes a second against the
    measured copy rate, and the pick the engine would take. (`repeats`: unused.)"""
    from replicas.fp8 import quantize_rows
    from replicas.kernels import pick_w8a8
    from replicas.kernels.fp8mm import W8A8_CUBLAS_CONFIGS

    pick = picker or pick_w8a8
    rate = bandwidth if bandwidth is not None else copy_bandwidth()
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, k, _, has_bias) in (shapes or GEMV_SHAPES).items():
        if name == "lm_head":  # (16-bit in every FP8 mode)
            continue
        w8, scale = quantize_rows(torch.randn(n, k, device=device, dtype=torch.bfloat16,
                                              generator=gen) * 0.02)
        picks, report = pick(w8, scale, has_bias)
        for rows, chosen in picks:
            times = report[rows]
            best = min((c for c in times if c != "scaled_mm"), key=times.__getitem__)
            row: dict[str, Any] = {
                "case": f"glm4-9b_w8a8_{name}_m{rows}", "unit": "us", "shape": [n, k],
                "rows": rows, "ours": round(times[best], 2), "config": best,
                "scaled_mm_us": round(times["scaled_mm"], 2),
                "over_scaled_mm": round(times[best] / times["scaled_mm"], 3),
                "picked": str(chosen) if chosen else "scaled_mm",
                "fraction_of_copy": round(n * k / times[best] / 1e3 / rate, 3),
                "times_us": {c: round(t, 2) for c, t in times.items()}}
            # v0.71's `_scaled_mm` in runs of K beside them (among the pick's own
            # candidates: their times are the pick's)
            runs = {str(c): times[str(c)] for c in W8A8_CUBLAS_CONFIGS if str(c) in times}
            fastest = min(runs, key=runs.__getitem__, default=None)
            row.update({"cublas_us": {c: round(t, 2) for c, t in runs.items()},
                        "cublas_best": fastest,
                        "cublas_over_scaled_mm": None if fastest is None
                        else round(runs[fastest] / times["scaled_mm"], 3)})
            yield row


# decode attention at GLM-4-9B's shapes (32 heads, 2 KV heads, head dim 128, half of it
# rotated, pairs interleaved; 16-token KV blocks): (sequences, keys each) of batch-1
# decode, of the 64-client and 256-request runs, and (since cfb6225's run, where 2
# splits beat the engine's 4 at 64 sequences) 16 and 32 sequences: 40e061d's run set
# `decode_splits` to at most two programs an SM (PERF.md v0.65)
ATTENTION_CASES = ((1, 256), (1, 4096), (16, 512), (32, 512), (64, 320), (256, 192),
                   (256, 1024))
# (keys a tile, warps[, f16: an 8-bit cache's dots in float16, PERF.md v0.70]), each at
# the engine's splits; the engine's tile and its F16 form also at twice and half the
# splits (every tile and split count is a compile; the F16 forms with the 8-bit caches
# only). (AHEAD, the next tile's keys loaded before this one's softmax, was timed here
# from v0.60 to f8c0c92: never the fastest, 1.01-1.49x the best; removed, PERF.md v0.72).
# ((32, 4, 1), bf16's tile at 256 sequences in the F16 form, was timed at aec69fd: 1.22x
# (64, 4, 1) at 256 x 192 with the e4m3 cache, never the best; removed, PERF.md v0.81.)
ATTENTION_TILES = ((32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (64, 4, 1), (64, 8, 1))


# the caches: bf16, int8 with a scale a row, e4m3 (`fp8`: fp8-w8a8's own, the cache of
# the W8A8 256-request row)
ATTENTION_CACHES = ("bfloat16", "int8", "fp8")


def attention_suite(repeats: int) -> Iterator[dict[str, Any]]:
    """Decode attention alone (the fused kernel: rotary, the new key's cache write, the
    split merge), on GLM-4-9B's shapes, bf16, int8 and e4m3 caches: the engine's tile and
    splits against other tiles (keys a tile, warps) and twice or half the splits, each
    timed in a CUDA graph over cycled caches (cold, as a decode step reads each layer's),
    against the bytes of keys and values read at the measured copy rate. (`repeats`:
    unused; each time is a mean over 10 graph replays.)"""
    from replicas.kernels.gemv import _cycled_us

    yield from attention_probe(ATTENTION_CASES, "cuda", _cycled_us, copy_bandwidth())


def attention_probe(cases: Sequence[tuple[int, int]], device: str,
                    timer: Callable[[Callable[[Any], Any], list[Any]], float],
                    bandwidth: float, tiles: Sequence[tuple[int, ...]] = ATTENTION_TILES,
                    cache_dtypes: Sequence[str] = ATTENTION_CACHES,
                    dtype: torch.dtype = torch.bfloat16,
                    **shape: int) -> Iterator[dict[str, Any]]:
    """A row per (cache dtype, sequences, keys), each as soon as it is measured (a step
    cut short keeps the rows before): `timer(fn, copies)`'s µs for each (tile, splits)
    variant, the engine's own (kernels.engine_decode_tile, decode_splits) first; every
    variant's output checked against that one's (a variant that differs is listed in
    `failed`, not timed). `dtype`: the queries' (and a 16-bit cache's, named "bfloat16" or
    "float16" in `cache_dtypes`). `shape`: heads, kv_heads, d, rotary_dim, block_size; pool
    (blocks in the cache, at least the sequences' own) and prompt_blocks (0: the tables'
    blocks drawn at random from the pool; else handed out as the block manager does, a
    third into the pool: that many for each sequence's prompt, one after another, then
    the rest step by step across the sequences)."""
    gen = torch.Generator(device=device).manual_seed(0)
    for cache_dtype in cache_dtypes:
        for num_seqs, keys in cases:
            yield _attention_row(cache_dtype, num_seqs, keys, device, timer, bandwidth, tiles,
                                 gen, dtype, **shape)


def _attention_row(cache_dtype: str, num_seqs: int, keys: int, device: str,
                   timer: Callable[[Callable[[Any], Any], list[Any]], float],
                   bandwidth: float, tiles: Sequence[tuple[int, ...]],
                   gen: torch.Generator, dtype: torch.dtype = torch.bfloat16,
                   heads: int = 32, kv_heads: int = 2, d: int = 128,
                   rotary_dim: int = 64, block_size: int = 16, pool: int = 0,
                   prompt_blocks: int = 0) -> dict[str, Any]:
    """attention_probe's row for one cache dtype and (sequences, keys each)."""
    from replicas import kernels
    from replicas.kernels.gemv import OutOfResources, cold_copies

    width = -(-keys // block_size)
    blocks = max(pool, num_seqs * width)
    if cache_dtype not in ("int8", "fp8") and getattr(torch, cache_dtype, None) != dtype:
        raise ValueError(f"a 16-bit cache is the queries' dtype ({dtype}), not {cache_dtype}")
    int8 = cache_dtype == "int8"
    width_bytes = {"int8": d + 4, "fp8": d}.get(cache_dtype, 2 * d)  # a row's, with its scale
    kv_bytes = 2 * num_seqs * keys * kv_heads * width_bytes
    count = cold_copies(kv_bytes)
    shape = (blocks, block_size, kv_heads, d)

    def cache() -> tuple[torch.Tensor, ...]:
        if int8:
            return (*(torch.randint(-127, 128, shape, device=device, dtype=torch.int8,
                                    generator=gen) for _ in range(2)),
                    *(torch.rand(shape[:3], device=device, generator=gen) / 64
                      for _ in range(2)))
        dense = tuple(torch.randn(shape, device=device, dtype=dtype, generator=gen)
                      for _ in range(2))
        return tuple(c.to(torch.float8_e4m3fn) for c in dense) if cache_dtype == "fp8" \
            else dense

    copies = [cache() for _ in range(count)]
    if prompt_blocks:
        prompts = torch.arange(num_seqs * prompt_blocks).view(num_seqs, prompt_blocks)
        steps = num_seqs * prompt_blocks + torch.arange(
            num_seqs * (width - prompt_blocks)).view(width - prompt_blocks, num_seqs).T
        tables = (blocks // 3 + torch.cat([prompts, steps], 1)).to(device, torch.int32)
    else:
        tables = torch.randperm(blocks, device=device, generator=gen)[
            :num_seqs * width].view(num_seqs, width).to(torch.int32)
    positions = torch.full((num_seqs,), keys - 1, device=device)
    cu_q = torch.arange(num_seqs + 1, device=device, dtype=torch.int32)
    qkv = torch.randn(num_seqs, (heads + 2 * kv_heads) * d, device=device,
                      dtype=dtype, generator=gen)  # q, k, v as the projection's views
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    angles = torch.rand(num_seqs, 1, rotary_dim, device=device, generator=gen) * 6
    slots = tables[:, (keys - 1) // block_size].long() * block_size + (keys - 1) % block_size
    new = kernels.NewKeys(k.view(num_seqs, kv_heads, d), v.view(num_seqs, kv_heads, d),
                          angles.cos(), angles.sin(), slots, rotary_dim, True)
    out = torch.empty(num_seqs, heads, d, device=device, dtype=dtype)

    def run(c: tuple[torch.Tensor, ...], tile: tuple[int, ...], splits: int) -> torch.Tensor:
        return kernels.paged_attention(q.view(num_seqs, heads, d), c[0], c[1], tables, cu_q,
                                       positions, None, 1, splits, new, c[2:], out=out,
                                       decode_tile=tile)

    base = kernels.decode_splits(num_seqs, kv_heads, keys)
    engine_tile = kernels.engine_decode_tile(num_seqs, copies[0][0].dtype, dtype)
    variants = [(engine_tile, base)]
    for tile in tiles:  # the engine's tile (and its F16 form) at other splits too
        if tile[2:] and tile[2] and cache_dtype not in ("int8", "fp8"):
            continue  # (F16 widens an 8-bit cache)
        own = len(tile) <= 3 and tile[:2] == engine_tile[:2]
        for splits in sorted({base, 2 * base, max(1, base // 2)}) if own else [base]:
            if (tile, splits) not in variants:
                variants.append((tile, splits))
    want = run(copies[0], *variants[0]).clone()
    times, failed = {}, []
    for tile, splits in variants:
        name = _tile_name(tile, splits)
        try:
            got = run(copies[0], tile, splits)
        except OutOfResources:  # a tile this GPU cannot hold
            failed.append(f"{name}: out of resources")
            continue
        except Exception as e:  # a candidate that does not build here: said in the row
            if (tile, splits) == variants[0]:
                raise
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        if not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2):
            failed.append(f"{name}: differs from the engine's")
            continue
        times[name] = timer(functools.partial(run, tile=tile, splits=splits), copies)
    default = times[next(iter(times))]
    best = min(times, key=times.__getitem__)
    floor_us = kv_bytes / (bandwidth * 1e3)
    return {"case": f"glm4-9b_decode_attention_{cache_dtype}_{num_seqs}x{keys}", "unit": "us",
            "ours": round(default, 2), "best": best, "best_us": round(times[best], 2),
            "floor_us": round(floor_us, 2), "fraction_of_copy": round(floor_us / default, 3),
            "best_fraction_of_copy": round(floor_us / times[best], 3),
            "engine_tile": list(engine_tile), "engine_splits": base,
            "times_us": {n: round(t, 2) for n, t in times.items()}, "failed": failed}


def _tile_name(tile: tuple[int, ...], splits: int) -> str:
    """A decode tile's name in the attention probe's rows: "tile 64x4w f16 s1 r128 splits
    1" (f16: the F16 form; s: the key loop's stages, where not 2; r: the register cap)."""
    from replicas.kernels.attention import decode_tile_parts

    _, _, f16, stages, regs = decode_tile_parts(tile)
    return (f"tile {tile[0]}x{tile[1]}w{' f16' if f16 else ''}"
            f"{f' s{stages}' if stages != 2 else ''}{f' r{regs}' if regs else ''}"
            f" splits {splits}")


def _probe_weights(n: int, k: int, device: str, dtype: torch.dtype, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                              list[torch.Tensor], list[torch.Tensor]]:
    """A random [n, k] weight for the matmul probes: (w8, its row scales, the 16-bit
    weight they stand for, copies of w8, copies of the 16-bit one): enough copies (up to
    32, 256 MB of FP8) that a timer cycling through them reads each cold."""
    from replicas.fp8 import quantize_rows
    from replicas.kernels.gemv import cold_copies, cold_set

    w8, scale = quantize_rows(torch.randn(n, k, device=device, dtype=dtype, generator=gen))
    dense = w8.to(dtype) * scale[:, None].to(dtype)
    count = cold_copies(n * k)  # (w8's bytes)
    return w8, scale, dense, cold_set(w8, count), cold_set(dense, count)


def w8a8_groups_probe(shapes: dict[str, tuple[int, int]], batch_rows: tuple[int, ...],
                      device: str, timer: Callable[[Callable[[torch.Tensor], torch.Tensor],
                                                    list[torch.Tensor]], float],
                      dtype: torch.dtype = torch.bfloat16, group: int = 32
                      ) -> list[dict[str, Any]]:
    """W8A8 with a scale per token and run of `group` input columns (`kernels.w8a8_groups`,
    each config of W8A8_GROUPS_CONFIGS) against W8A8 with a scale per token
    (`torch._scaled_mm`, what fp8-w8a8 runs) and bf16 cuBLAS, per (out, in) shape and
    rows, `timer(fn, weight copies)`'s µs of the matmul alone; beside them the µs of
    quantizing the input each way (the product of each is checked against the float64
    product of its own rounded operands)."""
    import torch.nn.functional as F

    from replicas.fp8 import quantize_groups
    from replicas.kernels import quantize_tokens_fp8
    from replicas.kernels.fp8mm import W8A8_GROUPS_CONFIGS, w8a8_groups

    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for name, (n, k) in shapes.items():
        w8, ws, _, copies8, copies16 = _probe_weights(n, k, device, dtype, gen)
        for m in batch_rows:
            x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
            xg, xgs = quantize_groups(x, group)
            xt, xts = quantize_tokens_fp8(x)
            want = ((xg.double().reshape(m, -1, group) * xgs.double()[..., None]).reshape(m, k)
                    @ (w8.double() * ws.double()[:, None]).T)
            times = {"cublas": timer(lambda c, x=x: F.linear(x, c), copies16),
                     "scaled_mm per token": timer(
                         lambda c, xt=xt, xts=xts, ws=ws: torch._scaled_mm(
                             xt, c.t(), scale_a=xts, scale_b=ws.view(1, -1), out_dtype=dtype),
                         copies8),
                     "quantize per token": timer(lambda c, x=x: quantize_tokens_fp8(x)[0],
                                                 copies8[:2]),
                     f"quantize groups of {group}": timer(
                         lambda c, x=x: quantize_groups(x, group)[0], copies8[:2])}
            for config in W8A8_GROUPS_CONFIGS:
                got = w8a8_groups(xg, xgs, w8, ws, None, torch.float32, config).double()
                if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
                    raise AssertionError(f"w8a8_groups {config} disagrees on {(m, n, k)}")
                times[str(config)] = timer(
                    lambda c, config=config, xg=xg, xgs=xgs, ws=ws: w8a8_groups(
                        xg, xgs, c, ws, None, dtype, config), copies8)
            best = min((str(c) for c in W8A8_GROUPS_CONFIGS), key=times.__getitem__)
            rows.append({"case": f"w8a8_groups{group}_{name}_m{m}", "unit": "us", "n": n,
                         "k": k, "rows": m, "best": best, "best_us": round(times[best], 2),
                         "scaled_mm_us": round(times["scaled_mm per token"], 2),
                         "cublas_us": round(times["cublas"], 2),
                         "times_us": {c: round(t, 2) for c, t in times.items()}})
        del copies8, copies16
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def w8a16_probe(shapes: dict[str, tuple[int, int]], batch_rows: tuple[int, ...],
                device: str, timer: Callable[[Callable[[torch.Tensor], torch.Tensor],
                                              list[torch.Tensor]], float],
                bandwidth: float, dtype: torch.dtype = torch.bfloat16,
                configs: tuple[tuple[int, ...], ...] | None = None) -> list[dict[str, Any]]:
    """w8a16_suite's rows: per (out, in) shape and rows, `timer(fn, weight copies)`'s µs
    of F.linear in `dtype`, of the FP8 weight widened (one kernel) then F.linear (what
    fp8_linear does from DEQUANT_ROWS rows), and of the default config and each of
    `configs` (W8A16_CONFIGS where None; one that fails to run is recorded, not fatal;
    one whose product disagrees is an AssertionError)."""
    import torch.nn.functional as F

    from replicas.kernels import widen_fp8
    from replicas.kernels.fp8mm import W8A16_CONFIGS, w8a16, w8a16_config

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in shapes.items():
        w8, scale, dense, copies8, copies16 = _probe_weights(n, k, device, dtype, gen)
        for m in batch_rows:
            x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
            want = F.linear(x, dense).float()
            times = {"cublas": timer(lambda c, x=x: F.linear(x, c), copies16),
                     # what fp8_linear does from DEQUANT_ROWS rows: the crossover
                     "widen+cublas": timer(lambda c, x=x, s=scale: F.linear(
                         x, widen_fp8(c, s, dtype)), copies8)}
            default = w8a16_config(m, n=n, k=k)  # (the engine's, for this weight)
            tried = dict.fromkeys((default, *(W8A16_CONFIGS if configs is None else configs)))
            failed = {}
            for config in tried:
                try:  # a config this GPU cannot run (shared memory) is recorded, not fatal
                    got = w8a16(x, w8, scale, None, config).float()
                except Exception as e:  # noqa: BLE001 - Triton's resource errors vary
                    failed[str(config)] = f"{type(e).__name__}: {e}"[:200]
                    continue
                if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
                    raise AssertionError(f"w8a16 {config} disagrees on {(m, n, k)}")
                times[str(config)] = timer(
                    lambda c, x=x, s=scale, config=config: w8a16(x, c, s, None, config),
                    copies8)
            best = min((c for c in tried if str(c) in times), key=lambda c: times[str(c)])
            rows.append({"case": f"w8a16_{name}_m{m}", "unit": "us", "n": n, "k": k, "rows": m,
                         "default": str(default), "default_us": times.get(str(default)),
                         "best": str(best), "best_us": times[str(best)],
                         "cublas_us": times["cublas"],
                         "widen_cublas_us": times["widen+cublas"],
                         "fp8_floor_us": round(n * k / (bandwidth * 1e9) * 1e6, 2),
                         "times_us": {c: round(t, 2) for c, t in times.items()},
                         "failed": failed})
        del copies8, copies16
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# the accuracy suite's engines (changes to the bfloat16 one), each with whether the 98 %
# bar holds for it (issue 20): FP8 weights, alone and with each 8-bit cache, and W8A8 with
# qkv weight-only (and inputs in runs of 32): whether it can stand for FP8 weights
ACCURACY_CASES: tuple[tuple[dict[str, Any], bool], ...] = (
    ({"quantization": "fp8"}, True), ({"quantization": "fp8-w8a8"}, False),
    ({"quantization": "fp8", "kv_cache_dtype": "fp8"}, True),
    ({"quantization": "fp8", "kv_cache_dtype": "int8"}, True),
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj"}, True),
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj", "w8a8_group": 32}, True),
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj", "w8a8_group": 32,
      "kv_cache_dtype": "int8"}, True),
    # only gate_up's inputs in FP8 (over the bar on all four CPU checkpoints, PERF v0.47)
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj,o_proj,down_proj"}, True),
    # only gate_up in FP8 at all, the others 16-bit (-gateup's rows), with the int8 cache
    ({"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj,o_proj,down_proj"}, True),
    ({"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj,o_proj,down_proj",
      "kv_cache_dtype": "int8"}, True),
    # only qkv kept 16-bit, o, gate_up and down W8A8 (-keepqkv's rows; PERF v0.56)
    ({"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj"}, True),
    ({"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj", "kv_cache_dtype": "int8"}, True),
    ({"kv_cache_dtype": "fp8"}, False), ({"kv_cache_dtype": "int8"}, False),
    ({"dtype": "float32"}, False))


def accuracy_cases() -> list[tuple[dict[str, Any], bool]]:
    """ACCURACY_CASES, or with $TPSERVE_FP8_MODES (fp8_modes) those of the chosen modes'
    weights and options (either cache) and the float32 baseline."""
    if not os.environ.get("TPSERVE_FP8_MODES", "").strip():
        return list(ACCURACY_CASES)
    keys = ("quantization", "keep_16bit", "w8a8_weight_only", "w8a8_group")
    modes = [{"quantization": q, **options} for q, _, options, _ in fp8_modes()]
    return [(changes, held) for changes, held in ACCURACY_CASES
            if changes == {"dtype": "float32"}
            or any(all(changes.get(k) == mode.get(k) for k in keys) for mode in modes)]


def _accuracy_case(changes: dict[str, Any]) -> str:
    return "accuracy_" + "_".join(f"{k}={v}" for k, v in changes.items())


def accuracy_rows() -> list[dict[str, Any]]:
    """Teacher-forced top-1 agreement and KL against the bfloat16 engine on the trained
    checkpoint (replicas/accuracy.py), 2048 positions, per FP8 mode; and the float32
    engine against it: how far the base itself is from unrounded (on CPU 99.0 %, PERF.md
    v0.22), the scale against which an FP8 mode's loss reads."""
    from replicas.accuracy import held_out, measure, trained_model_dir

    model = trained_model_dir()
    base = EngineConfig(model=model, dtype="bfloat16", max_model_len=256,
                        max_num_batched_tokens=64)
    prompts = held_out(model, 16, 128)
    rows = []
    for changes, _ in accuracy_cases():
        row = measure(base, changes, prompts)
        rows.append({"case": _accuracy_case(changes), "unit": "top-1 agreement",
                     "ours": row["top1_agreement"], **row})
    return rows


def _hf_side_by_side(rows: list[dict[str, Any]], repeats: int) -> None:
    """transformers `generate` (eager) on the same shapes and tokens, into the same rows."""
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config("glm4-9b"),
                                                           dtype=torch.bfloat16).eval()
    vocab = GLM4_9B["vocab_size"]
    with torch.no_grad():
        b1 = hf_per_token(hf, prompts_for(1, 128, vocab), 128, repeats)
        ids = torch.tensor(prompts_for(256, 128, vocab), device="cuda")
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        wall = best_of(lambda: hf.generate(ids, max_new_tokens=128, min_new_tokens=128,
                                           do_sample=False, pad_token_id=0), repeats)
        long_ids = torch.tensor(prompts_for(1, 8192, vocab), device="cuda")
        ttft = best_of(lambda: hf.generate(long_ids, max_new_tokens=1, do_sample=False,
                                           pad_token_id=0), repeats)
    del hf
    torch.cuda.empty_cache()
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config("llama3-8b"),
                                                           dtype=torch.bfloat16).eval()
    with torch.no_grad():
        llama_b1 = hf_per_token(hf, prompts_for(1, 128, LLAMA3_8B["vocab_size"]), 128,
                                repeats)
    theirs = {"glm4-9b_decode_b1_in128_out128": b1 * 1e3,
              "glm4-9b_256req_in128_out128": 256 * 128 / wall,
              "glm4-9b_ttft_in8192": ttft * 1e3,
              "llama3-8b_decode_b1_in128_out128": llama_b1 * 1e3}
    for row in rows:
        row["transformers_eager"] = round(theirs[row["case"]], 3)
        row["ratio_ours_over_transformers"] = round(row["ours"] / theirs[row["case"]], 3)


def _row(case: str, unit: str, ours: float, theirs: float | None, **shape: Any
         ) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "unit": unit, "ours": round(ours * 1e3, 3), **shape}
    if theirs is not None:
        row["transformers"] = round(theirs * 1e3, 3)
        row["ratio_ours_over_transformers"] = round(ours / theirs, 3)
    return row


# A Llama shape for the pinning payoff on CPU: the built-in tiny model (hidden 64) prefills
# 1,000 tokens in about one decode step, so its TTFT is all fixed cost and no cache can
# show; this one prefills 1,200 tokens in ~0.6 s at tp=2 on 2 cores (~0.1 s for 170 new
# tokens after a cached prefix), a real model's proportions. Random weights
# (load_format=random), the tiny tokenizer.
PREFILL_MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6,
                 "num_attention_heads": 12, "num_key_value_heads": 4,
                 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": False}
PREFILL_MODEL_VERSION = "load-llama-v2"


def random_checkpoint(version: str, tokenizer: Callable[[Path], dict[str, Any]],
                      model: dict[str, Any]) -> str:
    """A config-only Llama checkpoint, served with load_format=random, made once in the
    tpserve cache under `version`: `tokenizer(folder)` writes the tokenizer there and
    returns the config fields it fixes (vocabulary size, special token ids)."""
    from transformers import LlamaConfig

    from replicas.tiny import cached_dir

    def build(folder: Path) -> None:
        config = LlamaConfig(**model, **tokenizer(folder),
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(str(folder))

    return cached_dir(version, build)


def prefill_model_dir() -> str:
    """A config-only checkpoint (config.json + the tiny tokenizer) of PREFILL_MODEL, made
    once in the tpserve cache; serve it with load_format=random."""
    from replicas.tiny import build_tokenizer, special_token_ids

    return random_checkpoint(PREFILL_MODEL_VERSION, lambda folder: {
        "vocab_size": build_tokenizer(folder), **special_token_ids()}, PREFILL_MODEL)


# Structured outputs at a real vocabulary: a 150k byte-level BPE trained on local sources
# (replicas/structured_libs.py), padded to Qwen's 151,936 logits (the grammar masks the
# ids past the tokenizer's), on a small random Llama: what the host spends filling masks
# beside what a decode step costs, and what applying them costs on the logits' device
STRUCTURED_MODEL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False, "vocab_size": 151936}
STRUCTURED_MODEL_VERSION = "structured-llama-150k-v1"
STRUCTURED_SPECIAL = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
STRUCTURED_8B = {**{k: v for k, v in LLAMA3_8B.items() if k != "rope_parameters"},
                 "vocab_size": 151936, "max_position_embeddings": 2048}
STRUCTURED_8B_VERSION = "structured-llama3-8b-150k-v1"
# a list of user records, long enough that no output ends within the 64 tokens measured
# (every step then has every row), each going through keys, strings, integers and enums
USER = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}
STRUCTURED_SCHEMA = {"type": "object", "properties": {
    "users": {"type": "array", "items": USER, "minItems": 20}}, "required": ["users"]}


def structured_model_dir(name: str = "tiny") -> str:
    """A config-only checkpoint with the 150k tokenizer, made once in the tpserve cache
    (training the tokenizer takes ~40 s on 2 cores; the other model copies it);
    load_format=random. "tiny": STRUCTURED_MODEL; "8b": Llama-3-8B's shapes at the same
    151,936 logits (STRUCTURED_8B)."""
    from replicas.structured_libs import train_tokenizer

    def tokenizer(folder: Path) -> dict[str, Any]:
        train_tokenizer(folder, 150_000)
        return STRUCTURED_SPECIAL

    if name == "tiny":
        return random_checkpoint(STRUCTURED_MODEL_VERSION, tokenizer, STRUCTURED_MODEL)
    tiny = Path(structured_model_dir("tiny"))

    def copied(folder: Path) -> dict[str, Any]:
        for f in tiny.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, folder / f.name)
        return STRUCTURED_SPECIAL

    return random_checkpoint(STRUCTURED_8B_VERSION, copied, STRUCTURED_8B)


def structured_suite(repeats: int) -> list[dict[str, Any]]:
    """Per decode step, json_schema requests in batches: the host's mask filling
    (Engine.mask_fill_s), the masks' application, and the step with and without them.
    On the tiny model a step is the host's own work, so nothing can hide the fill; on a
    GPU the 8B-shaped model's forward is long enough for the fill to overlap it: then
    `added_ms` (structured step - plain step) stays well under `fill_ms`."""
    from replicas.config import StructuredSpec

    spec = StructuredSpec("json_schema", json.dumps(STRUCTURED_SCHEMA))
    rows = []
    models = [("tiny", "llama-4l-h256", (1, 16))]
    if torch.cuda.is_available():
        models.append(("8b", "llama3-8b-shapes", (1, 16, 64)))
    for name, shapes, batches in models:
        config = EngineConfig(model=structured_model_dir(name), load_format="random",
                              max_model_len=512, max_num_seqs=max(batches))
        with Engine(config) as engine:
            for batch in batches:
                rows.append(_structured_row(engine, spec, batch, repeats, shapes))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _structured_row(engine: Engine, spec: Any, batch: int, repeats: int, shapes: str
                    ) -> dict[str, Any]:
    prompts = prompts_for(batch, 32, 150_000)
    plain = SamplingParams(max_tokens=64, temperature=1.0, seed=0, ignore_eos=True)
    shaped = dataclasses.replace(plain, structured=spec)
    step_ms = {name: min(_per_step(engine, prompts, p) for _ in range(repeats))
               for name, p in (("plain", plain), ("structured", shaped))}
    fill = min(_fill_per_step(engine, prompts, shaped) for _ in range(repeats))
    apply_ms = _apply_ms(engine, batch, repeats)
    added = step_ms["structured"] - step_ms["plain"]
    return {"case": f"structured_b{batch}_vocab151936", "unit": "ms/step", "model": shapes,
            "fill_ms": round(fill, 3), "apply_ms": round(apply_ms, 3),
            "step_ms_plain": round(step_ms["plain"], 3),
            "step_ms_structured": round(step_ms["structured"], 3),
            "added_ms": round(added, 3),
            "fill_share_of_plain_step": round(fill / step_ms["plain"], 3),
            "batch": batch, "schema": "users[20+]: name/age/role/tags", "tp": 1}


def _per_step(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Milliseconds per engine step over a whole generate (its prefill included)."""
    steps, start = engine._steps, time.perf_counter()
    engine.generate(prompts, params)
    return (time.perf_counter() - start) * 1e3 / (engine._steps - steps)


def _fill_per_step(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> float:
    steps, fill = engine._steps, engine.mask_fill_s
    engine.generate(prompts, params)
    return (engine.mask_fill_s - fill) * 1e3 / (engine._steps - steps)


def _apply_ms(engine: Engine, batch: int, repeats: int) -> float:
    """Milliseconds to apply `batch` rows' bitmasks to [batch, vocab] logits."""
    from replicas.config import StructuredSpec

    grammars = engine._structured()
    logits = torch.randn(batch, engine.spec.vocab_size, device=engine._device)
    spec = StructuredSpec("json_object")
    bitmask = grammars.fill([grammars.constraint(spec) for _ in range(batch)])
    rows = list(range(batch))
    return best_of(lambda: grammars.apply(logits, rows, bitmask), repeats * 10) * 1e3


def engine_for(model: str) -> dict[str, Any]:
    """EngineConfig fields of a named load model: "tiny" (built in) or "prefill"."""
    if model == "tiny":
        return {"tp": 2}
    if model == "prefill":
        return {"tp": 2, "model": prefill_model_dir(), "load_format": "random"}
    raise ValueError(f"model={model!r}: use 'tiny' or 'prefill'")


def cached_prefix(previous: list[int], prompt: list[int], block_size: int) -> int:
    """Tokens of `prompt` a prefix cache holding `previous` (the last turn's prompt and
    the tokens it generated) can serve: the common prefix in whole blocks, leaving at least
    one token to compute (the scheduler's rule)."""
    common = 0
    for a, b in zip(previous, prompt, strict=False):
        if a != b:
            break
        common += 1
    return min(common, len(prompt) - 1) // block_size * block_size


async def conversation_turns(engine: Engine, conversations: list[list[str]], max_tokens: int,
                             cold_token: int = 100) -> list[dict[str, Any]]:
    """Chats on one engine, turn after turn as the router sends them: each conversation's
    user messages in order, the history re-rendered with the chat template, the reply
    appended as text. Per turn: the TTFT with the previous turn in the cache (pinned), the
    TTFT of the same prompt with nothing cached (its first token changed to one no other
    prompt starts with: cold_token, cold_token + 1, ...), and the tokens the cache could
    serve at best."""
    reply = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    turns: list[dict[str, Any]] = []
    for users in conversations:
        messages: list[dict[str, str]] = []
        previous: list[int] = []
        for turn, content in enumerate(users):
            messages.append({"role": "user", "content": content})
            ids = engine.tokenizer.apply_chat_template(messages)
            start, ttft, out, text = time.perf_counter(), None, [], ""
            async for delta in engine.add_request(ids, reply):
                ttft = ttft or time.perf_counter() - start
                out += delta.token_ids
                text += delta.text
            start = time.perf_counter()
            async for _ in engine.add_request([cold_token + len(turns)] + ids[1:], one):
                cold = time.perf_counter() - start
            turns.append({"turn": turn, "prompt": len(ids), "pinned_s": round(ttft, 4),
                          "cold_s": round(cold, 4),
                          "cacheable": cached_prefix(previous, ids,
                                                     engine.config.block_size)})
            previous = ids + out
            messages.append({"role": "assistant", "content": text})
    return turns


def pinning_engine(model: str, conversations: list[list[str]], max_tokens: int,
                   warmup: list[list[str]]) -> list[dict[str, Any]]:
    """The pinning payoff on the engine alone (no Ray, HTTP or Redis): the turns of
    `conversations` (see conversation_turns) on an engine of the load model `model` (see
    engine_for), after the untimed `warmup` conversations (imports, first steps). The
    bound the stack's pinning figures are read against (`python -m infra.load --mode
    pinning-engine`)."""
    with Engine(EngineConfig(**engine_for(model))) as engine:
        asyncio.run(conversation_turns(engine, warmup, max_tokens, cold_token=50))
        return asyncio.run(conversation_turns(engine, conversations, max_tokens))


def table(path: str) -> str:
    """A markdown table of a results file (JSON lines), for the README."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if rows and rows[0].get("suite", "").startswith("multigpu"):
        return _multigpu_table(rows)
    if rows and rows[0].get("suite") == "fp8":
        return _fp8_table(rows)
    out = ["| case | unit | ours | transformers | ours / transformers | floor | vs floor | gpu |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        theirs = r.get("transformers_eager", r.get("transformers", "—"))
        floor = r.get("floor_ms", r.get("matmul_floor_ms", "—"))
        if "fraction_of_floor" in r:  # decode: share of the bandwidth floor reached
            versus = f"{r['fraction_of_floor']:.0%} of it"
            if "issue_floor_ms" in r:  # and of the floor as the issue states it
                versus += f" ({r['fraction_of_issue_floor']:.0%} of {r['issue_floor_ms']})"
        elif "ratio_to_floor" in r:  # prefill: times the matmul floor
            versus = f"{r['ratio_to_floor']}x"
        else:
            versus = "—"
        out.append(f"| {r['case']} | {r['unit']} | {r['ours']} | {theirs} | "
                   f"{r.get('ratio_ours_over_transformers', '—')} | {floor} | {versus} | "
                   f"{r['hardware']['gpu'] or r['hardware']['cpu']} |")
    return "\n".join(out)


def _multigpu_table(rows: list[dict[str, Any]]) -> str:
    """The multigpu suite's rows: each figure against tp=1 (or NCCL, for the all-reduce
    alone) measured in the same run, its target and whether it is met."""
    out = ["| case | unit | ours | tp=1 (or NCCL) | ratio | target | met | gpus |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((r[k] for k in ("tp1_ms", "tp1_s", f"{r.get('tp')}x_tp1_tokens_per_s",
                                    "nccl_us") if k in r), "—")
        ratio = next((r[k] for k in ("speedup_over_tp1", "ratio_to_tp1",
                                     "ratio_to_tp1_engines") if k in r), "—")
        target, met = _target_met(r)
        hw = r["hardware"]
        gpus = f"{hw.get('gpus') or 2}x {hw['gpu']}" if hw.get("gpu") else hw["cpu"]
        out.append(f"| {r['case']} | {r['unit']} | {r['ours']} | {base} | {ratio} | "
                   f"{target} | {met} | {gpus} |")
    return "\n".join(out)


# issue 20's targets, by the end of a case's name: (higher is better, target)
FP8_TARGETS = {"_decode_b1_in128_out128": (False, 2.6), "_256req_in128_out128": (True, 32000),
               "_ttft_in8192": (False, 190), "_kv_blocks_same_memory": (True, 1.9)}
FP8_ACCURACY_BARRED = tuple(_accuracy_case(c) for c, barred in ACCURACY_CASES
                            if barred)  # >= 98 %


def _fp8_table(rows: list[dict[str, Any]]) -> str:
    """The fp8 suite's rows (the latest of each case): each FP8 figure beside the bf16
    one of the same call, its target (issue 20) and whether it is met; the accuracy rows
    against the bf16 engine (the bar holds for weight-only FP8, alone and with the FP8
    KV cache; the other rows say how far the rest moves, the float32 one the base's own
    rounding). The bf16 twin is the one of the row's own call where the file has it (its
    `call`, else its git_rev: two calls at one revision carry a call each): a mode not
    re-run keeps its call's figures, and the rev column says which."""
    def call(r: dict[str, Any]) -> Any:
        return r.get("call", r.get("git_rev"))

    latest = {r["case"]: r for r in rows}
    of_call = {(call(r), r["case"]): r for r in rows}
    out = ["| case | unit | ours | bf16, same call | target | met | rev |",
           "|---|---|---|---|---|---|---|"]
    for case, r in latest.items():
        quantized = r.get("quantization") or r.get("kv_cache_dtype")
        base, target, met = "—", "—", "—"
        if case.startswith("accuracy_"):
            if case in FP8_ACCURACY_BARRED:
                target, met = "≥ 0.98", "yes" if r["ours"] >= 0.98 else "no"
        elif quantized:
            end = next((e for e in FP8_TARGETS if case.endswith(e)), None)
            twin = (of_call.get((call(r), "glm4-9b" + end))
                    or latest.get("glm4-9b" + end)) if end else None
            base = r.get("bf16", _cached_too(twin) if twin else "—")
            if end is not None:
                higher, goal = FP8_TARGETS[end]
                value = r.get("ratio", r["ours"]) if end == "_kv_blocks_same_memory" else r["ours"]
                ok = value >= goal if higher else value <= goal
                target = f"{'≥' if higher else '≤'} {goal}" + ("x" if "blocks" in end else "")
                if end == "_decode_b1_in128_out128":  # and >= 85 % of the FP8 floor
                    target += ", ≥ 85 % of its floor"
                    ok = ok and r.get("fraction_of_floor", 0) >= 0.85
                met = ("yes" if ok else "no") + (f" ({value}x)" if "blocks" in end else "")
                if "ours_prompts_cached" in r:  # (the issue's 20.2k: prompts cached)
                    cached = r["ours_prompts_cached"] >= goal
                    met = f"cached: {'yes' if cached else 'no'}; fresh: {met}"
        out.append(f"| {case} | {r['unit']} | {_cached_too(r)} | {base} | {target} | {met} | "
                   f"{r.get('git_rev') or '—'} |")
    return "\n".join(out)


def _cached_too(row: dict[str, Any]) -> str:
    """A row's figure for the fp8 table, with its prompts-cached twin where it has one
    (the 256-request rows: "22542.7 (32298.0 cached)")."""
    if "ours_prompts_cached" in row:
        return f"{row['ours']} ({row['ours_prompts_cached']} cached)"
    return str(row["ours"])


def _target_met(row: dict[str, Any]) -> tuple[str, str]:
    """(the row's target as written, "yes"/"no"/"—"): ratios to tp=1 engines and hidden
    shares are at least their target; times and ratios to tp=1 at most theirs."""
    if row["unit"] == "tokens equal":
        return "equal", "yes" if row["ours"] and row.get("bf16_within_tolerance") else "no"
    if row.get("target_ratio") is not None:
        key = "ratio_to_tp1_engines" if "ratio_to_tp1_engines" in row else "ratio_to_tp1"
        higher = key == "ratio_to_tp1_engines"
        value, target = row[key], row["target_ratio"]
        label = f"{'≥' if higher else '≤'} {target}x"
    elif row.get("target") is not None:
        higher = row["unit"] == "hidden share"
        value, target = row["ours"], row["target"]
        label = f"{'≥' if higher else '≤'} {target}"
    else:
        return "—", "—"
    met = value >= target if higher else value <= target
    if row["unit"] == "s (slowest)":
        # and nothing left behind: no rank process, no GPU memory (the GPU test's bar)
        left = row.get("rank0_mib_allocated_after") or [0]
        met = (met and row.get("ranks_left") == 0 and left[-1] < 64
               and row.get("same_tokens_every_cycle", True))
    return label, "yes" if met else "no"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["cpu", "gpu", "fp8", "w8a16", "gemv", "w8a8",
                                            "attention", "multigpu", "structured"],
                        default="cpu")
    parser.add_argument("--tp", default="2,4",
                        help="multigpu: the TP sizes to run (those with enough GPUs)")
    parser.add_argument("--smoke", action="store_true",
                        help="multigpu: every case on CPU with the tiny model (CI)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--table", metavar="JSONL", help="print a results file as markdown")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    env = environment()
    if args.suite == "multigpu":
        from replicas import multigpu

        tps = tuple(int(t) for t in args.tp.split(","))
        rows = multigpu.suite(args.repeats, tps, smoke=args.smoke)
    else:
        suites = {"gpu": gpu_suite, "cpu": cpu_suite, "structured": structured_suite,
                  "fp8": fp8_suite, "w8a16": w8a16_suite, "gemv": gemv_suite,
                  "w8a8": w8a8_suite, "attention": attention_suite}
        rows = suites[args.suite](args.repeats)
    for row in rows:
        emit({**row, "suite": args.suite, **env}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
