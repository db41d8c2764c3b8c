"""The engine on one CUDA GPU against transformers on the same GPU (run on the device
machine: `pytest -m gpu tests/test_gpu.py`).

- float32: greedy tokens equal transformers' for the first 16 new tokens, every family.
- bfloat16: the engine's logits are as close to the float32 reference as transformers'
  own bfloat16 logits are: max |ours_bf16 - ref_fp32| <= 1.5 x max |hf_bf16 - ref_fp32|
  + 0.05. bfloat16 keeps 8 bits of mantissa, so both differ from float32 by the same
  order; a bug (a wrong rotary, a missing bias) would differ by the logits' own scale.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from checkpoints import BF16_FACTOR, BF16_SLACK, FAMILIES, CheckpointFactory, prompts
from transformers import AutoModelForCausalLM

from replicas import Engine, EngineConfig, SamplingParams, kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEW_TOKENS = 16


def hf_model(ckpt: str, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_greedy_matches_transformers_on_gpu(family: str,
                                                    checkpoint: CheckpointFactory) -> None:
    ckpt = checkpoint(family)
    hf = hf_model(ckpt, torch.float32)
    batch = prompts(hf.config.vocab_size)
    want = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW_TOKENS,
                        do_sample=False)[0, len(p):].tolist() for p in batch]
    del hf
    with Engine(EngineConfig(model=ckpt, device="cuda", dtype="float32")) as engine:
        got = engine.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                    ignore_eos=True))
    assert [o.token_ids for o in got] == want


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_bfloat16_logits_within_tolerance(family: str, checkpoint: CheckpointFactory) -> None:
    ckpt = checkpoint(family)
    ids = prompts(1000)[2]
    ref = hf_model(ckpt, torch.float32)(torch.tensor([ids], device="cuda")).logits[0].float()
    hf16 = hf_model(ckpt, torch.bfloat16)(torch.tensor([ids], device="cuda")).logits[0].float()
    with Engine(EngineConfig(model=ckpt, device="cuda", dtype="bfloat16")) as engine:
        ours = engine.score(ids).to("cuda")
    hf_err = (hf16 - ref).abs().max().item()
    our_err = (ours - ref).abs().max().item()
    print(f"{family}: bf16 max|diff| vs fp32: ours {our_err:.4f}, transformers {hf_err:.4f}")
    assert our_err <= BF16_FACTOR * hf_err + BF16_SLACK


def test_cuda_graph_decode_equals_eager(checkpoint: CheckpointFactory) -> None:
    """Decode steps replayed from CUDA graphs (batches padded to buckets, padded rows on
    the scratch block) give the tokens of the eager path, for batch sizes across buckets.
    float32: a padded bucket runs other GEMM shapes than the eager batch, and in bfloat16
    that rounding alone can flip a near-tied greedy token after ~20 steps (seen: 1 of 37
    sequences at token 21), which is not what this test is about."""
    ckpt = checkpoint("llama")
    # 5 rows (bucket 8) and 37 rows (bucket 64: more padded rows than a block has slots)
    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(37)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for graphs in (True, False):
        config = EngineConfig(model=ckpt, device="cuda", dtype="float32", cuda_graphs=graphs,
                              max_model_len=256, max_num_seqs=64)
        with Engine(config) as engine:
            assert (engine.worker.graphs is not None) == graphs
            outs[graphs] = [o.token_ids for o in engine.generate(prompts[:5], params)]
            outs[(graphs, 37)] = [o.token_ids for o in engine.generate(prompts, params)]
            outs[(graphs, "alone")] = engine.generate(prompts[:1], params)[0].token_ids
    assert outs[True] == outs[False]
    assert outs[(True, 37)] == outs[(False, 37)]
    assert outs[(True, "alone")] == outs[True][0]


@pytest.mark.parametrize("family", ["llama", "glm"])
def test_piece_graphs_equal_eager(family: str, checkpoint: CheckpointFactory) -> None:
    """Steps that admit prompts replayed from CUDA graphs in pieces (replicas/pieces.py)
    give the eager steps' tokens and logprobs (float32; tests/test_pieces.py's workload:
    chunks over a cached prefix, decode rows beside them, every-row logits)."""
    from test_pieces import assert_same

    config = EngineConfig(model=checkpoint(family), device="cuda", dtype="float32",
                          max_model_len=256, max_num_batched_tokens=24, piece_graph_tokens=32)
    assert assert_same(config, captured=True) >= 8


@pytest.mark.parametrize("family", ["llama", "glm"])
def test_the_first_turns_compile_no_triton_kernel(family: str,
                                                  checkpoint: CheckpointFactory) -> None:
    """Start-up's warm-up (`Worker._warm_up`) and the shape-free kernel arguments
    (`kernels.common.STEP_SHAPED`): a chat's first turn, its second over the cached
    prefix, prompts of other lengths beside decode rows, a sampled request: none of them
    compiles a Triton kernel (each compile is ~0.2-1.5 s of some request's TTFT)."""
    import triton
    import triton.language as tl

    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook")

    @triton.jit
    def probe(x):  # (a kernel this process has not compiled: the hook must see it)
        tl.store(x, 1.0)

    compiled: list[str] = []
    with Engine(EngineConfig(model=checkpoint(family), device="cuda", dtype="bfloat16",
                             max_model_len=1024)) as engine:
        knobs.runtime.jit_post_compile_hook = (
            lambda *args, **kwargs: compiled.append(str(kwargs.get("repr", args))[:200]))
        try:
            probe[(1,)](torch.zeros(1, device="cuda"))
            assert len(compiled) == 1, compiled  # (the hook works here)
            compiled.clear()
            g = torch.Generator().manual_seed(0)
            first = torch.randint(5, 200, (30,), generator=g).tolist()
            greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            engine.generate([first], greedy)
            engine.generate([first + torch.randint(5, 200, (45,), generator=g).tolist()],
                            greedy)
            engine.generate([torch.randint(5, 200, (n,), generator=g).tolist()
                             for n in (3, 17, 130, 300)], greedy)
            engine.generate([first[:20]], SamplingParams(max_tokens=8, temperature=0.8,
                                                         top_p=0.9, ignore_eos=True))
        finally:
            knobs.runtime.jit_post_compile_hook = None
    assert compiled == []


@pytest.mark.parametrize("changes", [{"quantization": "fp8", "kv_cache_dtype": "int8"},
                                     {"quantization": "fp8-w8a8"}])
def test_piece_graphs_with_fp8_equal_eager(changes: dict, checkpoint: CheckpointFactory
                                           ) -> None:
    """FP8 weights (weight-only FP8's batch matmul, or `_scaled_mm` with its per-token
    input quantization, captured in the pieces) and the int8 cache's scales written
    inside them, bfloat16 as these modes run: the eager steps' tokens, logprobs within
    0.1 (a padded bucket rounds its matmuls otherwise)."""
    from test_pieces import run

    config = EngineConfig(model=checkpoint("llama"), device="cuda", dtype="bfloat16",
                          max_model_len=256, max_num_batched_tokens=24,
                          piece_graph_tokens=0, **changes)  # (eager: pieces are the default)
    tokens, logprobs, _ = run(config)
    tokens2, logprobs2, steps = run(dataclasses.replace(config, piece_graph_tokens=32),
                                    captured=True)
    assert tokens2 == tokens and steps >= 8
    for a, b in zip(logprobs, logprobs2, strict=True):
        assert b == pytest.approx(a, abs=0.1)


def test_async_scheduling_equals_step_by_step_on_gpu(checkpoint: CheckpointFactory) -> None:
    """Steps launched from the previous step's tokens still on the GPU (the token feed
    kernel before the graph replay, and before eager steps where prompts join) give the
    tokens of reading every step back first: greedy and seeded, with stop tokens met a
    step late and max_tokens of 1."""
    ckpt = checkpoint("qwen2")
    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(9)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs: dict[bool, list[list[int]]] = {}
    for ahead in (True, False):
        config = EngineConfig(model=ckpt, device="cuda", dtype="float32", max_model_len=256,
                              max_num_seqs=16, async_scheduling=ahead)
        with Engine(config) as engine:
            first = engine.generate(prompts, greedy)
            stop = first[0].token_ids[4]
            params = [SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop,),
                                     ignore_eos=True),
                      SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                      SamplingParams(max_tokens=24, temperature=0.9, seed=11, ignore_eos=True),
                      *[greedy] * 6]
            outs[ahead] = [o.token_ids for o in first + engine.generate(prompts, params)]
    assert outs[True] == outs[False]
    assert len(outs[True][9]) <= 5 and len(outs[True][10]) == 1


def test_bfloat16_decode_kernels_follow_the_reference(checkpoint: CheckpointFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch-1 decode path as served in bfloat16 (CUDA graph, GEMVs with SwiGLU fused
    into the down projection, PDL launches) against the same weights' prefill path
    (cuBLAS, no graph): each greedy token is the reference's argmax or within 0.1 of it,
    and its log-probability is the reference's within 0.1 (bf16 keeps ~3 digits). The
    GEMV is forced on every layer: on a tiny model cuBLAS would win the timing."""
    pick = kernels.pick_gemv
    monkeypatch.setattr(kernels, "pick_gemv", lambda w, b, kind="plain": (
        pick(w, b, kind)[0] or kernels.GEMV_CONFIGS[0], {"forced": 1.0}))
    ckpt = checkpoint("llama")
    prompt = prompts(1000)[1]
    config = EngineConfig(model=ckpt, device="cuda", dtype="bfloat16", max_model_len=256,
                          max_num_seqs=4)
    with Engine(config) as engine:
        assert all(r["chosen"] != "cublas" for r in engine.worker.gemv_report.values())
        out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0,
                                                       ignore_eos=True, logprobs=True))[0]
        ref = torch.log_softmax(engine.score(prompt + out.token_ids[:-1]), -1)
    ref = ref[-len(out.token_ids):]
    picked = ref[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    assert out.logprobs is not None
    assert (ref.max(-1).values - picked).max() <= 0.1
    assert (torch.tensor(out.logprobs) - picked).abs().max() <= 0.1




def test_kv_pool_is_sized_after_measuring_the_largest_steps(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no kv_cache_memory given, the pool is the free memory's share less what the
    largest prompt step and the largest decode step allocate (measured at start), to the
    block; a peak 1 GiB larger leaves 1 GiB more out. Such a prompt and a full decode
    batch then run with the pool in place."""
    from replicas.kv_cache import block_bytes
    from replicas.worker import Worker

    ckpt = checkpoint("llama")
    util = 0.05
    config = EngineConfig(model=ckpt, device="cuda", dtype="bfloat16", max_model_len=2048,
                          max_num_seqs=64, max_num_batched_tokens=2048,
                          gpu_memory_utilization=util)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    measure = Worker._activation_peak
    for extra in (0, 2**30):
        monkeypatch.setattr(Worker, "_activation_peak", lambda self, e=extra: measure(self) + e)
        with Engine(config) as engine:
            worker, vocab = engine.worker, engine.spec.vocab_size
            # at least the decode step's float32 logits rows
            assert worker.activation_peak >= extra + 64 * vocab * 4
            pool = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                       for k, v in worker.kv)
            per_block = block_bytes(engine.spec, 1, config.block_size, torch.bfloat16)
            budget = int(worker.free_at_sizing * util) - worker.activation_peak
            assert pool == budget // per_block * per_block  # the pool's blocks + scratch
            long = torch.randint(3, vocab, (2000,)).tolist()
            short = [torch.randint(3, vocab, (5,)).tolist() for _ in range(64)]
            outs = engine.generate([long, *short], greedy)
            assert all(len(o.token_ids) == 4 for o in outs)
        torch.cuda.empty_cache()


# ---- FP8 (issue 20) ----


@pytest.mark.parametrize("changes", [{"quantization": "fp8"},
                                     {"quantization": "fp8", "kv_cache_dtype": "int8"},
                                     {"quantization": "fp8-w8a8", "keep_16bit": "qkv_proj"},
                                     {"quantization": "fp8", "chunk": 1},
                                     {"quantization": "fp8", "two_terms": 64},
                                     {"quantization": "fp8", "two_terms": 64, "fused": 1}],
                         ids=["weights", "weights+int8kv", "w8a8-keepqkv", "weights-rows1",
                              "weights-two-terms", "weights-two-terms-fused"])
def test_fp8_keeps_the_trained_models_top1(changes: dict, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """Issue 20's bar: teacher-forced top-1 agreement >= 98 % with the bfloat16 engine
    over 2048 positions of held-out text, on the trained checkpoint (replicas/accuracy.py;
    random checkpoints cannot say: their top-1 flips on any rounding). The 8-bit KV
    cache that holds it is int8 with a scale per (token, head); the e4m3 one (scale 1)
    did not (96.9 % here, 97.1-98.3 % on CPU checkpoints: PERF.md), and the fp8 suite
    records it beside. W8A8 with qkv kept 16-bit (`-keepqkv`) holds it too (98.14 % at
    e21be21); its few-row Triton matmuls once cost it 0.5 % unseen (PERF.md v0.67).
    `-rows1`: a step of one row, as batch-1 decode: FP8 GEMVs; both engines score a
    token a step. Both FP8 cases read the FP8 LM head with its top logits rescored
    (PERF.md v0.94; steps of up to 64 rows, v0.96). `-two-terms`: weight-only layers
    take x in two FP8 terms from 64 rows (every prefill step here; PERF.md v1.02);
    `-fused`: in one kernel (v1.03). The others with two terms off."""
    from replicas.accuracy import BARS, held_out, measure, trained_model_dir

    model = trained_model_dir()
    changes = dict(changes)
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", str(changes.pop("two_terms", 0)))
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FUSED", str(changes.pop("fused", 0)))
    base = EngineConfig(model=model, device="cuda", dtype="bfloat16", max_model_len=256,
                        max_num_batched_tokens=changes.pop("chunk", 64))
    # 2048 positions (the issue asks >= 512): at 98 % one run's share moves by +-0.3 %
    row = measure(base, changes, held_out(model, 16, 128))
    print(f"FP8 {changes}: {row}")
    assert row["positions"] == 2048 and row["top1_agreement"] >= BARS["top1_agreement"]


def test_fp8_decode_graphs_equal_eager_and_tune_the_fp8_gemv(checkpoint: CheckpointFactory
                                                             ) -> None:
    """FP8 weights and KV cache on the GPU: decode replayed from CUDA graphs gives the
    eager path's tokens (bfloat16 input rows; FP8 tiles through the GEMV where tuning
    picks it, the FP8 matmul otherwise: the tuning timed the FP8 shapes; the FP8 LM head
    at five rows a step and at one), and the pool holds twice the 16-bit pool's blocks."""
    ckpt = checkpoint("llama")
    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(5)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs, blocks = {}, {}
    for graphs in (True, False):
        config = EngineConfig(model=ckpt, device="cuda", dtype="bfloat16", cuda_graphs=graphs,
                              max_model_len=256, quantization="fp8", kv_cache_dtype="fp8",
                              kv_cache_memory=2**24)
        with Engine(config) as engine:
            outs[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
            # and one alone: batch-1 steps, the FP8 LM head's rescored rows (v0.94)
            outs[graphs].append(engine.generate(prompts[:1], params)[0].token_ids)
            blocks[graphs] = engine.stats()["num_kv_blocks"]
            assert any("float8" in key for key in engine.worker.gemv_report)
    with Engine(EngineConfig(model=ckpt, device="cuda", dtype="bfloat16", max_model_len=256,
                             kv_cache_memory=2**24)) as engine:
        plain = engine.stats()["num_kv_blocks"]
    assert outs[True] == outs[False]
    assert abs((blocks[True] + 1) - 2 * (plain + 1)) <= 2


@pytest.mark.parametrize("rows", [4, 32, 64])
def test_w8a16_slices_of_k_are_the_product_every_time_and_in_graphs(rows: int) -> None:
    """PERF.md v0.98 on the GPU, GLM-4-9B's o and down shapes (few tiles: w8a16_split
    gives them slices): the sliced product is the whole-K one's to a bfloat16 rounding,
    the same bits in 30 calls and in 20 replays of a CUDA graph that holds it (each
    replay's counts start from the zeros the last slices left), the counts 0 after."""
    from test_kernels import replays_equal

    from replicas.fp8 import quantize_rows
    from replicas.kernels import fp8mm

    gen = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in ((4096, 4096), (4096, 13696)):
        w8, scale = quantize_rows(torch.randn(n, k, device="cuda", generator=gen))
        x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
        bm, bn, bk, *_ = config = fp8mm.w8a16_config(rows)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert fp8mm.w8a16_split(0, -(-rows // bm) * -(-n // bn), -(-k // bk), sms) > 1
        whole = kernels.w8a16(x, w8, scale, None, (*config[:6], 1)).float()
        product = functools.partial(kernels.w8a16, x, w8, scale, None, (*config[:6], 0))
        first = product()
        torch.testing.assert_close(first.float(), whole, rtol=1e-2,
                                   atol=1e-2 * float(whole.abs().max()))
        for _ in range(30):
            assert torch.equal(product(), first)
        assert torch.equal(replays_equal(product, 20), first)
        assert not fp8mm._COUNTERS[x.device].any()


@pytest.mark.parametrize("rows", [16, 64, 256])
def test_w8a8_per_token_slices_of_k_are_the_product_every_time(rows: int) -> None:
    """PERF.md v0.99 on the GPU, GLM-4-9B's o and down shapes: each per-token config in
    slices of K gives `_scaled_mm`'s product to a bfloat16 rounding, and the same bits
    in 20 calls and in 10 replays of a CUDA graph that holds it."""
    from test_kernels import replays_equal

    from replicas.fp8 import quantize_rows
    from replicas.kernels import fp8mm

    gen = torch.Generator(device="cuda").manual_seed(rows)
    for n, k in ((4096, 4096), (4096, 13696)):
        w8, ws = quantize_rows(torch.randn(n, k, device="cuda", generator=gen))
        x8, xs = kernels.quantize_tokens_fp8(torch.randn(
            rows, k, device="cuda", generator=gen).to(torch.bfloat16))
        want = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.view(1, -1),
                                out_dtype=torch.bfloat16).float()
        for config in (c for c in fp8mm.W8A8_TOKENS_CONFIGS if len(c) > 6):
            product = functools.partial(kernels.w8a8_per_token, x8, xs, w8, ws, None,
                                        torch.bfloat16, config)

            first = product()
            torch.testing.assert_close(first.float(), want, rtol=2e-2,
                                       atol=2e-2 * float(want.abs().max()), msg=str(config))
            for _ in range(20):
                assert torch.equal(product(), first), config
            assert torch.equal(replays_equal(product, 10), first), config
        assert not fp8mm._COUNTERS[x8.device].any()


# ---- PERF.md v0.59-v0.61's kernels, built on CPU: the same checks on the GPU ----------


@pytest.mark.parametrize("k", [4096, 13696])
def test_per_token_quantization_in_one_pass_equals_two_on_gpu(
        k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_tokens_fp8 and silu_mul_quantize_fp8 with rows in one block (v0.59) write
    the two-pass kernels' bytes and scales; rms_norm_quantize_fp8 (v0.61) writes
    rms_norm then quantize_tokens_fp8's, and the same residual sum."""
    from replicas.kernels import quant

    gen = torch.Generator(device="cuda").manual_seed(k)
    x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    gate_up = torch.randn(64, 2 * k, device="cuda", dtype=torch.bfloat16, generator=gen)
    one = kernels.quantize_tokens_fp8(x), kernels.silu_mul_quantize_fp8(gate_up)
    monkeypatch.setattr(quant, "ONE_PASS_MAX_K", 0)
    two = kernels.quantize_tokens_fp8(x), kernels.silu_mul_quantize_fp8(gate_up)
    for (a8, a_s), (b8, b_s) in zip(one, two, strict=True):
        assert torch.equal(a_s, b_s) and torch.equal(a8.view(torch.uint8), b8.view(torch.uint8))
    residual = torch.randn_like(x)
    weight = 1 + torch.rand(k, device="cuda", generator=gen).to(torch.bfloat16)
    x8, scale, s = kernels.rms_norm_quantize_fp8(x, weight, 1e-5, residual)
    h, want_s = kernels.rms_norm(x, weight, 1e-5, residual)
    want8, want_scale = kernels.quantize_tokens_fp8(h)
    assert torch.equal(scale, want_scale) and torch.equal(s, want_s)
    assert torch.equal(x8.view(torch.uint8), want8.view(torch.uint8))


def test_decode_attention_probe_variants_equal_the_engines_on_gpu() -> None:
    """The attention probe's variants (other tiles; an int8 cache's F16 form, PERF.md
    v0.70) give the engine's tile's attention on GLM-4-9B's head shapes, 256 sequences
    of ~192 keys: none is recorded as failed."""
    from replicas.bench import attention_probe

    def timer(fn: object, copies: list) -> float:
        return 1.0

    # (the batch-1 tile listed too; at 256 sequences the engine runs others, PERF.md v0.74)
    rows = list(attention_probe([(256, 192)], "cuda", timer, 1.0,
                                tiles=[tuple(kernels.DECODE_TILE), (32, 4), (64, 8),
                                       (*kernels.DECODE_TILE[:2], 1)],
                                cache_dtypes=("bfloat16", "int8")))
    assert len(rows) == 2
    assert all(not r["failed"] for r in rows), [r["failed"] for r in rows]
    assert all(len(r["times_us"]) >= 4 for r in rows), [r["times_us"] for r in rows]


def test_the_norm_adds_two_runs_of_k_in_bfloat16_as_pytorch_on_gpu() -> None:
    """PERF.md v0.80 on the GPU (the CPU test's interpreter truncates to bfloat16): the
    norm kernels given a W8A8 product's two runs (`extra`) give, bit for bit, what they
    give for PyTorch's sum of them; GLM-4-9B's width, 256 rows."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    a, b, residual = (torch.randn(256, 4096, device="cuda", generator=gen
                                  ).to(torch.bfloat16) for _ in range(3))
    weight = (1 + torch.rand(4096, device="cuda", generator=gen)).to(torch.bfloat16)
    total = a.clone()
    total += b
    got = kernels.rms_norm_quantize_fp8(a, weight, 1e-5, residual, extra=b)
    want = kernels.rms_norm_quantize_fp8(total, weight, 1e-5, residual)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    got_h, got_s = kernels.rms_norm(a, weight, 1e-5, residual, extra=b)
    want_h, want_s = kernels.rms_norm(total, weight, 1e-5, residual)
    assert torch.equal(got_h, want_h) and torch.equal(got_s, want_s)


def test_w8a8_runs_of_k_folded_into_the_norm_score_as_added_on_gpu(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.80 through the engine on the GPU: with every bias-free W8A8 product
    picked as two runs of K on side streams (("streams", 2), forced), o_proj's and
    down_proj's runs added by the next norm score exactly as with them added first
    (TPSERVE_W8A8_FOLD=0), bfloat16, teacher-forced prompts; and greedy generation (its
    decode steps in CUDA graphs) gives the same tokens."""
    from replicas.kernels import fp8mm

    picked: list[tuple[int, int]] = []

    def two_runs(n: int, k: int, m: int) -> tuple[str, int] | None:
        if k % 32:
            return None
        picked.append((n, k))
        return ("streams", 2)

    monkeypatch.setattr(fp8mm, "w8a8_config", two_runs)
    monkeypatch.setattr(kernels, "w8a8_config", two_runs)
    folded_as_added(checkpoint("qwen2"), "fp8-w8a8", "TPSERVE_W8A8_FOLD", monkeypatch,
                    lambda: picked)


def folded_as_added(model: str, quantization: str, switch: str,
                    monkeypatch: pytest.MonkeyPatch,
                    folded_at_all: Callable[[], Any] = lambda: True) -> None:
    """A bf16 engine of `model` in `quantization` scores teacher-forced prompts exactly
    and generates greedy tokens (decode in CUDA graphs) as it does with $switch 0 (the
    products added before their reader, or whatever $switch turns off);
    `folded_at_all()` is truthy after the first run."""
    from replicas.accuracy import scored, sequences

    config = EngineConfig(model=model, device="cuda", dtype="bfloat16", max_model_len=64,
                          quantization=quantization)
    prompts = sequences(2, 24, 200, seed=4)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run() -> tuple[list[torch.Tensor], list[list[int]]]:
        with Engine(config) as engine:
            out = engine.generate(prompts, greedy)
        return scored(config, prompts), [o.token_ids for o in out]

    folded, folded_tokens = run()
    assert folded_at_all()
    monkeypatch.setenv(switch, "0")
    added, added_tokens = run()
    for a, b in zip(folded, added, strict=True):
        assert torch.equal(a, b)
    assert folded_tokens == added_tokens


def test_two_fp8_terms_folded_into_norm_and_swiglu_score_as_added_on_gpu(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v1.04 through the engine on the GPU: weight-only FP8 with x's two terms
    from the first row, o_proj's and down_proj's products added by the next norm's
    kernel and gate_up_proj's by SwiGLU's ($TPSERVE_FP8_TWO_TERMS_FOLD=1), score exactly
    as with them added first (0), bfloat16, teacher-forced prompts; and greedy generation
    (its decode steps in CUDA graphs) gives the same tokens."""
    from replicas import parallel

    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FOLD", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_NORM", "0")  # v1.04 alone
    real, deferred = parallel.two_term_parts, []

    def parts(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> Any:
        out = real(x, w8, scale)
        deferred.extend([] if out is None else [w8.shape])
        return out

    monkeypatch.setattr(parallel, "two_term_parts", parts)
    folded_as_added(checkpoint("qwen2"), "fp8", "TPSERVE_FP8_TWO_TERMS_FOLD", monkeypatch,
                    lambda: deferred)


def test_two_fp8_terms_made_by_the_norm_score_as_the_kernel_after_it_on_gpu(
        checkpoint: CheckpointFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v1.06 through the engine on the GPU: weight-only FP8 with x's two terms
    from the first row, qkv_proj's and gate_up_proj's made by the norm before them (and
    v1.04's folds on), score and generate (CUDA graphs) exactly as with the
    quantization kernel after a plain norm (TPSERVE_FP8_TWO_TERMS_NORM=0)."""
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FOLD", "1")
    monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_NORM", "1")
    real, normed = kernels.rms_norm_quantize_fp8, []

    def spy(*args: Any, two: bool = False, **kw: Any) -> Any:
        normed.extend([True] if two else [])
        return real(*args, two=two, **kw)

    monkeypatch.setattr(kernels, "rms_norm_quantize_fp8", spy)
    folded_as_added(checkpoint("qwen2"), "fp8", "TPSERVE_FP8_TWO_TERMS_NORM", monkeypatch,
                    lambda: normed)

def test_w8a8_cublas_runs_replay_in_a_cuda_graph_as_run_eagerly() -> None:
    """PERF.md v0.71: `_scaled_mm` in runs of K on side streams, captured into a CUDA graph
    (as a decode step's picks run) and replayed on new inputs, gives what the same runs
    give eagerly, bit for bit (the same kernels, the same sums), and is within bf16's
    rounding of one `_scaled_mm`; GLM-4-9B down_proj's shape at 128 rows, with qkv's bias
    shape too."""
    from replicas.fp8 import quantize_rows
    from replicas.kernels.fp8mm import W8A8_CUBLAS_CONFIGS, w8a8_cublas
    from replicas.kernels.quant import quantize_tokens_fp8

    gen = torch.Generator(device="cuda").manual_seed(3)
    for n, k, has_bias in ((4096, 13696, False), (4608, 4096, True)):
        w8, ws = quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16,
                                           generator=gen) * 0.02)
        bias = (torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
                if has_bias else None)
        x8, xs = quantize_tokens_fp8(torch.randn(128, k, device="cuda", dtype=torch.bfloat16,
                                                 generator=gen))
        for config in W8A8_CUBLAS_CONFIGS:
            w8a8_cublas(x8, xs, w8, ws, bias, torch.bfloat16, config)  # (warm-up, streams)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = w8a8_cublas(x8, xs, w8, ws, bias, torch.bfloat16, config)
            fresh, fresh_s = quantize_tokens_fp8(torch.randn(
                128, k, device="cuda", dtype=torch.bfloat16, generator=gen))
            x8.copy_(fresh)
            xs.copy_(fresh_s)
            graph.replay()
            want = w8a8_cublas(x8, xs, w8, ws, bias, torch.bfloat16, config)
            torch.cuda.synchronize()
            assert torch.equal(y, want), config
            one = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.view(1, -1),
                                   bias=bias, out_dtype=torch.bfloat16).float()
            assert ((y.float() - one).abs().max() <= 2e-2 * one.abs().max()), config


def test_w8a8_per_token_sums_as_near_float64_as_scaled_mm() -> None:
    """Over GLM-4-9B down_proj's K (13,696), every W8A8 per-token config is as near the
    float64 product of the same FP8 inputs as `torch._scaled_mm` (whose cuBLAS kernel
    adds each run of 128 products into float32). A config's dot adds at most 128
    products (fp8mm.FP8_PROMOTE_EVERY) in the FP8 tensor cores' narrower accumulator,
    then into the float32 tile; the 256-wide configs, adding all 256 so, had 1.64x
    `_scaled_mm`'s error (0.000208 against 0.000127) until PERF.md v0.67."""
    from replicas.fp8 import quantize_rows
    from replicas.kernels import fp8mm

    gen = torch.Generator(device="cuda").manual_seed(5)
    n, k = 4096, 13696
    w8, scale = quantize_rows(torch.randn(n, k, device="cuda", generator=gen) * 0.02)
    x8, xs = kernels.quantize_tokens_fp8(torch.randn(64, k, device="cuda",
                                                     dtype=torch.bfloat16, generator=gen))
    want = (x8.double() * xs.double()) @ (w8.double() * scale.double()[:, None]).t()

    def error(got: torch.Tensor) -> float:  # (float32 out: only the sums' error shows)
        return float((got.double() - want).abs().mean() / want.abs().mean())

    cublas = error(torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=scale.view(1, -1),
                                    out_dtype=torch.float32))
    errors = {config: error(fp8mm.w8a8_per_token(x8, xs, w8, scale, None, torch.float32,
                                                 config))
              for config in fp8mm.W8A8_TOKENS_CONFIGS}
    print(f"\nmean relative error: _scaled_mm {cublas:.3g}; "
          + "; ".join(f"{c} {e:.3g}" for c, e in errors.items()))
    assert all(e <= 1.5 * cublas + 1e-7 for e in errors.values()), (cublas, errors)


def test_w8a8_fast_accumulation_is_asked_for_and_stays_close_on_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v0.82-v0.83: a plain W8A8 product (gate_up's shape at 256 rows, no pick)
    asks `_scaled_mm` for fast accumulation unless TPSERVE_W8A8_FAST_ACCUM=0 (unset: on);
    either result within the probe's error of the float32 product of the same FP8 values
    (mean 0.4 % of its magnitude)."""
    from replicas.fp8 import quantize_rows, w8a8_tokens
    from replicas.kernels import fp8mm

    monkeypatch.setattr(fp8mm, "W8A8_PICKS", {})
    gen = torch.Generator(device="cuda").manual_seed(8)
    w8, scale = quantize_rows(torch.randn(27392, 4096, device="cuda", generator=gen) * 0.02)
    x8, xs = kernels.quantize_tokens_fp8(torch.randn(256, 4096, device="cuda",
                                                     dtype=torch.bfloat16, generator=gen))
    want = (x8.float() * xs) @ (w8.float() * scale[:, None]).T
    asked: list[bool] = []
    through = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: asked.append(
        kw.get("use_fast_accum", False)) or through(*a, **kw))
    for on in ("0", "1", None):
        if on is None:
            monkeypatch.delenv("TPSERVE_W8A8_FAST_ACCUM")
        else:
            monkeypatch.setenv("TPSERVE_W8A8_FAST_ACCUM", on)
        got = w8a8_tokens(x8, xs, w8, scale, None, torch.bfloat16).float()
        assert ((got - want).abs().mean() / want.abs().mean()).item() < 4e-3
    assert asked == [False, True, True]


def test_w8a8_per_token_on_gpu_and_its_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF v0.62: every W8A8 per-token Triton config agrees with `torch._scaled_mm` on a
    GLM-4-9B o_proj-shaped weight at 16 and 256 rows (pick_w8a8 checks each, and picks
    only what beats `_scaled_mm`), and fp8.w8a8_tokens then runs what was picked."""
    from replicas.fp8 import quantize_rows, w8a8_tokens
    from replicas.kernels import fp8mm

    monkeypatch.setattr(fp8mm, "W8A8_PICKS", {})
    gen = torch.Generator(device="cuda").manual_seed(3)
    w8, scale = quantize_rows(torch.randn(4096, 4096, device="cuda", generator=gen) * 0.02)
    picks, times = kernels.pick_w8a8(w8, scale, True, rows=(16, 256))
    assert [rows for rows, _ in picks] == [16, 256] and set(times) == {16, 256}
    for rows, config in picks:
        assert len(times[rows]) > 1 + len(fp8mm.W8A8_TOKENS_CONFIGS) // 2  # (most fit)
        if config is not None:
            assert times[rows][str(config)] < 0.97 * times[rows]["scaled_mm"]
    fp8mm.W8A8_PICKS[(4096, 4096)] = ((256, fp8mm.W8A8_TOKENS_CONFIGS[0]),)
    called = []
    through = fp8mm.w8a8_per_token  # (w8a8_picked calls fp8mm's own name, PERF v0.71)
    monkeypatch.setattr(fp8mm, "w8a8_per_token",
                        lambda *a: called.append(a[-1]) or through(*a))
    x8, xs = kernels.quantize_tokens_fp8(torch.randn(64, 4096, device="cuda",
                                                     dtype=torch.bfloat16, generator=gen))
    got = w8a8_tokens(x8, xs, w8, scale, None, torch.bfloat16)
    want = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=scale.view(1, -1),
                            out_dtype=torch.bfloat16)
    assert called == [fp8mm.W8A8_TOKENS_CONFIGS[0]]
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    x8, xs = kernels.quantize_tokens_fp8(torch.randn(300, 4096, device="cuda",
                                                     dtype=torch.bfloat16, generator=gen))
    w8a8_tokens(x8, xs, w8, scale, None, torch.bfloat16)  # more rows: _scaled_mm
    assert len(called) == 1


def test_two_fp8_terms_are_the_reference_and_near_the_16bit_product_in_graphs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PERF.md v1.02 on the GPU: kernels.quantize_two_terms_fp8 writes fp8's
    quantize_two_terms bit for bit (GLM-4-9B's 4,096 and 13,696-wide inputs, 256 rows);
    weight-only fp8_linear from TWO_TERM_ROWS rows (x's two terms through `_scaled_mm`)
    is within a few 16-bit roundings of x times the widened FP8 weight (root mean
    square; the largest error within 2^-6 of the largest value), where W8A8's one term
    is off by several times more, and a CUDA graph of it replays the same bits."""
    from test_kernels import replays_equal

    from replicas import kernels
    from replicas.fp8 import fp8_linear, quantize_rows, quantize_two_terms

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((4096, 4096), (4096, 13696)):
        x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        x[3, 100] = 300.0
        got8, got_scale = kernels.quantize_two_terms_fp8(x)
        want8, want_scale = quantize_two_terms(x)
        assert torch.equal(got_scale, want_scale)
        assert torch.equal(got8.view(torch.uint8), want8.view(torch.uint8))
        w8, scale = quantize_rows(torch.randn(n, k, device="cuda", generator=gen) * 0.02)
        exact = x.double() @ (w8.double() * scale.double()[:, None]).T
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS", "64")
        two = replays_equal(lambda x=x, w8=w8, scale=scale: fp8_linear(x, w8, scale), 3)
        monkeypatch.setenv("TPSERVE_FP8_TWO_TERMS_FUSED", "1")
        fused = replays_equal(lambda x=x, w8=w8, scale=scale: fp8_linear(x, w8, scale), 3)
        monkeypatch.delenv("TPSERVE_FP8_TWO_TERMS_FUSED")
        one = fp8_linear(x, w8, scale, w8a8=1)
        top, rms = float(exact.abs().max()), float(exact.pow(2).mean().sqrt())
        (two_max, two_rms), (fused_max, fused_rms), (one_max, one_rms) = (
            (float((y.double() - exact).abs().max()) / top,
             float((y.double() - exact).pow(2).mean().sqrt()) / rms)
            for y in (two, fused, one))
        print(f"in {k}: error over the product's largest, root mean square: two FP8 terms"
              f" {two_max:.5f}, {two_rms:.5f}; in one kernel {fused_max:.5f},"
              f" {fused_rms:.5f}; one (W8A8) {one_max:.5f}, {one_rms:.5f}")
        # bars from the float64 simulation (two bf16 roundings: rms 0.0024, W8A8 0.025)
        # and the H100 (largest 0.0064 in 4,096, 0.0107 in 13,696: FP8 tensor cores'
        # fast accumulation over long K; bf16 cuBLAS 0.0055). In one kernel: one
        # rounding, 128 products a promotion (PERF.md v1.03)
        assert two_max <= 2.0 ** -6 and two_rms <= 2.0 ** -7, (k, two_max, two_rms)
        assert fused_max <= 2.0 ** -7 and fused_rms <= two_rms, (k, fused_max, fused_rms)
        assert one_rms > 3 * two_rms, (k, two_rms, one_rms)


def test_two_fp8_terms_kernel_in_each_config_is_the_float64_sum_on_gpu() -> None:
    """PERF.md v1.03 on the GPU: kernels.w8a8_two_terms in each of TWO_TERMS_CONFIGS (the
    probe times them all), float32 out, at 200 tokens (no block divides them) of
    GLM-4-9B's o shape with a bias, against float64's sum of both terms' products."""
    from replicas import kernels
    from replicas.fp8 import quantize_rows
    from replicas.kernels.fp8mm import TWO_TERMS_CONFIGS

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(200, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    x8, xs = kernels.quantize_two_terms_fp8(x)
    w8, scale = quantize_rows(torch.randn(4096, 4096, device="cuda", generator=gen) * 0.02)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    terms = x8.double() * xs.double()
    want = ((terms[:200] + terms[200:]) @ (w8.double() * scale.double()[:, None]).T
            + bias.double())
    top = float(want.abs().max())
    for config in TWO_TERMS_CONFIGS:
        got = kernels.w8a8_two_terms(x8, xs, w8, scale, bias, torch.float32, config)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=top * 2.0 ** -11,
                                   msg=str(config))

@pytest.mark.parametrize("subject", ["attention", "swiglu_quant", "gate_up_mm",
                                     "w8a16_gate_up", "gemv",
                                     "gemv_qkv", "gemv_gate_up", "gemv_lm_head", "read_down"])
def test_ncu_subjects_run_their_kernel_on_gpu(subject: str) -> None:
    """bench.ncu_subject (what NCU_S profiles) runs each subject's kernel without ncu
    (cudaProfilerStart/Stop then do nothing), and the kernel ncu is told to select runs:
    torch's profiler sees a kernel whose name its NCU_SUBJECTS regex matches."""
    import re

    from replicas.bench import NCU_SUBJECTS, ncu_subject

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ncu_subject(subject, calls=1)
    names = {e.key for e in prof.key_averages()}
    assert any(re.search(NCU_SUBJECTS[subject], n) for n in names), sorted(names)[:20]
