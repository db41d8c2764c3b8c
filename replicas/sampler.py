"""Next-token choice for a batch of sequences, each with its own SamplingParams.

Penalties and logit_bias (SamplingParams.adjusts_logits) change a copy of the logits
that tokens are chosen from; the log-probabilities reported are always those of the raw
logits ("raw" logprobs).

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
    counts: list[dict[int, int]] | None = None, choose: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, vocab] float32 -> (tokens [N] int64, log-probability of each token
    under the model's unmodified distribution [N] float32), on logits' device: the tokens
    of `choose_tokens`, and their log-probabilities (a log-softmax over the vocabulary)
    only if a request asks for them, or with_logprobs."""
    tokens = choose_tokens(logits, params, generators, argmax, counts, choose)
    if not (with_logprobs or any(p.logprobs for p in params)):
        return tokens, None
    return tokens, token_logprobs(logits, tokens)[0]


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
    argmax: torch.Tensor | None = None, counts: list[dict[int, int]] | None = None,
    choose: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [N, vocab] float32 -> tokens [N] int64, on logits' device. `argmax`:
    logits.argmax(-1) if already made (a decode graph makes it; not used when a row's
    logits are adjusted or masked). `counts`: per row, how often each token was generated
    so far (for the penalties; None: no row has any). `choose`: `logits` with a grammar's
    mask applied (replicas/structured.py): the tokens are chosen from it (after the
    penalties)."""
    chosen_from = adjust_logits(logits if choose is None else choose, params, counts)
    if chosen_from is not logits:  # the graph's argmax is of the raw logits
        argmax = None
    tokens = chosen_from.argmax(dim=-1) if argmax is None else argmax  # [N]
    if not all(p.greedy for p in params):  # decided on the host: no sync for it
        greedy = _on(logits, [p.greedy for p in params], torch.bool)
        sampled = _sample_random(chosen_from, params, generators)
        tokens = torch.where(greedy, tokens, sampled)
    return tokens


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams],
                  counts: list[dict[int, int]] | None) -> torch.Tensor:
    """The logits [N, vocab] that tokens are chosen from: `logits` itself unless a row
    has penalties or a logit_bias, else a copy with, at each (row, token) they touch,
    bias - presence_penalty - frequency_penalty * count added (one sparse add; the
    entries are built on the host from the counts it already has: every token a request
    generated is read back before its next token is sampled, also with asynchronous
    scheduling, see Engine._step)."""
    if not any(p.adjusts_logits for p in params):
        return logits
    rows: list[int] = []
    cols: list[int] = []
    adds: list[float] = []
    for row, p in enumerate(params):
        seen = counts[row] if counts is not None else {}
        if p.presence_penalty or p.frequency_penalty:
            for token, n in seen.items():
                rows.append(row)
                cols.append(token)
                adds.append(-(p.presence_penalty + p.frequency_penalty * n))
        for token, bias in p.logit_bias.items():
            rows.append(row)
            cols.append(token)
            adds.append(bias)
    adjusted = logits.clone()
    if rows:  # accumulate: a token both seen and biased gets both
        adjusted.index_put_((_on(logits, rows, torch.int64), _on(logits, cols, torch.int64)),
                            _on(logits, adds, logits.dtype), accumulate=True)
    return adjusted


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Raw log-probabilities, on the device: logits [N, vocab], tokens [N] int64 ->
    (log-probability of each token [N], and with top > 0 the `top` largest
    log-probabilities of each row [N, top] most likely first, and their token ids
    [N, top]). Only these leave the device, not the rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, vocab]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    if top <= 0:
        return chosen, None, None
    values, ids = logprobs.topk(top, dim=-1)  # sorted, largest first
    return chosen, values, ids


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
