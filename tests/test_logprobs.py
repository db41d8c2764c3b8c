"""The OpenAI sampling extras of the engine against transformers, on CPU (float32): raw
log-probabilities of generated tokens and their top alternatives, prompt log-probabilities
(`echo`), also over a cached prefix and after chunked prefill, presence / frequency
penalties and logit_bias, max_tokens=None (up to the context), streaming deltas, and one
case at tp=2.

Tolerance: LOGPROB_ATOL = 1e-4 absolute on log-probabilities, as on the logits in
tests/test_hf_equivalence.py (float32 on both sides, only summation order differs:
measured max |diff| 5e-6 over 47 positions of the llama checkpoint: 20x room).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from checkpoints import CheckpointFactory
from transformers import AutoModelForCausalLM

from replicas import ConfigError, Engine, EngineConfig, RequestError, SamplingParams
from replicas.outputs import Completion, TokenDelta, joined
from replicas.sampler import sample_on_device

LOGPROB_ATOL = 1e-4
TOP = 5
MAX_MODEL_LEN = 96
FIRST_TOKEN = 3  # prompts avoid <s>, </s>, <pad> (ids 0-2)


def prompt(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, 1000, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def ckpt(checkpoint: CheckpointFactory) -> str:
    return checkpoint("llama")


@pytest.fixture(scope="module")
def hf(ckpt: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(ckpt: str) -> Iterator[Engine]:
    # 16-token steps: a 40-token prompt is prefilled in three chunks
    config = EngineConfig(model=ckpt, dtype="float32", max_num_batched_tokens=16,
                          max_model_len=MAX_MODEL_LEN)
    with Engine(config) as eng:
        yield eng


@torch.no_grad()
def hf_logprobs(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax of the next-token logits at every position [len, vocab]."""
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)


def check_generated(out: Completion, ref: torch.Tensor, prompt_len: int) -> None:
    """`out`'s logprobs and top_logprobs against `ref` (hf_logprobs of prompt + tokens)."""
    n = len(out.token_ids)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert len(out.logprobs) == len(out.top_logprobs) == n
    rows = ref[prompt_len - 1 : prompt_len - 1 + n]  # row i predicts token i
    want = rows[torch.arange(n), torch.tensor(out.token_ids)]
    assert torch.allclose(torch.tensor(out.logprobs, dtype=torch.float64), want,
                          atol=LOGPROB_ATOL, rtol=0)
    values, ids = rows.topk(TOP, dim=-1)
    for row, top in enumerate(out.top_logprobs):
        assert [t for t, _ in top] == ids[row].tolist()  # the same tokens, in order
        assert [v for _, v in top] == pytest.approx(values[row].tolist(), abs=LOGPROB_ATOL)


def check_prompt(out: Completion, ref: torch.Tensor, ids: list[int], top: int) -> None:
    """`out`'s prompt_logprobs (and prompt_top_logprobs) against `ref` over `ids`."""
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    n = len(ids) - 1
    want = ref[torch.arange(n), torch.tensor(ids[1:])]  # row i predicts token i + 1
    got = torch.tensor(out.prompt_logprobs[1:], dtype=torch.float64)
    assert torch.allclose(got, want, atol=LOGPROB_ATOL, rtol=0), (got - want).abs().max()
    if not top:
        assert out.prompt_top_logprobs is None
        return
    assert out.prompt_top_logprobs is not None and out.prompt_top_logprobs[0] is None
    values, top_ids = ref[:n].topk(top, dim=-1)
    for i, pairs in enumerate(out.prompt_top_logprobs[1:]):
        assert pairs is not None
        assert [t for t, _ in pairs] == top_ids[i].tolist()
        assert [v for _, v in pairs] == pytest.approx(values[i].tolist(), abs=LOGPROB_ATOL)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generated_logprobs_and_top_logprobs_match_transformers(
        engine: Engine, hf: torch.nn.Module, temperature: float) -> None:
    """Raw log-probabilities: the same at any temperature (the sampled tokens differ),
    in a batch with a request that asks for none."""
    ids = prompt(40, seed=1)
    params = SamplingParams(max_tokens=8, temperature=temperature, seed=3, logprobs=True,
                            top_logprobs=TOP, ignore_eos=True)
    out, plain = engine.generate([ids, prompt(7, seed=2)], [params, SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True)])
    check_generated(out, hf_logprobs(hf, ids + out.token_ids), len(ids))
    assert plain.logprobs is None and plain.top_logprobs is None
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_then_generation(engine: Engine, hf: torch.nn.Module) -> None:
    """echo + logprobs: every prompt token's log-probability (the first None) and its
    top ones, from a prompt prefilled in chunks, then generated tokens in the same
    request."""
    ids = prompt(40, seed=4)
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=TOP,
                            prompt_logprobs=True, ignore_eos=True)
    out = engine.generate([ids], params)[0]
    ref = hf_logprobs(hf, ids + out.token_ids)
    check_prompt(out, ref, ids, TOP)
    check_generated(out, ref, len(ids))
    # top_logprobs for the prompt only (logprobs off): none for the generated tokens
    only = engine.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, top_logprobs=2,
                                                 prompt_logprobs=True, ignore_eos=True))[0]
    check_prompt(only, ref, ids, 2)
    assert only.logprobs is None and only.top_logprobs is None
    one = engine.generate([[ids[0]]], SamplingParams(max_tokens=1, prompt_logprobs=True))[0]
    assert one.prompt_logprobs == [None]


def test_prompt_logprobs_over_a_cached_prefix(engine: Engine, hf: torch.nn.Module) -> None:
    """A prompt whose first blocks are in the prefix cache (a request before computed
    them) still gets a log-probability for each of its tokens; the same prompt twice
    gets the same values; and the blocks it computed serve later requests."""
    shared = prompt(48, seed=5)  # 3 full blocks of 16
    first = shared + [7, 8, 9]
    engine.generate([first], SamplingParams(max_tokens=2, temperature=0.0))
    hits = engine.stats()["prefix_cache_hit_blocks"]
    engine.generate([first], SamplingParams(max_tokens=1, temperature=0.0))
    assert engine.stats()["prefix_cache_hit_blocks"] - hits == 3  # the prefix is cached
    echo = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=True, top_logprobs=3)
    ids = shared + [11, 12]
    out = engine.generate([ids], echo)[0]
    check_prompt(out, hf_logprobs(hf, ids), ids, 3)
    again = engine.generate([ids], echo)[0]
    assert again.prompt_logprobs == pytest.approx(out.prompt_logprobs, abs=1e-6)
    hits = engine.stats()["prefix_cache_hit_blocks"]
    engine.generate([ids], SamplingParams(max_tokens=1, temperature=0.0))
    assert engine.stats()["prefix_cache_hit_blocks"] - hits == 3


def test_prompt_logprobs_after_preemption(ckpt: str, hf: torch.nn.Module) -> None:
    """A pool too small for the batch preempts sequences mid-prompt and mid-generation:
    each request's prompt log-probabilities are still one per token, and right."""
    config = EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=8, block_size=8,
                          max_model_len=64, max_num_batched_tokens=16)
    prompts = [prompt(30, seed=s) for s in (6, 7, 8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=True,
                            ignore_eos=True)
    with Engine(config) as eng:
        outs = eng.generate(prompts, params)
        assert eng.stats()["preemptions"] > 0
    for ids, out in zip(prompts, outs, strict=True):
        check_prompt(out, hf_logprobs(hf, ids), ids, 0)


@torch.no_grad()
def hf_penalized_greedy(hf: torch.nn.Module, ids: list[int], n: int, presence: float = 0.0,
                        frequency: float = 0.0, bias: dict[int, float] | None = None
                        ) -> list[int]:
    """OpenAI's penalties by hand on transformers' logits, greedy: each step subtracts
    presence * (count > 0) + frequency * count from the logits of the tokens generated so
    far, adds the bias, and takes the argmax."""
    out: list[int] = []
    for _ in range(n):
        logits = hf(torch.tensor([ids + out])).logits[0, -1].double()
        for token, count in Counter(out).items():
            logits[token] -= presence + frequency * count
        for token, value in (bias or {}).items():
            logits[token] += value
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (2.0, 0.0), (-2.0, 0.0),
                                                (0.5, -1.0)])
def test_penalties_change_greedy_as_transformers_does(
        engine: Engine, hf: torch.nn.Module, presence: float, frequency: float) -> None:
    """Greedy with penalties equals the hand-made reference, and differs from plain
    greedy (so the penalties did something); batched with other requests, raw logprobs
    still reported."""
    ids = prompt(12, seed=13)  # its greedy continuation repeats tokens (756, 182)
    n = 24
    plain = hf_penalized_greedy(hf, ids, n)
    want = hf_penalized_greedy(hf, ids, n, presence, frequency)
    assert want != plain
    params = SamplingParams(max_tokens=n, temperature=0.0, presence_penalty=presence,
                            frequency_penalty=frequency, logprobs=True, top_logprobs=TOP,
                            ignore_eos=True)
    greedy = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = engine.generate([ids, ids, prompt(20, seed=12)], [params, greedy, greedy])
    assert outs[0].token_ids == want
    assert outs[1].token_ids == plain
    check_generated(outs[0], hf_logprobs(hf, ids + want), len(ids))


def test_logit_bias(engine: Engine, hf: torch.nn.Module) -> None:
    """+100 makes greedy choose a token; a bias that flips the argmax once matches the
    reference; keys given as strings (JSON) are token ids; logprobs stay raw."""
    ids = prompt(10, seed=13)
    forced = engine.generate([ids], SamplingParams(
        max_tokens=4, temperature=0.0, logit_bias={"123": 100.0}, ignore_eos=True,
        logprobs=True))[0]
    assert forced.token_ids == [123] * 4
    ref = hf_logprobs(hf, ids + forced.token_ids)
    raw = ref[len(ids) - 1 : len(ids) + 3, 123]
    assert torch.allclose(torch.tensor(forced.logprobs, dtype=torch.float64), raw,
                          atol=LOGPROB_ATOL, rtol=0)
    assert raw.max() < -1.0  # not a token greedy would pick: the bias made it
    plain = hf_penalized_greedy(hf, ids, 6)
    bias = {plain[0]: -100.0, plain[2]: 3.0}
    want = hf_penalized_greedy(hf, ids, 6, bias=bias)
    assert want != plain
    got = engine.generate([ids], SamplingParams(max_tokens=6, temperature=0.0,
                                                logit_bias=bias, ignore_eos=True))[0]
    assert got.token_ids == want


def test_bad_logit_bias_and_penalties_are_refused(engine: Engine) -> None:
    vocab = engine.spec.vocab_size
    with pytest.raises(RequestError, match=f"token id {vocab}"):
        engine.generate([[5, 6]], SamplingParams(logit_bias={vocab: 1.0}))
    for kwargs, word in [({"logit_bias": {"-1": 1.0}}, "'-1'"),
                         ({"logit_bias": {5: 101.0}}, "logit_bias of token 5"),
                         ({"logit_bias": {5: "x"}}, "logit_bias of token 5"),
                         ({"presence_penalty": 2.5}, "presence_penalty"),
                         ({"frequency_penalty": -2.01}, "frequency_penalty"),
                         ({"frequency_penalty": float("nan")}, "frequency_penalty"),
                         ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                         ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
                         ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(ConfigError, match=word):
            SamplingParams(**kwargs)
    assert SamplingParams().max_tokens == 16
    assert SamplingParams(logit_bias=None).logit_bias == {}  # the API's null
    hash(SamplingParams(logit_bias={1: 2.0}))  # still hashable


def test_the_graphs_argmax_is_not_used_for_adjusted_rows() -> None:
    """sample_on_device takes a decode graph's argmax of the raw logits for greedy rows
    (the fast path), except when a row's logits are penalized or biased."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    stale = torch.tensor([7, 8, 9])  # what a graph's argmax would say (here: made up)
    greedy = SamplingParams(temperature=0.0)
    gens = [torch.Generator() for _ in range(3)]
    tokens, _ = sample_on_device(logits, [greedy] * 3, gens, argmax=stale)
    assert tokens.tolist() == [7, 8, 9]  # the given argmax is used, not recomputed
    biased = SamplingParams(temperature=0.0, logit_bias={42: 100.0})
    tokens, lps = sample_on_device(logits, [greedy, biased, greedy], gens, argmax=stale,
                                   counts=[{}, {}, {}])
    assert tokens.tolist() == [int(logits[0].argmax()), 42, int(logits[2].argmax())]
    assert lps is None
    penalized = SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=True)
    row = torch.zeros(1, 50)
    row[0, 5], row[0, 6] = 3.0, 2.5  # 5 wins unless its penalty (2.0) applies
    tokens, lps = sample_on_device(row, [penalized], gens[:1], argmax=torch.tensor([5]),
                                   counts=[{5: 1, 9: 4}])
    assert tokens.tolist() == [6]
    assert lps is not None  # raw: of the unpenalized logits
    assert lps.item() == pytest.approx(torch.log_softmax(row[0], -1)[6].item(), abs=1e-6)


def test_max_tokens_none_runs_to_the_context_end(ckpt: str) -> None:
    config = EngineConfig(model=ckpt, dtype="float32", max_model_len=48)
    to_end = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    with Engine(config) as eng:
        outs = eng.generate([prompt(40, seed=14), prompt(47, seed=15)], to_end)
        assert [len(o.token_ids) for o in outs] == [8, 1]
        assert all(o.finish_reason == "length" for o in outs)
        with pytest.raises(RequestError, match="max_model_len=48"):
            eng.generate([prompt(48, seed=16)], to_end)
        with pytest.raises(RequestError, match="max_model_len=48"):
            eng.generate([prompt(40, seed=14)], SamplingParams(max_tokens=9))
        # the engine goes on
        assert len(eng.generate([prompt(5, seed=17)], to_end)[0].token_ids) == 43


def stream(engine: Engine, ids: list[int], params: SamplingParams, lag_s: float = 0.0
           ) -> list[TokenDelta]:
    async def run() -> list[TokenDelta]:
        deltas = []
        async for d in engine.add_request(ids, params):
            deltas.append(d)
            if len(deltas) == 1 and lag_s:
                time.sleep(lag_s)  # the loop is blocked: the next steps' deltas queue up
        return deltas

    return asyncio.run(run())


@pytest.mark.parametrize("lag_s", [0.0, 0.5], ids=["prompt", "lagging"])
def test_streamed_deltas_carry_what_generate_returns(engine: Engine, lag_s: float) -> None:
    """The deltas of add_request carry the same logprobs, top_logprobs and prompt
    logprobs (with the first delta only) as generate; a reader that lags gets joined
    deltas with all of them joined too."""
    ids = prompt(30, seed=18)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=3,
                            prompt_logprobs=True, frequency_penalty=0.7, ignore_eos=True)
    whole = engine.generate([ids], params)[0]
    deltas = stream(engine, ids, params, lag_s)
    if lag_s:
        assert len(deltas) < 8 and len(deltas[1].token_ids) > 1  # joined
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    lps = [v for d in deltas for v in d.logprobs or []]
    assert lps == pytest.approx(whole.logprobs, abs=1e-6)
    tops = [t for d in deltas for t in d.top_logprobs or []]
    assert [[i for i, _ in t] for t in tops] == [[i for i, _ in t] for t in whole.top_logprobs]
    assert all(len(d.logprobs or []) == len(d.token_ids) == len(d.top_logprobs or [])
               for d in deltas)
    assert deltas[0].prompt_logprobs == pytest.approx(whole.prompt_logprobs, abs=1e-6)
    assert deltas[0].prompt_top_logprobs is not None
    assert all(d.prompt_logprobs is None and d.prompt_top_logprobs is None
               for d in deltas[1:])


def test_joined_deltas_keep_every_field() -> None:
    first = TokenDelta("r", [1], "a", [-0.5], None, [[(1, -0.5), (2, -1.0)]], [None, -2.0],
                       [None, [(3, -1.5)]])
    then = TokenDelta("r", [4], "b", [-0.25], None, [[(4, -0.25), (1, -3.0)]])
    end = TokenDelta("r", [], "", None, "abort")
    whole = joined(joined(first, then), end)
    assert whole == TokenDelta("r", [1, 4], "ab", [-0.5, -0.25], "abort",
                                [[(1, -0.5), (2, -1.0)], [(4, -0.25), (1, -3.0)]],
                                [None, -2.0], [None, [(3, -1.5)]])


def test_penalized_sampling_is_the_same_with_and_without_async_scheduling(
        ckpt: str) -> None:
    """Async scheduling (step N+1 launched on step N's tokens still on the device) reads
    every token back before its request's next one is sampled: the penalties' counts are
    those of step-by-step decoding, seeded sampling included."""
    prompts = [prompt(20, seed=19), prompt(9, seed=20), prompt(33, seed=21)]
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, frequency_penalty=1.0,
                       presence_penalty=0.5, ignore_eos=True, logprobs=True, top_logprobs=2),
        SamplingParams(max_tokens=20, temperature=0.9, seed=4, frequency_penalty=2.0,
                       logit_bias={50: 5.0}, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    ]

    def run(ahead: bool) -> list[Completion]:
        config = EngineConfig(model=ckpt, dtype="float32", async_scheduling=ahead)
        with Engine(config) as eng:
            assert eng._ahead == ahead
            return eng.generate(prompts, params)

    ahead, steps = run(True), run(False)
    for a, b in zip(ahead, steps, strict=True):
        assert a.token_ids == b.token_ids
    assert ahead[0].top_logprobs == steps[0].top_logprobs


@pytest.mark.slow
def test_tp2_logprobs_match_transformers(ckpt: str, hf: torch.nn.Module) -> None:
    """tp=2 (one rank process, gloo): prompt and generated log-probabilities with their
    top ones, and a penalized greedy request, as transformers gives them."""
    ids = prompt(40, seed=22)
    config = EngineConfig(model=ckpt, tp=2, dtype="float32", comm_dtype="float32",
                          max_num_batched_tokens=16, max_model_len=MAX_MODEL_LEN)
    echo = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=TOP,
                          prompt_logprobs=True, ignore_eos=True)
    penalized = SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=1.5,
                               ignore_eos=True)
    with Engine(config) as eng:
        out, pen = eng.generate([ids, ids[:12]], [echo, penalized])
    ref = hf_logprobs(hf, ids + out.token_ids)
    check_prompt(out, ref, ids, TOP)
    check_generated(out, ref, len(ids))
    assert pen.token_ids == hf_penalized_greedy(hf, ids[:12], 12, frequency=1.5)
