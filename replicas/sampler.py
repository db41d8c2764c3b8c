"""Next-token choice for a batch of sequences, each with its own SamplingParams.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1), the same law as
drawing from p) so that each row's noise comes from that request's own generator: a
seeded request gets the same tokens whatever else is in the batch. Everything stays on
the device: the engine decides when to read the tokens (no host sync here).
"""

from __future__ import annotations

import torch

from replicas.config import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
) -> tuple[list[int], list[float]]:
    """`sample_on_device`, read back to the host."""
    tokens, logprobs = sample_on_device(logits, params, generators, with_logprobs=True)
    assert logprobs is not None
    return tokens.tolist(), logprobs.tolist()


def sample_on_device(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
    with_logprobs: bool = False, argmax: torch.Tensor | None = None,
    choose: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, vocab] float32 -> (tokens [N] int64, log-probability of each token
    under the model's unmodified distribution [N] float32), on logits' device. The
    log-probabilities (a log-softmax over the vocabulary) only if a request asks for
    them, or with_logprobs. `argmax`: logits.argmax(-1) if already made (a decode
    graph makes it). `choose`: the logits the tokens are chosen from where they differ
    from `logits` (a grammar's mask, replicas/structured.py; then `argmax` is unused)."""
    pick = logits if choose is None else choose
    tokens = pick.argmax(dim=-1) if argmax is None or choose is not None else argmax  # [N]
    if not all(p.greedy for p in params):  # decided on the host: no sync for it
        greedy = _on(logits, [p.greedy for p in params], torch.bool)
        sampled = _sample_random(pick, params, generators)
        tokens = torch.where(greedy, tokens, sampled)
    if not (with_logprobs or any(p.logprobs for p in params)):
        return tokens, None
    logprobs = torch.log_softmax(logits, dim=-1)  # [N, vocab]
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _on(like: torch.Tensor, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on `like`'s device without waiting for the device's queue (a
    blocking host-to-device copy would)."""
    return torch.tensor(values, dtype=dtype).to(like.device, non_blocking=True)


def _sample_random(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
) -> torch.Tensor:
    temps = _on(logits, [p.temperature or 1.0 for p in params], torch.float32)
    scaled = logits / temps[:, None]
    if any(p.top_k or p.top_p < 1.0 for p in params):
        scaled = _top_k_top_p(scaled, params)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    for row, gen in enumerate(generators):
        noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus."""
    vocab = scaled.shape[-1]
    k = _on(scaled, [p.top_k or vocab for p in params], torch.int64)
    top_p = _on(scaled, [p.top_p for p in params], torch.float32)
    ordered, order = scaled.sort(dim=-1, descending=True)  # [N, vocab]
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    drop = rank >= k[:, None]
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
    drop |= before >= top_p[:, None]  # the top token always stays (before = 0)
    masked = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, masked)
