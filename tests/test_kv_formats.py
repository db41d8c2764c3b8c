"""replicas/kv_formats.py: the KV-cache roundings it compares, and its simulation inside
transformers' Llama (nothing rounded: the same logits; a format: the logits move, and
the e4m3 simulation moves them as the engine's FP8 cache does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from checkpoints import CheckpointFactory

from replicas.accuracy import compare, sequences
from replicas.kv_formats import FORMATS, cached_as, e4m3, e4m3_row, int8_row, logits


def test_row_formats_keep_each_row_within_its_own_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=gen) * torch.tensor([1e-3, 1.0, 300.0])[:, None, None]
    x[0, 0] = 0.0  # a zero row stays zero (scale 1)
    for rounding, steps in ((int8_row, 127), (e4m3_row, None)):
        y = rounding(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y[0, 0], torch.zeros(64))
        amax = x.abs().amax(-1, keepdim=True)
        if steps is not None:  # int8: at most half a step (max|row| / 127) off
            assert ((y - x).abs() <= amax / steps * 0.51 + 1e-9).all()
        else:  # e4m3 with the row's scale: 3 mantissa bits, relative to each entry
            big = x.abs() > amax / 64
            assert ((y - x).abs()[big] <= x.abs()[big] / 16 * 1.01).all()
    # scale 1: small rows lose what a row scale keeps, large ones saturate at 448
    assert (e4m3(x[0]) - x[0]).abs().max() > (e4m3_row(x[0]) - x[0]).abs().max()
    assert e4m3(x[2]).abs().max() == 448.0


@pytest.fixture(scope="module")
def llama(checkpoint: CheckpointFactory) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("llama"),
                                                              dtype=torch.bfloat16)
    return model.eval()


def test_simulation_rounds_only_inside_and_only_what_it_is_given(
        llama: transformers.PreTrainedModel) -> None:
    prompts = sequences(2, 32, llama.config.vocab_size, seed=1)
    plain = logits(llama, prompts)
    with cached_as(llama, None, None):
        assert compare(plain, logits(llama, prompts))["mean_kl"] == 0.0
    moved = {}
    for k, v in ((e4m3, None), (None, int8_row), (e4m3, e4m3)):
        with cached_as(llama, k, v):
            moved[(k, v)] = compare(plain, logits(llama, prompts))
        assert moved[(k, v)]["mean_kl"] > 0
    assert moved[(e4m3, None)] != moved[(None, int8_row)]
    assert compare(plain, logits(llama, prompts))["mean_kl"] == 0.0  # restored after
    assert set(FORMATS) == {"e4m3", "e4m3-row", "int8-row"}


def test_simulation_refuses_other_families(checkpoint: CheckpointFactory) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("qwen2"))
    with pytest.raises(ValueError, match="Llama"), cached_as(model, e4m3, e4m3):
        pass


def test_table_is_a_line_per_checkpoint_and_the_readmes_copy_is_current() -> None:
    """`--table`: each checkpoint's floor, its caches (the engine's where it has one, the
    simulation's e4m3-row) and FP8 weights with each cache, in COLUMNS' order; the
    README holds the table of the committed rows."""
    from replicas.kv_formats import COLUMNS, table

    def row(k: str, agree: float, note: str = "") -> dict:
        return {"model": "m", "k": k, "v": k, "top1_agreement": agree, "mean_kl": 0.001,
                "note": note}

    rows = [row("float32", 0.99, "the floor"), row("e4m3", 0.5),  # (the simulated twin)
            row("e4m3", 0.98, "the engine: quantization=none, kv_cache_dtype=fp8"),
            row("e4m3-row", 0.97), row("int8-row", 0.4),
            row("int8-row", 0.993, "the engine: quantization=none, kv_cache_dtype=int8"),
            row("bfloat16", 0.989, "the engine: quantization=fp8, kv_cache_dtype=auto"),
            row("int8-row", 0.9897, "the engine: quantization=fp8, kv_cache_dtype=int8"),
            {**row("e4m3", 0.1), "v": "bfloat16"}]  # keys only: not in the table
    lines = table(rows).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == len(COLUMNS) + 2
    assert lines[2] == ("| m | 99.00 % (0.00100) | 98.00 % (0.00100) | 97.00 % (0.00100) | "
                        "99.30 % (0.00100) | 98.90 % (0.00100) | — | 98.97 % (0.00100) |")
    root = Path(__file__).parent.parent
    results = root / "replicas" / "results" / "kv_formats_cpu.jsonl"
    committed = table([json.loads(line) for line in results.read_text().splitlines()])
    assert committed in (root / "README.md").read_text()
