"""Next-token sampling: greedy, temperature, top-k / top-p masks, per-request seeded
generators, the reported log-probabilities, and SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from replicas.config import ConfigError, SamplingParams
from replicas.sampler import sample

VOCAB = 12


def logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Random float32 logits without ties (ties would make argmax ambiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_greedy_is_argmax() -> None:
    x = logits(5)
    tokens, _ = sample(x, [SamplingParams(temperature=0.0)] * 5, gens(5))
    assert tokens == x.argmax(dim=-1).tolist()


def test_logprobs_are_of_the_raw_logits_at_the_chosen_token() -> None:
    x = logits(6, seed=1)
    params = [
        SamplingParams(temperature=0.0), SamplingParams(temperature=0.5),
        SamplingParams(temperature=2.0, top_k=3), SamplingParams(top_p=0.5),
        SamplingParams(temperature=1.3, top_k=4, top_p=0.8), SamplingParams(),
    ]
    tokens, lps = sample(x, params, gens(6))
    ref = torch.log_softmax(x.double(), dim=-1)
    for row, (t, lp) in enumerate(zip(tokens, lps, strict=True)):
        # under the model's distribution, not the tempered / truncated one
        assert lp == pytest.approx(ref[row, t].item(), abs=1e-5)
    assert all(isinstance(t, int) for t in tokens)


@pytest.mark.parametrize("temperature", [0.01, 0.7, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy_at_any_temperature(temperature: float) -> None:
    x = logits(8, seed=2)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 8
    for draw in range(5):
        tokens, _ = sample(x, params, gens(8, seed=10 * draw))
        assert tokens == x.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 50.0])
def test_tiny_top_p_keeps_only_the_top_token(temperature: float) -> None:
    x = logits(8, seed=3)
    params = [SamplingParams(temperature=temperature, top_p=1e-6)] * 8
    for draw in range(5):
        tokens, _ = sample(x, params, gens(8, seed=10 * draw))
        assert tokens == x.argmax(dim=-1).tolist()


def test_top_k_never_samples_outside_the_top_k() -> None:
    x = logits(1, seed=4)[0]
    # a flat-ish distribution, so that without the mask every token would show up
    x = x / 10
    k = 3
    allowed = set(x.topk(k).indices.tolist())
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.5, top_k=k)] * 200
    seen: set[int] = set()
    for _ in range(5):
        tokens, _ = sample(x.expand(200, -1).clone(), params, [g] * 200)
        seen |= set(tokens)
    assert seen == allowed  # all of the top k appear, nothing else


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 needs the first two tokens
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    tokens, _ = sample(x.expand(400, -1).clone(), [SamplingParams(top_p=0.7)] * 400, [g] * 400)
    assert set(tokens) == {0, 1}
    share = tokens.count(0) / len(tokens)
    assert abs(share - 0.5 / 0.8) < 0.08  # renormalised within the nucleus


def test_top_p_applies_to_the_top_k_renormalised_distribution() -> None:
    # top_k=2 leaves 0.4 and 0.3, renormalised to 4/7 and 3/7: 4/7 alone reaches 0.5
    x = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(top_k=2, top_p=0.5)] * 200
    tokens, _ = sample(x.expand(200, -1).clone(), params, [g] * 200)
    assert set(tokens) == {0}
    params = [SamplingParams(top_k=2, top_p=0.6)] * 200  # 4/7 < 0.6: both stay
    tokens, _ = sample(x.expand(200, -1).clone(), params, [g] * 200)
    assert set(tokens) == {0, 1}


def test_seeded_row_is_independent_of_the_rest_of_the_batch() -> None:
    x = logits(4, seed=5)
    p = SamplingParams(temperature=1.0, seed=7)

    def run(batch: torch.Tensor, params: list[SamplingParams], row: int) -> list[int]:
        generators = gens(len(params), seed=100)
        generators[row] = torch.Generator().manual_seed(7)
        out = []
        for _ in range(20):  # the generator advances step after step
            tokens, _ = sample(batch, params, generators)
            out.append(tokens[row])
        return out

    alone = run(x[:1], [p], 0)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.3, top_k=2),
              SamplingParams(top_p=0.4)]
    in_batch = run(torch.cat([x[1:], x[:1]]), [*others, p], 3)
    in_greedy_batch = run(torch.cat([x[2:3], x[:1]]), [others[0], p], 1)
    assert alone == in_batch == in_greedy_batch
    assert len(set(alone)) > 1  # really random, not stuck on one token


def test_temperature_sampling_follows_the_distribution() -> None:
    x = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature = 1.5
    expected = torch.softmax(x / temperature, dim=-1)
    n = 4000
    g = torch.Generator().manual_seed(1234)
    tokens, _ = sample(x.expand(n, -1).clone(), [SamplingParams(temperature=temperature)] * n,
                       [g] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(x)).double()
    chi2 = (((counts - n * expected) ** 2) / (n * expected)).sum().item()
    # 5 degrees of freedom: P(chi2 > 20.5) ~ 0.001; a wrong temperature (e.g. ignored,
    # or squared) lands far above
    assert chi2 < 20.5, (counts.tolist(), (n * expected).tolist())
    wrong = torch.softmax(x, dim=-1)  # the law without temperature must be rejected
    chi2_wrong = (((counts - n * wrong) ** 2) / (n * wrong)).sum().item()
    assert chi2_wrong > 50


def test_greedy_rows_do_not_consume_randomness_when_all_rows_are_greedy() -> None:
    x = logits(2, seed=6)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    sample(x, [SamplingParams(temperature=0.0)] * 2, [g, g])
    assert torch.equal(g.get_state(), state)


# ---- SamplingParams validation ----


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"max_tokens": 2.5}, "max_tokens must be a positive integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"stop": ("ok", "")}, "stop strings must be non-empty"),
        ({"stop": ""}, "stop strings must be non-empty"),
    ],
)
def test_sampling_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)
    assert issubclass(ConfigError, ValueError)  # callers may catch ValueError


def test_nan_temperature_is_rejected() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=math.nan)


def test_sampling_params_normalises_stop() -> None:
    p = SamplingParams(stop="END", stop_token_ids=[3, 4])
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    hash(p)  # frozen and hashable
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
