"""The engine's tokenizer wrapper decodes exactly as transformers does, and the
incremental decoder's deltas add up to the whole text."""

from __future__ import annotations

import pytest
import torch

from replicas.tiny import tiny_model_dir
from replicas.tokenizer import IncrementalDecoder, Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(tiny_model_dir())


def test_decode_equals_transformers(tokenizer: Tokenizer) -> None:
    assert tokenizer._backend_decode is not None  # the fast path is the one under test
    vocab = tokenizer.hf.vocab_size
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=gen)),),
                            generator=gen).tolist()
        assert tokenizer.decode(ids) == tokenizer.hf.decode(
            ids, skip_special_tokens=True)
    sample = tokenizer.encode("Hello , world ! it 's here .")
    assert tokenizer.decode(sample) == tokenizer.hf.decode(
        sample, skip_special_tokens=True)


def test_incremental_deltas_add_up(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog, twice. Déjà vu!")
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids)
    assert text == tokenizer.decode(ids)


def test_tokens_without_text_keep_the_window_short(tokenizer: Tokenizer) -> None:
    """Skipped special tokens and ids past the vocabulary add no text: after a long run
    of them the window moves on (each push stays cheap), and the deltas still add up to
    the whole text."""
    special = tokenizer.hf.all_special_ids[0]
    words = tokenizer.encode("Déjà vu , the quick brown fox .")
    ids = [special] * 40 + words[:3] + [special] * 25 + words[3:] + [special] * 30
    decoder = IncrementalDecoder(tokenizer)
    widest = 0
    deltas = []
    for i in ids:
        deltas.append(decoder.push(i))
        widest = max(widest, len(decoder.ids) - decoder.prefix_offset)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert widest <= IncrementalDecoder.LONG + IncrementalDecoder.CONTEXT + 2


def test_a_push_costs_about_one_decode(tokenizer: Tokenizer) -> None:
    """The window's prefix text is kept from the push before: plain text costs one
    decode a token, plus one each time the window starts over."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog , twice . " * 8)
    decoder = IncrementalDecoder(tokenizer)
    decode, calls = tokenizer.decode, 0

    def counted(part: list[int]) -> str:
        nonlocal calls
        calls += 1
        return decode(part)

    tokenizer.decode = counted  # type: ignore[method-assign]
    try:
        text = "".join(decoder.push(i) for i in ids)
    finally:
        del tokenizer.decode
    assert text == tokenizer.decode(ids)
    assert calls <= 1.5 * len(ids)  # the window of two decodes a token: 2 * len(ids)


def test_warm_compiles_the_chat_template_before_a_request_and_never_raises() -> None:
    """Tokenizer.warm (an engine's start): the template's jinja compile, ~5-10 ms, is done
    before the first request needs it; a template that refuses the warm-up's message
    is left for requests to report."""
    templates = pytest.importorskip("transformers.utils.chat_template_utils")
    compiled = getattr(templates, "_compile_jinja_template", None)
    if not hasattr(compiled, "cache_clear"):
        pytest.skip("this transformers compiles its templates otherwise")
    tokenizer = Tokenizer(tiny_model_dir())
    compiled.cache_clear()
    tokenizer.warm()
    assert compiled.cache_info().misses == 1
    tokenizer.apply_chat_template([{"role": "user", "content": "a request"}])
    assert compiled.cache_info().misses == 1 and compiled.cache_info().hits >= 1
    tokenizer.hf.chat_template = "{{ raise_exception('a system message first') }}"
    tokenizer.warm()
