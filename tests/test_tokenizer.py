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
