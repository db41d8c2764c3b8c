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
  ms/token and TTFT side by side.

`smoke=True` runs every case on CPU (gloo, the built-in tiny model, short prompts): CI
checks the harness and the tp=2 token equality there; its timings mean nothing.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from replicas import Engine, EngineConfig, SamplingParams
from replicas.bench import (
    best_of,
    graph_step_ms,
    hf_config,
    model_dir,
    ours_per_token,
    prompts_for,
)
from replicas.engine import free_port
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


def _shapes(smoke: bool) -> Shapes:
    if smoke:
        return Shapes("tiny", "cpu", tiny_model_dir(), False, 256, 64, 16, None)
    return Shapes("glm4-9b", "cuda", model_dir("glm4-9b"), True, 8192, 2048, 128, 16 * 2**30)


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
        comm = "float32" if dtype == "float32" else "float16"
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


def prefill_and_decode(shapes: Shapes, tp: int, repeats: int) -> list[dict[str, Any]]:
    """Decode ms/token and TTFT of one long prompt per (comm dtype, overlap) setting;
    then the rows: decode at tp, overlap's hidden share, 16 vs 32-bit payloads."""
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    fresh = iter(range(1, 1000))
    got: dict[tuple[str, int], dict[str, float]] = {}
    layers = hidden = 0
    for comm, chunk in (("float16", shapes.chunk), ("float16", 0), ("float32", shapes.chunk)):
        with _engine(shapes, tp, comm_dtype=comm, overlap_chunk_tokens=chunk) as engine:
            layers, hidden = engine.spec.num_layers, engine.spec.hidden_size
            vocab = engine.spec.vocab_size
            figures = {"ttft_s": best_of(lambda e=engine, v=vocab: e.generate(
                prompts_for(1, shapes.prompt, v, seed=next(fresh)), one), repeats)}
            if chunk:  # decode is the same with the overlap off (one-token reduces)
                figures["per_token_s"] = ours_per_token(
                    engine, prompts_for(1, 128, vocab), shapes.new, repeats)
                if engine.worker.graphs is not None:
                    figures["graph_ms"] = graph_step_ms(engine)
            got[comm, chunk] = figures
    # the long prompt's row-parallel all-reduces (o_proj and down_proj of every layer),
    # in the chunks the overlap sends them, timed alone
    chunks = [(min(shapes.chunk, shapes.prompt - s), "float16")
              for s in range(0, shapes.prompt, shapes.chunk)]
    comm_s = comm_seconds(tp, shapes.device, hidden, chunks * 2 * layers)
    on, off = got["float16", shapes.chunk], got["float16", 0]
    wide = got["float32", shapes.chunk]
    rows = [{"case": f"{shapes.name}_tp{tp}_decode_b1_in128_out{shapes.new}", "unit": "ms/token",
             "tp": tp, "ours": round(on["per_token_s"] * 1e3, 3), "target": 2.7 if tp == 2
             else None, **({"graph_replay_ms": round(on["graph_ms"], 3)} if "graph_ms" in on
                           else {})},
            {"case": f"{shapes.name}_tp{tp}_prefill{shapes.prompt}_overlap", "unit": "hidden share",
             "tp": tp, "ours": round((off["ttft_s"] - on["ttft_s"]) / comm_s, 3),
             "ttft_overlap_on_ms": round(on["ttft_s"] * 1e3, 1),
             "ttft_overlap_off_ms": round(off["ttft_s"] * 1e3, 1),
             "allreduce_alone_ms": round(comm_s * 1e3, 1), "chunk_tokens": shapes.chunk,
             "target": 0.7}]
    for comm, fig in (("float16", on), ("float32", wide)):
        rows.append({"case": f"{shapes.name}_tp{tp}_comm_{comm}", "unit": "ms/token", "tp": tp,
                     "ours": round(fig["per_token_s"] * 1e3, 3),
                     "ttft_ms": round(fig["ttft_s"] * 1e3, 1),
                     # per token: two row-parallel reduces a layer in the payload dtype
                     "wire_bytes_per_token": 2 * layers * hidden * DTYPE_BYTES[comm]})
    return rows


def suite(repeats: int, tps: tuple[int, ...] = (2, 4), smoke: bool = False
          ) -> list[dict[str, Any]]:
    shapes = _shapes(smoke)
    have = 2 if smoke else torch.cuda.device_count()
    runnable = [tp for tp in tps if tp <= have]
    if not runnable:
        raise SystemExit(f"--suite multigpu needs at least {min(tps)} GPUs; {have} visible")
    rows: list[dict[str, Any]] = []
    for tp in runnable:
        rows.append(correctness(shapes, tp))
        rows += prefill_and_decode(shapes, tp, repeats)
    return rows
