"""The multi-GPU suite (`python -m replicas.bench --suite multigpu`): tensor parallelism
over the GPUs of one host, GLM-4-9B shapes, bfloat16, one JSON row per case.

- correctness: greedy tokens at tp equal tp=1 for 16 tokens in float32 (a checkpoint of
  GLM-4-9B's widths and 2 layers, saved once); bfloat16 logits at tp against the float32
  ones, within the GPU tests' tolerance (1.5 x tp=1's own bf16 error + 0.05);
- batch-1 decode ms/token at tp (target 2.7 at tp=2) and its graph replay time;
- one 8192-token prefill with the chunked all-reduce overlap on and off: the share of
  the all-reduce time hidden, (TTFT off - TTFT on) / the same all-reduces timed alone
  (target >= 0.7);
- 16-bit against 32-bit all-reduce payloads: bytes on the wire per token, decode
  ms/token and TTFT side by side (bfloat16, the default for a bf16 model; float16 with
  its overflow guard; float32), and the one-shot all-reduce against NCCL;
- tp=1 in the same run: decode, TTFT and start-up, so every tp row has its ratio;
- Llama-3-8B shapes: batch-1 decode at tp and at tp=1;
- one decode-size all-reduce alone, in a CUDA graph: NCCL against the one-shot kernel;
- throughput, 256 requests of 128 in / 128 out: one tp engine against tp engines of
  tp=1 (one a GPU, all at once) on the same GPUs, and from tp=4 on against tp / 2
  engines of tp=2;
- robustness: five create / generate / shutdown cycles in one process, each shutdown's
  time, the rank processes left and rank 0's GPU memory after it.

`smoke=True` runs every case on CPU (gloo, the built-in tiny model, short prompts): CI
checks the harness and the tp=2 token equality there; its timings mean nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from replicas import Engine, EngineConfig, SamplingParams
from replicas.bench import (
    best_of,
    graph_step_ms,
    hf_config,
    kernel_table,
    model_dir,
    ours_per_token,
    prompts_for,
    run_kernels,
)
from replicas.ranks import free_port
from replicas.symm import ONE_SHOT_MAX_BYTES, OneShotAllReduce
from replicas.tiny import tiny_model_dir

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one run of the suite uses: full GLM-4-9B on GPUs, the tiny model in smoke."""

    name: str  # the model in the case names
    device: str
    model: str  # a model directory
    random: bool  # its weights random in bfloat16 (load_format=random): a config only
    prompt: int  # the long prompt of the prefill cases
    chunk: int  # overlap_chunk_tokens with the overlap on
    new: int  # decoded tokens of the decode cases
    kv_bytes: int | None


def _shapes(smoke: bool, name: str = "glm4-9b") -> Shapes:
    if smoke:
        return Shapes("tiny", "cpu", tiny_model_dir(), False, 256, 64, 16, None)
    return Shapes(name, "cuda", model_dir(name), True, 8192, 2048, 128, 16 * 2**30)


def _glm_checkpoint(layers: int) -> str:
    """GLM-4-9B's widths with `layers` layers, float32 random weights saved as
    safetensors (with the tiny tokenizer), in a fresh directory."""
    import transformers

    from replicas.tiny import build_tokenizer

    path = tempfile.mkdtemp(prefix="tpserve-multigpu-")
    config = hf_config("glm4-9b")
    config.num_hidden_layers = layers
    config.initializer_range = 0.2  # wide logits: greedy argmax well separated
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    del model
    build_tokenizer(path)
    return path


def _engine(shapes: Shapes, tp: int, **overrides: Any) -> Engine:
    base: dict[str, Any] = {"tp": tp, "device": shapes.device, "model": shapes.model,
                            "max_model_len": shapes.prompt + 64, "max_num_seqs": 1,
                            "max_num_batched_tokens": shapes.prompt}
    if shapes.random:
        base.update(load_format="random", dtype="bfloat16", kv_cache_memory=shapes.kv_bytes)
    return Engine(EngineConfig(**{**base, **overrides}))


def correctness(shapes: Shapes, tp: int) -> dict[str, Any]:
    """Greedy tokens at tp vs tp=1 in float32; bf16 logits at tp vs the float32 ones."""
    ckpt = _glm_checkpoint(layers=2) if shapes.random else shapes.model
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens, logits = {}, {}
    runs = [(1, "float32"), (tp, "float32"), (1, "bfloat16"), (tp, "bfloat16")]
    if shapes.device == "cpu":
        runs = runs[:2]  # no bfloat16 matmuls worth comparing on CPU
    for size, dtype in runs:
        # float32 sums on the wire too: the float32 case is the exact one
        comm = "float32" if dtype == "float32" else "auto"
        with Engine(EngineConfig(model=ckpt, tp=size, dtype=dtype, comm_dtype=comm,
                                 device=shapes.device, max_model_len=256,
                                 max_num_seqs=1)) as engine:
            prompt = prompts_for(1, 64, engine.spec.vocab_size)[0]
            tokens[size, dtype] = engine.generate([prompt], greedy)[0].token_ids
            logits[size, dtype] = engine.score(prompt).float().cpu()
    row: dict[str, Any] = {
        "case": f"{shapes.name}_tp{tp}_correctness", "unit": "tokens equal", "tp": tp,
        "ours": tokens[tp, "float32"] == tokens[1, "float32"],
        "float32_logits_max_abs_diff": round(float(
            (logits[tp, "float32"] - logits[1, "float32"]).abs().max()), 6)}
    if (tp, "bfloat16") in logits:
        ref = logits[1, "float32"]
        ours = float((logits[tp, "bfloat16"] - ref).abs().max())
        own = float((logits[1, "bfloat16"] - ref).abs().max())
        row.update(bf16_max_abs_diff=round(ours, 4), bf16_tp1_max_abs_diff=round(own, 4),
                   bf16_within_tolerance=ours <= 1.5 * own + 0.05)
    return row


def _comm_worker(rank: int, tp: int, port: int, device: str, hidden: int,
                 sizes: list[tuple[int, str]], out: Any) -> None:
    """Time the given all-reduces ([tokens, hidden] payloads of a dtype) back to back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=tp)
    payloads = [torch.ones(t, hidden, dtype=getattr(torch, d), device=device)
                for t, d in sizes]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for p in payloads[:4]:  # warm up the communicator
        dist.all_reduce(p)
    sync()
    start = time.perf_counter()
    for p in payloads:
        dist.all_reduce(p)
    sync()
    if rank == 0:
        out.put(time.perf_counter() - start)
    dist.destroy_process_group()


def comm_seconds(tp: int, device: str, hidden: int, sizes: list[tuple[int, str]]) -> float:
    """Wall time of these all-reduces alone, across tp processes (GPUs 0..tp-1)."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_comm_worker, args=(tp, free_port(), device, hidden, sizes, out),
                       nprocs=tp, join=True, start_method="spawn")
    return float(out.get())


def _fresh_worker(fn: Callable[..., Any], args: tuple[Any, ...], out: Any) -> None:
    try:
        out.put((fn(*args), None))
    except BaseException as e:  # noqa: BLE001 - re-raised in the parent
        out.put((None, repr(e)))


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new (spawned, non-daemon: its engine starts rank processes) process.
    On GPUs each engine of the suite starts in its own process: PyTorch numbers its
    symmetric-memory rendezvous per process, so a second engine in one process would
    fall back to NCCL (replicas/symm.py) and the one-shot rows would measure NCCL."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    proc = ctx.Process(target=_fresh_worker, args=(fn, args, out))
    proc.start()
    proc.join()
    if out.empty():
        raise RuntimeError(f"{fn.__name__} died in its process (exit code {proc.exitcode})")
    result, error = out.get()
    if error is not None:
        raise RuntimeError(f"{fn.__name__} failed: {error}")
    return result


def engine_figures(shapes: Shapes, tp: int, overrides: dict[str, Any], repeats: int,
                   seed: int) -> dict[str, Any]:
    """One engine: start-up time and phases, TTFT of one long prompt, batch-1 decode
    ms/token and its graph replay, whether the one-shot all-reduce was on, shutdown."""
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine = _engine(shapes, tp, **overrides)
    figures: dict[str, Any] = {"startup_s": time.perf_counter() - start,
                               "startup_phases": engine.worker.startup_s,
                               "rank_startup_phases": engine.worker.peer_startup()}
    try:
        vocab = engine.spec.vocab_size
        # a new prompt each time (a repeated one is served from the prefix cache), after
        # one untimed prefill of the same length (the first compiles the prefill kernels)
        fresh = iter(range(100 * seed, 100 * seed + repeats + 1))

        def long_prefill() -> None:
            engine.generate(prompts_for(1, shapes.prompt, vocab, seed=next(fresh)), one)

        long_prefill()
        figures.update(
            layers=engine.spec.num_layers, hidden=engine.spec.hidden_size,
            one_shot=engine.worker.comm.one_shot is not None,
            ttft_s=best_of(long_prefill, repeats),
            per_token_s=ours_per_token(engine, prompts_for(1, 128, vocab), shapes.new,
                                       repeats),
            # greedy tokens of one prompt, to compare settings that must agree to the bit
            greedy=engine.generate(prompts_for(1, 128, vocab, seed=3), SamplingParams(
                max_tokens=32, temperature=0.0, ignore_eos=True))[0].token_ids,
            folded=engine.worker.comm.folded > 0)
        if engine.worker.graphs is not None:
            figures["graph_ms"] = graph_step_ms(engine)
    finally:
        stop = time.perf_counter()
        engine.shutdown()
        figures["shutdown_s"] = time.perf_counter() - stop
    return figures


def prefill_and_decode(shapes: Shapes, tp: int, repeats: int) -> Iterator[dict[str, Any]]:
    """tp=1, then tp in each payload setting: decode ms/token, its graph replay, TTFT of
    one long prompt, start-up; then the rows: decode and TTFT against tp=1, the
    overlap's hidden share, the payloads side by side."""
    # the default payload (auto: bf16 for the GPUs' bf16 model, float16 for the CPU's
    # float32 one); the other payloads explicitly
    wire = EngineConfig().wire_dtype(torch.float32 if shapes.device == "cpu" else torch.bfloat16)
    settings: list[tuple[str, int, dict[str, Any]]] = [
        ("tp1", 1, {}), ("on", tp, {}), ("off", tp, {"overlap_chunk_tokens": 0})]
    settings += [(p, tp, {"comm_dtype": p}) for p in ("float16", "float32") if p != wire]
    if shapes.device == "cuda":
        settings.append(("nccl", tp, {"one_shot_all_reduce": False}))
    got: dict[str, dict[str, Any]] = {}
    for seed, (key, size, overrides) in enumerate(settings, start=1):
        args = (shapes, size, overrides, repeats, seed)
        got[key] = (in_fresh_process(engine_figures, *args) if shapes.device == "cuda"
                    else engine_figures(*args))
    layers, hidden = got["on"]["layers"], got["on"]["hidden"]
    # the long prompt's row-parallel all-reduces (o_proj and down_proj of every layer),
    # in the chunks the overlap sends them, timed alone
    chunks = [(min(shapes.chunk, shapes.prompt - s), wire)
              for s in range(0, shapes.prompt, shapes.chunk)]
    comm_s = comm_seconds(tp, shapes.device, hidden, chunks * 2 * layers)
    base, on, off = got["tp1"], got["on"], got["off"]
    name = f"{shapes.name}_tp{tp}"
    graph = ({"graph_replay_ms": round(on["graph_ms"], 3),
              "tp1_graph_replay_ms": round(base["graph_ms"], 3)} if "graph_ms" in on else {})
    yield {"case": f"{name}_decode_b1_in128_out{shapes.new}", "unit": "ms/token", "tp": tp,
           "ours": round(on["per_token_s"] * 1e3, 3),
           "tp1_ms": round(base["per_token_s"] * 1e3, 3),
           "speedup_over_tp1": round(base["per_token_s"] / on["per_token_s"], 3),
           "folded": on["folded"],
           "target": 2.7 if tp == 2 and shapes.name == "glm4-9b" else None, **graph}
    yield {"case": f"{name}_ttft_in{shapes.prompt}", "unit": "ms", "tp": tp,
           "ours": round(on["ttft_s"] * 1e3, 1), "tp1_ms": round(base["ttft_s"] * 1e3, 1),
           "ratio_to_tp1": round(on["ttft_s"] / base["ttft_s"], 3), "target_ratio": 0.6}
    yield {"case": f"{name}_prefill{shapes.prompt}_overlap", "unit": "hidden share",
           "tp": tp, "ours": round((off["ttft_s"] - on["ttft_s"]) / comm_s, 3),
           "ttft_overlap_on_ms": round(on["ttft_s"] * 1e3, 1),
           "ttft_overlap_off_ms": round(off["ttft_s"] * 1e3, 1),
           "allreduce_alone_ms": round(comm_s * 1e3, 1), "chunk_tokens": shapes.chunk,
           "target": 0.7}
    yield {"case": f"{name}_startup", "unit": "s", "tp": tp,
           "ours": round(on["startup_s"], 2), "tp1_s": round(base["startup_s"], 2),
           "ratio_to_tp1": round(on["startup_s"] / base["startup_s"], 3),
           "phases": on["startup_phases"], "tp1_phases": base["startup_phases"],
           "other_ranks_phases": on["rank_startup_phases"],
           "shutdown_s": round(on["shutdown_s"], 2), "target_ratio": 1.3}
    payloads = [(wire, on)] + [(p, got[p]) for p in ("float16", "float32") if p in got]
    if "nccl" in got:
        payloads.append((f"{wire}_nccl", got["nccl"]))
    for label, fig in payloads:
        comm = label.removesuffix("_nccl")
        yield {"case": f"{name}_comm_{label}", "unit": "ms/token", "tp": tp,
               "ours": round(fig["per_token_s"] * 1e3, 3),
               "ttft_ms": round(fig["ttft_s"] * 1e3, 1),
               **({"graph_replay_ms": round(fig["graph_ms"], 3)} if "graph_ms" in fig else {}),
               "one_shot": fig["one_shot"], "folded": fig["folded"],
               "greedy_equal_default": fig["greedy"] == on["greedy"],
               # per token: two row-parallel reduces a layer in the payload dtype
               "wire_bytes_per_token": 2 * layers * hidden * DTYPE_BYTES[comm]}


def folded_decode(shapes: Shapes, tp: int, repeats: int) -> dict[str, Any]:
    """Batch-1 decode with each all-reduce folded into the GEMVs beside it, against the
    one-shot kernel (the default), side by side: ms/token, graph replay, and whether the
    greedy tokens are the same (they must be, to the bit). Last in the suite: a new
    kernel's hang costs no other row."""
    figs = {fold: in_fresh_process(engine_figures, shapes, tp, {"fold_all_reduce": fold},
                                   repeats, 1) for fold in (False, True)}
    return {"case": f"{shapes.name}_tp{tp}_decode_b1_folded", "unit": "ms/token", "tp": tp,
            "ours": round(figs[True]["per_token_s"] * 1e3, 3),
            "unfolded_ms": round(figs[False]["per_token_s"] * 1e3, 3),
            **({"graph_replay_ms": round(figs[True]["graph_ms"], 3),
                "unfolded_graph_replay_ms": round(figs[False]["graph_ms"], 3)}
               if "graph_ms" in figs[True] else {}),
            "folded": figs[True]["folded"],
            "greedy_equal": figs[True]["greedy"] == figs[False]["greedy"]}


def llama_decode(tp: int, repeats: int) -> dict[str, Any]:
    """Llama-3-8B shapes, batch-1 decode at tp against tp=1 (target 2.4 ms at tp=2)."""
    shapes = dataclasses.replace(_shapes(False, "llama3-8b"), prompt=448)
    figs = {size: in_fresh_process(engine_figures, shapes, size, {}, repeats, 1)
            for size in (1, tp)}
    per = {size: fig["per_token_s"] for size, fig in figs.items()}
    return {"case": f"llama3-8b_tp{tp}_decode_b1_in128_out{shapes.new}", "unit": "ms/token",
            "tp": tp, "ours": round(per[tp] * 1e3, 3), "tp1_ms": round(per[1] * 1e3, 3),
            "speedup_over_tp1": round(per[1] / per[tp], 3), "folded": figs[tp]["folded"],
            "target": 2.4 if tp == 2 else None}


def _torch_one_shot(tp: int, device: torch.device) -> Callable[[torch.Tensor], None] | None:
    """PyTorch's own one-shot all-reduce over a symmetric buffer of its own (the
    reference the suite measures ours against), or None where this PyTorch lacks it."""
    import torch.distributed._symmetric_memory as symm_mem

    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return None
    name = dist.group.WORLD.group_name  # type: ignore[union-attr]
    buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // 2, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(buf, name)

    def reduce(x: torch.Tensor) -> None:
        flat = x.view(-1)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[: flat.numel()], flat, "sum",
                                                        name, flat)
    return reduce


def _one_shot_checks(one_shot: OneShotAllReduce, rank: int, tp: int, hidden: int
                     ) -> dict[str, Any]:
    """Ours against NCCL on random bfloat16 data, for each wire dtype: the largest
    difference from the exact sum rounded to bfloat16 (0 for bfloat16 and float32 wires;
    a float16 wire rounds twice). And the float16 overflow flag: set by a sum past 65504,
    clear otherwise."""
    out: dict[str, Any] = {}
    gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
    for rows in (1, 3, 128):  # 128 rows of float32: the whole 2 MiB buffer
        x = torch.randn(rows, hidden, generator=gen, device="cuda").to(torch.bfloat16)
        ref = x.float()
        dist.all_reduce(ref)  # exact: two bfloat16 values sum exactly in float32
        ref = ref.to(x.dtype).float()  # what a bfloat16 result can be at best
        for wire in (torch.bfloat16, torch.float16, torch.float32):
            got = one_shot.all_reduce(x.clone(), wire)
            err = (got.float() - ref).abs().max().item()
            out[f"max_err_{rows}x{hidden}_{str(wire)[6:]}"] = round(err, 5)
    overflow = torch.zeros((), dtype=torch.bool, device="cuda")
    one_shot.all_reduce(torch.full((1, hidden), 1000.0, device="cuda", dtype=torch.float16),
                        torch.float16, overflow)
    out["fp16_flag_clear_ok"] = not bool(overflow)
    one_shot.all_reduce(torch.full((1, hidden), 60000.0, device="cuda", dtype=torch.float16),
                        torch.float16, overflow)
    out["fp16_flag_set_ok"] = bool(overflow)
    return out


def _graph_all_reduce_worker(rank: int, tp: int, port: int, hidden: int, tokens: list[int],
                             out: Any) -> None:
    """One decode-size all-reduce in a CUDA graph (50 in one graph, replayed): NCCL,
    PyTorch's one-shot and ours, bfloat16, `tokens` rows of `hidden`; then ours against
    NCCL on random data for each wire dtype."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=tp, device_id=device)
    one_shot = OneShotAllReduce.create(None, tp, device, ONE_SHOT_MAX_BYTES)
    theirs = _torch_one_shot(tp, device)
    rows = []
    for t in tokens:
        x = torch.ones(t, hidden, dtype=torch.bfloat16, device="cuda")
        ways: dict[str, Callable[[], object]] = {"nccl": lambda x=x: dist.all_reduce(x)}
        if theirs is not None:
            ways["torch_one_shot"] = lambda x=x: theirs(x)
        if one_shot is not None:
            ways["one_shot"] = lambda x=x: one_shot.all_reduce(x)
        row: dict[str, Any] = {"tokens": t, "bytes": t * hidden * 2}
        for way, fn in ways.items():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(50):
                    fn()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
            row[f"{way}_us"] = round((time.perf_counter() - start) / 1000 * 1e6, 2)
        x.fill_(rank + 1.0)
        if one_shot is not None:  # the sum is right: 1 + 2 (+ ...)
            one_shot.all_reduce(x)
            row["one_shot_sum_ok"] = bool((x == tp * (tp + 1) / 2).all())
        rows.append(row)
    if one_shot is not None:
        rows[0].update(_one_shot_checks(one_shot, rank, tp, hidden))
    torch.cuda.synchronize()
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def graph_all_reduce(tp: int, hidden: int = 4096) -> Iterator[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_graph_all_reduce_worker,
                       args=(tp, free_port(), hidden, [1, 16, 64, 256], out),
                       nprocs=tp, join=True, start_method="spawn")
    for row in out.get():
        yield {"case": f"allreduce_tp{tp}_graph_{row['tokens']}tok", "unit": "us", "tp": tp,
               "ours": row.get("one_shot_us", row["nccl_us"]),
               "target": 8.0 if row["tokens"] == 1 else None, **row}


def _throughput_worker(gpu: int, shapes: Shapes, tp: int, requests: int, tokens: int,
                       barrier: Any, out: Any) -> None:
    """One engine on GPUs gpu..gpu+tp-1: warm up, wait for the others, then `requests`
    requests of 128 in / `tokens` out, on prompts the warm-up did not have (their prefill
    computed, not served from the prefix cache, as before v0.30); puts (start, end)
    wall-clock times."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu + r) for r in range(tp))
    engine = _engine(shapes, tp, max_model_len=512, max_num_seqs=256,
                     max_num_batched_tokens=8192)
    try:
        many = prompts_for(requests, 128, engine.spec.vocab_size)
        engine.generate(prompts_for(requests, 128, engine.spec.vocab_size, seed=1),
                        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        barrier.wait()
        start = time.time()
        engine.generate(many, SamplingParams(max_tokens=tokens, temperature=0.0,
                                             ignore_eos=True))
        out.put((start, time.time()))
    finally:
        engine.shutdown()


def throughput_layouts(tp: int) -> list[tuple[int, int]]:
    """(engine tp, engines) run on the same `tp` GPUs, each engine its own process: one
    tp engine, tp engines of tp=1, and from tp=4 on, tp / 2 engines of tp=2 (the choice
    between one wide replica and several narrower ones)."""
    layouts = [(tp, 1), (1, tp)]
    if tp > 2 and tp % 2 == 0:
        layouts.append((2, tp // 2))
    return layouts


def throughput(shapes: Shapes, tp: int, requests: int = 256, tokens: int = 128
               ) -> dict[str, Any]:
    """`requests` x 128/`tokens` output tok/s of each of `throughput_layouts(tp)`, the
    engines of a layout running at once; every ratio is the tp engine's to a layout's."""
    ctx = mp.get_context("spawn")
    rates = {}
    for size, count in throughput_layouts(tp):
        barrier, out = ctx.Barrier(count), ctx.SimpleQueue()
        procs = [ctx.Process(target=_throughput_worker, args=(
            i * size, shapes, size, requests, tokens, barrier, out)) for i in range(count)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=400)
        spans = [out.get() for _ in range(count)] if not out.empty() else []
        if len(spans) != count:
            raise RuntimeError(f"throughput: {count} engine(s) of tp={size} did not finish")
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        rates[size] = count * requests * tokens / wall
    row = {"case": f"{shapes.name}_tp{tp}_{requests}req_in128_out{tokens}", "unit": "tokens/s",
           "tp": tp, "ours": round(rates[tp], 1), f"{tp}x_tp1_tokens_per_s": round(rates[1], 1),
           "ratio_to_tp1_engines": round(rates[tp] / rates[1], 3), "target_ratio": 0.85}
    if 2 in rates and tp != 2:
        row[f"{tp // 2}x_tp2_tokens_per_s"] = round(rates[2], 1)
        row["ratio_to_tp2_engines"] = round(rates[tp] / rates[2], 3)
    return row


def live_allocation_sites(top: int = 8) -> list[tuple[str, float]]:
    """Where the CUDA memory still allocated was allocated: the first frame in this
    project of each live block's stack (needs memory history recording on), summed per
    site, MiB, largest first."""
    sites: dict[str, float] = {}
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = block.get("frames") or []
            ours = [f for f in frames if "/replicas/" in f.get("filename", "")]
            frame = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
            site = f"{os.path.basename(frame['filename'])}:{frame['line']} {frame['name']}"
            sites[site] = sites.get(site, 0.0) + block["size"] / 2**20
    return sorted(((k, round(v, 1)) for k, v in sites.items()), key=lambda kv: -kv[1])[:top]


def shutdown_cycles(shapes: Shapes, tp: int, cycles: int = 5) -> dict[str, Any]:
    """`cycles` create / generate / shutdown rounds in this process, on a small
    checkpoint: each shutdown's seconds, rank processes still alive after it, rank 0's
    GPU memory left allocated (and, on GPUs, where what is left was allocated)."""
    ckpt = shapes.model if shapes.device == "cpu" else _glm_checkpoint(layers=2)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    times, left, memory, tokens = [], 0, [], []
    cuda = shapes.device == "cuda"
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    for _ in range(cycles):
        engine = Engine(EngineConfig(model=ckpt, tp=tp, device=shapes.device,
                                     max_model_len=256, max_num_seqs=4))
        tokens.append(engine.generate([[5, 6, 7, 8]], greedy)[0].token_ids)
        start = time.perf_counter()
        engine.shutdown()
        times.append(round(time.perf_counter() - start, 2))
        left += sum(p.is_alive() for p in engine._ranks.handles)
        del engine
        if cuda:
            gc.collect()
            memory.append(torch.cuda.memory_allocated() // 2**20)
    sites = live_allocation_sites() if cuda else []
    if cuda:
        torch.cuda.memory._record_memory_history(enabled=None)
    return {"case": f"{shapes.name}_tp{tp}_shutdown_cycles", "unit": "s (slowest)", "tp": tp,
            "ours": max(times), "shutdown_s": times, "ranks_left": left,
            "same_tokens_every_cycle": all(t == tokens[0] for t in tokens),
            "rank0_mib_allocated_after": memory, "live_sites_mib": sites, "target": 5.0}


def suite(repeats: int, tps: tuple[int, ...] = (2, 4), smoke: bool = False
          ) -> Iterator[dict[str, Any]]:
    shapes = _shapes(smoke)
    have = 2 if smoke else torch.cuda.device_count()
    runnable = [tp for tp in tps if tp <= have]
    if not runnable:
        raise SystemExit(f"--suite multigpu needs at least {min(tps)} GPUs; {have} visible")
    started = time.perf_counter()

    def timed(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:  # when each row came, for planning the suite's one device call
            yield {**row, "suite_elapsed_s": round(time.perf_counter() - started, 1)}

    def cases(tp: int) -> Iterator[dict[str, Any]]:
        yield from prefill_and_decode(shapes, tp, repeats)  # the headline figures first
        if not smoke:
            yield from graph_all_reduce(tp)
            yield throughput(shapes, tp)
            yield llama_decode(tp, repeats)
        else:  # the harness only: a few short requests
            yield throughput(shapes, tp, requests=16, tokens=8)
        yield correctness(shapes, tp)
        yield shutdown_cycles(shapes, tp, cycles=2 if smoke else 5)
        if shapes.device == "cuda":
            yield folded_decode(shapes, tp, repeats)

    for tp in runnable:
        yield from timed(cases(tp))


def decode_probe(name: str, tp: int, overrides: dict[str, Any], repeats: int = 2
                 ) -> dict[str, Any]:
    """One engine of `name`'s shapes (random bf16 weights, 512 tokens, batch 1), measured
    as the suite measures each engine (`engine_figures`): batch-1 decode ms/token (128 in
    / 128 out) against its graph replay, start-up by phase, shutdown."""
    shapes = dataclasses.replace(_shapes(False, name), prompt=448, kv_bytes=4 * 2**30)
    fig = engine_figures(shapes, tp, overrides, repeats, seed=1)
    return {"case": f"{name}_tp{tp}_decode_b1_in128_out{shapes.new}", "unit": "ms/token",
            "tp": tp, "settings": overrides, "ours": round(fig["per_token_s"] * 1e3, 3),
            "graph_replay_ms": round(fig["graph_ms"], 3), "one_shot": fig["one_shot"],
            "folded": fig["folded"], "greedy": fig["greedy"],
            "ttft_in448_ms": round(fig["ttft_s"] * 1e3, 1),
            "startup_s": round(fig["startup_s"], 2), "startup_phases": fig["startup_phases"],
            "other_ranks_phases": fig["rank_startup_phases"],
            "shutdown_s": round(fig["shutdown_s"], 2)}


def decode_kernels(name: str, tp: int, overrides: dict[str, Any], top: int = 12,
                   replays: int = 20) -> dict[str, Any]:
    """Where one batch-1 decode step's GPU time goes on rank 0: PyTorch's profiler over
    `replays` graph replays (every rank replaying), kernels grouped by name, µs per step.
    For tp=2 against tp=1 side by side: which kernels do not halve."""
    from torch.profiler import ProfilerActivity, profile

    shapes = dataclasses.replace(_shapes(False, name), prompt=448, kv_bytes=4 * 2**30)
    engine = _engine(shapes, tp, **overrides)
    try:
        engine.generate(prompts_for(1, 128, engine.spec.vocab_size),
                        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        step_ms = engine.replay_graph_ms(replays)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.replay_graph_ms(replays)
        decode = kernel_table(prof, replays + 1, top)  # (+ the warm-up replay)
        # one prefill of a new prompt (the first of that length compiles): wall time
        # against its kernels' time says whether the host or the GPU sets its pace
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        engine.generate(prompts_for(1, shapes.prompt, engine.spec.vocab_size, seed=7), one)
        prefill = run_kernels(
            engine, prompts_for(1, shapes.prompt, engine.spec.vocab_size, seed=8), top)
    finally:
        engine.shutdown()
    return {"case": f"{name}_tp{tp}_decode_b1_kernels", "unit": "us/step", "tp": tp,
            "graph_replay_ms": round(step_ms, 3), "decode": decode,
            f"prefill{shapes.prompt}": prefill}


def host_breakdown(name: str, tp: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Where rank 0's host time goes per step in the throughput case (256 requests,
    128 in / 128 out): the engine's step phases timed by wrapping them, and the time the
    driver waited for the device. A tp=2 replica is host-bound once its host needs more
    per step than its GPUs do. Twice: through `generate`, and as 256 streams of
    `add_request` on an event loop (as a Serve replica runs them)."""
    from replicas.engine import Engine as EngineClass
    from replicas.graphs import DecodeGraphs
    from replicas.worker import Worker

    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    wrapped = [(EngineClass, n) for n in ("_step", "_batch", "_land", "_deliver", "_sample")]
    wrapped += [(Worker, "execute"), (Worker, "send"), (DecodeGraphs, "replay")]
    originals = [(cls, n, getattr(cls, n)) for cls, n in wrapped]

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
                calls[label] = calls.get(label, 0) + 1
        return run

    def measured(run: Callable[[], object]) -> dict[str, Any]:
        spent.clear()
        calls.clear()
        engine._device_wait_s = 0.0
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        steps = max(1, calls.get("Engine._step", 0))
        per = {k: round(v / steps * 1e3, 3)
               for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
        return {"tokens_per_s": round(256 * 128 / wall), "steps": steps,
                "device_wait_ms_per_step": round(engine._device_wait_s / steps * 1e3, 3),
                "ms_per_step": per}

    for cls, n, fn in originals:
        setattr(cls, n, timed(f"{cls.__name__}.{n}", fn))
    try:
        engine = _engine(_shapes(False, name), tp, max_model_len=512, max_num_seqs=256,
                         max_num_batched_tokens=8192, **overrides)
        try:
            many = prompts_for(256, 128, engine.spec.vocab_size)
            params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
            engine.generate(many, SamplingParams(max_tokens=4, temperature=0.0,
                                                 ignore_eos=True))
            generate = measured(lambda: engine.generate(many, params))
            streams = measured(lambda: asyncio.run(_stream_all(engine, many, params)))
        finally:
            engine.shutdown()
    finally:
        for cls, n, fn in originals:
            setattr(cls, n, fn)
    return {"case": f"{name}_tp{tp}_256req_in128_out128_host", "unit": "ms/step", "tp": tp,
            "settings": overrides, **generate, "streams": streams}


def prefill_host(name: str, tp: int, overrides: dict[str, Any], prompts: int = 9,
                 length: int = 40, top: int = 40) -> dict[str, Any]:
    """Where an eager prefill step's host time goes on rank 0: `prompts` new prompts of
    `length` tokens (a step that admits requests under load; such a step runs outside
    the decode graphs). Its wall time, bare (best of 3) and under PyTorch's profiler
    against its kernels' busy time (host-bound when the wall is the larger), then the
    driver thread's Python functions by own time (cProfile on the driver). cProfile
    inflates the total, and on the H200 its own time for `F.linear` read 72-83 µs a call
    where timing the calls gave ~20 (PERF.md v0.42): read its shares as leads."""
    import cProfile
    import pstats

    from replicas.engine import Engine as EngineClass

    shapes = dataclasses.replace(_shapes(False, name), prompt=prompts * length,
                                 kv_bytes=4 * 2**30)
    engine = _engine(shapes, tp, max_num_seqs=max(64, prompts), **overrides)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = engine.spec.vocab_size
    profiler = cProfile.Profile()
    original = EngineClass._step
    try:
        def run(seed: int) -> float:
            start = time.perf_counter()
            engine.generate(prompts_for(prompts, length, vocab, seed=seed), one)
            return time.perf_counter() - start

        run(1)  # (what the shapes compile)
        bare = min(run(seed) for seed in (2, 3, 4))
        kernels = (run_kernels(engine, prompts_for(prompts, length, vocab, seed=5), 12)
                   if shapes.device == "cuda" else None)  # (PyTorch's CUDA profiler)

        def profiled_step(self: Any) -> None:
            profiler.runcall(original, self)

        EngineClass._step = profiled_step  # type: ignore[method-assign]
        profiled = run(6)
        counts = engine.stats()  # (piece_graph_tokens: steps in pieces, their memory)
    finally:
        EngineClass._step = original  # type: ignore[method-assign]
        engine.shutdown()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    return {"case": f"{name}_tp{tp}_prefill_{prompts}x{length}_host", "unit": "ms",
            "tp": tp, "settings": overrides, "piece_steps": counts["piece_steps"],
            "piece_graph_bytes": counts["piece_graph_bytes"],
            "bare_ms": round(bare * 1e3, 2),
            "kernels": kernels, "cprofile_ms": round(profiled * 1e3, 2),
            "functions": [{"where": f"{file.rsplit('/', 2)[-1]}:{line}({fn})",
                           "calls": nc, "own_ms": round(tt * 1e3, 3),
                           "cum_ms": round(ct * 1e3, 3)}
                          for (file, line, fn), (_, nc, tt, ct, _) in rows]}


async def _stream_all(engine: Engine, prompts: list[list[int]], params: SamplingParams
                      ) -> None:
    async def one(prompt: list[int]) -> None:
        async for _ in engine.add_request(prompt, params):
            pass

    await asyncio.gather(*(one(p) for p in prompts))


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="One tensor-parallel engine, measured "
                                     "alone (the full suite: python -m replicas.bench "
                                     "--suite multigpu).")
    parser.add_argument("--probe", default="glm4-9b",
                        help="shapes: glm4-9b, llama3-8b or glm4-9b-rank-of-2 "
                        "(one tp=2 rank's share, whole)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="an EngineConfig field, e.g. one_shot_all_reduce=false")
    parser.add_argument("--kernels", action="store_true",
                        help="profile one decode step's kernels on rank 0 instead")
    parser.add_argument("--host", action="store_true",
                        help="rank 0's host time per step at 256 requests instead")
    parser.add_argument("--prefill-host", action="store_true",
                        help="where an eager prefill step's host time goes instead")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    probe = (decode_kernels if args.kernels else host_breakdown if args.host
             else prefill_host if args.prefill_host else decode_probe)
    print(json.dumps(probe(args.probe, args.tp, overrides)), flush=True)
    os._exit(0)  # (a rank 0 left in a collective with a dead peer cannot exit otherwise)


if __name__ == "__main__":
    main()
