"""Steps in pieces (replicas/pieces.py): the same logits as the eager forward.

On a CPU the pieces run as plain calls, padded to their bucket, with attention between
them reading the first T rows; on a GPU the same calls are what the graphs capture. Each
test runs one workload on an engine with `piece_graph_tokens` and on one without, and
compares every logprob: prompts chunked (a chunk over a cached prefix), decode rows
beside prefill chunks, a prefix-cache hit, a step whose every row wants logits
(prompt_logprobs), and steps of more tokens than the largest bucket (eager).
"""

from __future__ import annotations

import dataclasses

import pytest
from checkpoints import CheckpointFactory
from rowwise import rows_in_pytorch

from replicas import model
from replicas.config import DEFAULT_PIECE_TOKENS, ConfigError, EngineConfig
from replicas.engine import Engine
from replicas.pieces import BUCKETS, StepPieces
from replicas.sampler import SamplingParams

SHARED = list(range(300, 348))  # 3 blocks of 16
PROMPTS = [SHARED + [5, 6, 7], list(range(40, 47)), list(range(100, 180)), [9, 10]]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True,
                        prompt_logprobs=True)


def run(config: EngineConfig, captured: bool = False
        ) -> tuple[list[list[int]], list[list[float]], int]:
    """(tokens, logprobs of every prompt and output token, steps run in pieces);
    `captured`: the pieces must be CUDA graphs."""
    with Engine(config) as eng:
        pieces = eng.worker.pieces
        assert pieces is None or bool(pieces.graphs) == captured
        out = eng.generate(PROMPTS, PARAMS)
        out += eng.generate([SHARED + [8, 9]], PARAMS)  # the shared blocks cached
        steps = eng.stats()["piece_steps"]
    tokens = [c.token_ids for c in out]
    logprobs = [[x for x in (c.prompt_logprobs or []) if x is not None] + (c.logprobs or [])
                for c in out]
    return tokens, logprobs, steps


def assert_same(config: EngineConfig, captured: bool = False) -> int:
    """The workload's tokens equal, and its logprobs within 2e-3 (float32: a padded
    bucket's matmuls round differently, and these wide-logit models carry it through the
    steps; tp=2 against tp=1 differ by 4e-3), with and without pieces; the number of
    steps in pieces."""
    tokens, logprobs, _ = run(dataclasses.replace(config, piece_graph_tokens=0))
    tokens2, logprobs2, steps = run(config, captured)
    assert tokens2 == tokens
    for a, b in zip(logprobs, logprobs2, strict=True):
        assert b == pytest.approx(a, abs=2e-3)
    return steps


@pytest.mark.parametrize("family", ["llama", "qwen3", "glm", "mistral"])
def test_pieces_give_the_eager_logits(checkpoint: CheckpointFactory, family: str) -> None:
    """Families: QK norm (qwen3, inside a piece), partial interleaved rotary (glm), a
    sliding window (mistral, in the eager attention)."""
    config = EngineConfig(model=checkpoint(family), dtype="float32", max_model_len=256,
                          max_num_batched_tokens=24, piece_graph_tokens=32)
    assert assert_same(config) >= 8  # (every step but single-token ones)


def test_steps_past_the_largest_bucket_run_eagerly_between_pieces() -> None:
    """64-token steps eager, a 16-token one (two chunks' ends, two decode rows) in pieces,
    on the same cache."""
    config = EngineConfig(model=None, dtype="float32", max_num_batched_tokens=64,
                          piece_graph_tokens=16)
    assert assert_same(config) >= 1


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_pieces_through_the_triton_kernels(monkeypatch: pytest.MonkeyPatch, kv: str) -> None:
    """The GPU's path (Triton's interpreter on a CPU): rotary and the cache write inside
    the piece (with an int8 cache, its row scales too), attention written into the
    pieces' buffer, whole prompts through fused SDPA."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.delenv("TPSERVE_KERNELS", raising=False)
    monkeypatch.setattr("replicas.worker.FLASH_MIN_TOKENS", 16)  # (512: too slow here)
    if kv != "auto":  # (the norms and SwiGLU in pieces: the "auto" run's, tests/rowwise.py)
        rows_in_pytorch(monkeypatch)
    fresh = []
    through = model.fresh_attention
    monkeypatch.setattr(model, "fresh_attention",
                        lambda *a, **k: fresh.append(a[-1] is not None) or through(*a, **k))
    config = EngineConfig(model=None, dtype="float32", max_num_batched_tokens=64,
                          piece_graph_tokens=64, kv_cache_dtype=kv)
    assert assert_same(config) >= 3
    assert True in fresh  # a step of whole prompts, in pieces


def test_pieces_at_tp2() -> None:
    """Every rank runs the same pieces, their all-reduces in the same order."""
    config = EngineConfig(model=None, tp=2, dtype="float32", max_num_batched_tokens=64,
                          piece_graph_tokens=64)
    assert assert_same(config) >= 3


def test_buckets_and_bounds() -> None:
    with Engine(EngineConfig(model=None, max_num_batched_tokens=100,
                             piece_graph_tokens=1000)) as eng:
        pieces = eng.worker.pieces
        assert isinstance(pieces, StepPieces)
        assert pieces.buckets == [16, 32, 64, 128]  # up to the step's budget, 100
        assert pieces.fits(100) and pieces.fits(1) and not pieces.fits(129)
        assert not pieces.graphs  # a CPU: plain calls
    with Engine(EngineConfig(model=None)) as eng:
        assert eng.worker.pieces is None  # off by default on a CPU
        assert eng.stats()["piece_graph_tokens"] == 0
    with pytest.raises(ConfigError, match="piece_graph_tokens"):
        EngineConfig(model=None, piece_graph_tokens=BUCKETS[-1] + 1)
    with pytest.raises(ConfigError, match="piece_graph_tokens"):
        EngineConfig(model=None, piece_graph_tokens=-1)


def test_default_is_on_where_pieces_are_captured_at_tp1() -> None:
    """Not set: 512 on a GPU with decode graphs at tp=1 (measured there, PERF.md v0.48),
    0 on a CPU, without graphs and at tp > 1 (not measured on several GPUs); a value set
    holds everywhere."""
    def resolved(**fields: object) -> int:
        return EngineConfig(model=None, **fields).resolved_piece_graph_tokens()

    assert resolved(device="cuda") == DEFAULT_PIECE_TOKENS == 512
    assert resolved(device="cpu") == 0
    assert resolved(device="cuda", cuda_graphs=False) == 0
    assert resolved(device="cuda", tp=2) == 0
    assert resolved(device="cuda", tp=2, piece_graph_tokens=256) == 256
    assert resolved(device="cpu", piece_graph_tokens=64) == 64
    assert resolved(device="cuda", piece_graph_tokens=0) == 0


# aten ops a CUDA graph cannot hold: those that wait for the device's result (the host
# reads a value or a shape computed there: the capture fails, or freezes one step's
# value), and a tensor made from host values (`torch.tensor(...)`: its copy to the device
# would replay from a host buffer long gone)
CAPTURE_HAZARDS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal",
                   "unique", "_unique", "item", "lift_fresh", "lift_fresh_copy")


@pytest.mark.parametrize("triton_path", [False, True])
def test_pieces_never_wait_for_the_device(monkeypatch: pytest.MonkeyPatch,
                                          triton_path: bool) -> None:
    """What a piece runs, as aten sees it: no op that reads a value or a shape back from
    the device (`.item()`, a boolean mask's index, `nonzero`) and no tensor made from host
    values, which a CUDA graph cannot hold. The Triton path is the GPU's (its kernels run
    in the interpreter here)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if triton_path:
        pytest.importorskip("triton")
        monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
        monkeypatch.delenv("TPSERVE_KERNELS", raising=False)
    seen: set[str] = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Engine(EngineConfig(model=None, dtype="float32", piece_graph_tokens=64)) as eng:
        pieces = eng.worker.pieces
        assert pieces is not None
        with torch.inference_mode(), Ops():
            for piece in pieces.pieces[32]:
                piece()
    assert "linear" in seen and "embedding" in seen  # (the ops were seen)
    assert not seen & set(CAPTURE_HAZARDS)


@pytest.mark.parametrize("changes", [{"kv_cache_dtype": "int8"},
                                     {"quantization": "fp8", "kv_cache_dtype": "fp8"},
                                     {"quantization": "fp8-w8a8"}])
def test_pieces_with_8_bit_weights_and_caches(changes: dict) -> None:
    """The int8 cache's row scales and the FP8 cache's bytes are written inside a piece
    (its cache write), FP8 weights' matmuls run in it (their CPU reference here)."""
    config = EngineConfig(model=None, dtype="float32", max_num_batched_tokens=24,
                          piece_graph_tokens=32, **changes)
    assert assert_same(config) >= 8
