"""Triton compiles a kernel once per set of constexprs and per class of each integer
argument's value (1, a multiple of 16, any other) and pointer's alignment. On a GPU each
new combination is a compile of ~0.2-1.5 s, the first of it in the middle of serving, in
some request's time to first token. So an argument that follows a step's shape (its
tokens, its block table's width) must not choose a variant: such arguments are named in
`replicas.kernels.common.STEP_SHAPED` (`do_not_specialize`).

Here a varied workload runs through the kernels in Triton's interpreter (prompts of 1 to
85 tokens in blocks of 4, chunked, prefix-cache hits, mixed steps, sampling; steps in
pieces and eager; the FP8 matmuls over 1 to 40 rows), each launch's classes recorded as
Triton's launcher would key them, and every kernel must meet one class per argument for
each set of constexprs: a shape-following argument that is not named fails here (with
`T`, `stab` or `n` left out of STEP_SHAPED, the int8 run failed when this workload was cut)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from rowwise import rows_in_pytorch

from replicas.config import EngineConfig
from replicas.engine import Engine
from replicas.sampler import SamplingParams

Launches = dict[tuple[Any, ...], dict[str, set[Any]]]


def value_class(value: Any) -> Any:
    """What Triton's launcher keys a non-constexpr argument by (None: not keyed here)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        size = "i64" if not -2**31 <= value < 2**31 else "i32"
        return (size, "1" if value == 1 else "16" if value % 16 == 0 else "")
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    return None


@pytest.fixture()
def launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Launches]:
    """Every kernel launch's argument classes, per (kernel, constexprs and launch
    options), leaving out the arguments the kernel does not specialize on."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.delenv("TPSERVE_KERNELS", raising=False)
    seen: Launches = collections.defaultdict(lambda: collections.defaultdict(set))
    run = InterpretedFunction.run

    def recording(self: Any, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> Any:
        unkeyed = set(self.kwargs.get("do_not_specialize") or ())
        group = seen[(self.fn.__name__, *sorted(kwargs.items()))]
        for name, value in zip(self.arg_names, args, strict=False):  # (constexprs: kwargs)
            if name not in unkeyed and (cls := value_class(value)) is not None:
                group[name].add(cls)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    yield seen


def variants(seen: Launches) -> dict[str, dict[str, set[Any]]]:
    """Per kernel and constexprs, the arguments met in more than one class."""
    return {f"{key[0]} {dict(key[1:])}": {n: c for n, c in args.items() if len(c) > 1}
            for key, args in seen.items() if any(len(c) > 1 for c in args.values())}


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_a_steps_shape_chooses_no_kernel_variant(launches: Launches, kv: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if kv != "auto":  # (the norms' and SwiGLU's launches, the same whatever the cache's
        rows_in_pytorch(monkeypatch)  # dtype, are the "auto" run's: tests/rowwise.py)
    # blocks of 4 tokens: a block table 16 blocks wide (a class of its own) at 61 tokens,
    # not 241, so that every prompt is a quarter of what 16-token blocks need (each token
    # a program of each row kernel, interpreted: this test took 80 s of CPU so)
    config = EngineConfig(model=None, dtype="float32", max_model_len=1024, block_size=4,
                          max_num_batched_tokens=32, piece_graph_tokens=16,
                          kv_cache_dtype=kv)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(5, 200, (n,), generator=g).tolist()

    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, ignore_eos=True)
    history = prompt(75)
    with Engine(config) as engine:
        for prompts, params in (
                ([prompt(1)], greedy), ([prompt(7)], greedy), ([prompt(16)], greedy),
                ([prompt(30)], greedy), ([prompt(25)], greedy),
                ([history], greedy),  # chunked, over blocks it cached
                ([history + prompt(10)], greedy),  # a prefix-cache hit
                ([prompt(n) for n in (3, 5, 16, 22)], sampled),  # mixed steps
                ([prompt(n) for n in (9, 12, 38, 48)], greedy)):
            engine.generate(prompts, params)
    kernels = collections.Counter(key[0] for key in launches)
    assert {"_attention_kernel", "_decode_kernel", "_rope_cache_kernel"} <= set(kernels)
    # nor do the step's tokens choose a constexpr of these (one set of them a model;
    # the decode kernel's splits follow the batch, but its steps are graphed on a GPU,
    # each bucket's captured at start)
    assert [kernels[k] for k in ("_attention_kernel", "_rope_cache_kernel", "_feed_kernel")
            ] == [1, 1, 1]
    assert not (found := variants(launches)), found


def test_the_fp8_matmuls_compile_once_for_every_row_count(launches: Launches) -> None:
    from replicas.kernels.fp8mm import w8a8_groups, w8a16
    from replicas.kernels.quant import quantize_tokens_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    scale = w.abs().amax(dim=1) / 448
    w8 = (w / scale[:, None]).to(torch.float8_e4m3fn)
    for rows in (1, 3, 16, 17, 40, 48):  # (17 and 48 share 3's and 16's configs)
        x = torch.randn(rows, 64, generator=g)
        w8a16(x, w8, scale)
        x8, x_scales = quantize_tokens_fp8(x)
        w8a8_groups(x8, x_scales, w8, scale)  # one scale a row
        w8a8_groups(x8, x_scales.expand(rows, 2).contiguous(), w8, scale)  # runs of 32
    assert {"_w8a16_kernel", "_w8a8_groups_kernel"} <= {key[0] for key in launches}
    assert not (found := variants(launches)), found


def compiled(seen: Launches) -> set[tuple[Any, ...]]:
    """Each (kernel and constexprs, argument, class) launched so far."""
    return {(key, name, cls) for key, args in seen.items() for name, classes in args.items()
            for cls in classes} | {(key,) for key in seen}


def test_the_first_turns_compile_nothing_the_start_did_not(
        launches: Launches, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up runs a prompt, a chunk over cached keys beside a decode row and a
    decode step on the scratch block (`Worker._warm_up`): a chat's first turn and its
    second, over the first's cached prefix, then launch no kernel variant it did not.
    (The interpreter warms up only when asked: `worker.warms_up`.)"""
    monkeypatch.setenv("TPSERVE_WARM_UP", "1")
    g = torch.Generator().manual_seed(1)
    first = torch.randint(5, 200, (30,), generator=g).tolist()
    second = first + torch.randint(5, 200, (45,), generator=g).tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with Engine(EngineConfig(model=None, dtype="float32", max_model_len=1024,
                             max_num_batched_tokens=128, piece_graph_tokens=64)) as engine:
        at_start = compiled(launches)
        assert at_start  # (the warm-up ran the kernels)
        assert engine.stats()["piece_steps"] == 0  # (not counted as served)
        engine.generate([first], greedy)
        engine.generate([second], greedy)
        assert engine.stats()["piece_steps"] >= 2
    assert compiled(launches) - at_start == set()


def test_every_rank_warms_up_in_step_at_tp2(monkeypatch: pytest.MonkeyPatch) -> None:
    """At tp=2 both ranks run the warm-up's steps, their all-reduces and the fed decode
    step's broadcast paired (a rank out of step would hang the start); the engine then
    gives tp=1's tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.setenv("TPSERVE_WARM_UP", "1")  # (the interpreter's, only when asked)
    monkeypatch.delenv("TPSERVE_KERNELS", raising=False)
    prompts = [[5, 6, 7, 8, 9] * 5, [3] * 40]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    tokens = []
    for tp in (1, 2):
        with Engine(EngineConfig(model=None, tp=tp, dtype="float32",
                                 max_num_batched_tokens=64, dist_timeout_s=60)) as engine:
            assert "warm_up" in engine.worker.startup_s
            tokens.append([o.token_ids for o in engine.generate(prompts, greedy)])
    assert tokens[0] == tokens[1]


def test_the_interpreter_warms_up_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`worker.warms_up`: GPUs always (their kernels compile then); Triton's interpreter,
    which compiles nothing, only with TPSERVE_WARM_UP=1."""
    from replicas.worker import warms_up

    monkeypatch.delenv("TPSERVE_WARM_UP", raising=False)
    assert warms_up(torch.device("cuda")) and not warms_up(torch.device("cpu"))
    monkeypatch.setenv("TPSERVE_TRITON_CPU", "1")
    monkeypatch.delenv("TPSERVE_KERNELS", raising=False)
    with Engine(EngineConfig(model=None, dtype="float32")) as engine:
        assert "warm_up" not in engine.worker.startup_s
    monkeypatch.setenv("TPSERVE_WARM_UP", "1")
    assert warms_up(torch.device("cpu"))
