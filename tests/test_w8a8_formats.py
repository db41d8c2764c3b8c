"""replicas/w8a8_formats.py: the FP8 scalings it compares (blocks of weights, groups of
inputs) and its simulation inside transformers' Llama, which reproduces the engine's own
weight-only and W8A8 measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from checkpoints import CheckpointFactory

from replicas import EngineConfig
from replicas.accuracy import compare, measure, sequences
from replicas.kv_formats import logits
from replicas.w8a8_formats import INPUTS, PROJECTIONS, computed_as, e4m3_blocks, groups_of


def test_blocks_share_a_scale_and_keep_three_mantissa_bits() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=gen) * torch.logspace(-3, 3, 256)
    x[1] = 0.0  # a zero block: scale 1, zeros
    q, scale = e4m3_blocks(x, 2, 128)
    assert q.shape == scale.shape == x.shape and q.dtype == scale.dtype == torch.float32
    assert torch.equal(scale[0, :128], scale[1, :128].expand(128))  # 2 x 128 blocks
    assert len(scale[:2].unique()) == 2 and len(scale.unique()) == 4
    assert (q.abs() <= 448).all() and q.abs().amax(-1).tolist().count(448.0) >= 2
    y = q * scale
    big = x.abs() > scale / 64 * 448  # normal e4m3 values: within 1/16 of each entry
    assert ((y - x).abs()[big] <= x.abs()[big] / 16 * 1.01).all()
    with pytest.raises(ValueError, match="4 x 256 tensor is not made of 3 x 128 blocks"):
        e4m3_blocks(x, 3, 128)
    # a scale per token against one per group of 32: the groups keep the small entries
    # that the token's scale (set by its largest) flushes to zero
    token, grouped = groups_of(None)(x), groups_of(32)(x)
    small = slice(0, 32)
    assert (grouped - x)[:, small].abs().sum() < (token - x)[:, small].abs().sum() / 10


@pytest.fixture(scope="module")
def llama(checkpoint: CheckpointFactory) -> tuple[str, transformers.PreTrainedModel]:
    folder = checkpoint("llama")  # (biases on its projections: the bias path too)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return folder, model.eval()


def test_simulation_is_the_engines_fp8_and_restores_the_model(
        llama: tuple[str, transformers.PreTrainedModel]) -> None:
    """(channel, bfloat16) and (channel, token) give the engine's own quantization="fp8"
    and "fp8-w8a8" measures on the same prompts: on this random tiny model the engine's
    16-bit logits are transformers' within KL 2e-4, so within 3 % of the KL and a few
    positions of top-1 (on the trained checkpoints, to every digit: the next test reads
    the committed rows); the model computes as before after."""
    from replicas.w8a8_formats import WEIGHTS

    folder, model = llama
    prompts = sequences(2, 32, model.config.vocab_size, seed=1)
    plain = logits(model, prompts)
    got = {}
    for inputs in ("bfloat16", "token", "group32", "token, qkv 16-bit"):
        with computed_as(model, WEIGHTS["channel"], inputs):
            got[inputs] = compare(plain, logits(model, prompts))
    assert compare(plain, logits(model, prompts))["mean_kl"] == 0.0  # restored
    engine = EngineConfig(model=folder, dtype="bfloat16", max_model_len=64,
                          max_num_batched_tokens=64)
    for quantization, inputs in (("fp8", "bfloat16"), ("fp8-w8a8", "token")):
        row = measure(engine, {"quantization": quantization}, prompts)
        assert abs(row["top1_agreement"] - got[inputs]["top1_agreement"]) <= 0.05
        assert row["mean_kl"] == pytest.approx(got[inputs]["mean_kl"], rel=0.03)
    assert 0 < got["bfloat16"]["mean_kl"] < got["token"]["mean_kl"]
    assert got["token, qkv 16-bit"]["mean_kl"] != got["token"]["mean_kl"]


def test_input_formats_leave_only_named_projections_16_bit() -> None:
    for name, (rounding, kept) in INPUTS.items():
        assert set(kept) <= set(PROJECTIONS), name
        assert (rounding is None) == (name == "bfloat16")


def test_table_is_a_column_per_checkpoint_and_the_readmes_copy_is_current() -> None:
    from replicas.w8a8_formats import table

    def row(weights: str, inputs: str, model: str, agree: float, note: str = "") -> dict:
        return {"model": model, "weights": weights, "inputs": inputs,
                "top1_agreement": agree, "mean_kl": 0.001, "note": note}

    rows = [row("float32", "float32", "a", 0.99, "the floor"),
            row("channel", "token", "a", 0.97), row("channel", "token", "b", 0.96),
            row("channel", "token", "a", 0.97, "the engine: quantization=fp8-w8a8"),
            row("float32", "float32", "b", 0.98, "the floor")]
    assert table(rows).splitlines() == [
        "| weights | inputs | a | b |", "|---|---|---|---|",
        "| float32 vs bf16 (the floor) |  | 99.00 % (0.00100) | 98.00 % (0.00100) |",
        "| channel | token | 97.00 % (0.00100) | 96.00 % (0.00100) |",
        '| the engine: `quantization=fp8-w8a8` |  | 97.00 % (0.00100) | — |']
    root = Path(__file__).parent.parent
    results = root / "replicas" / "results" / "w8a8_formats_cpu.jsonl"
    committed = [json.loads(line) for line in results.read_text().splitlines()]
    assert table(committed) in (root / "README.md").read_text()
    # the simulation reproduced the engine's measures on every trained checkpoint
    for model in {r["model"] for r in committed}:
        mine = {(r["weights"], r["inputs"], "note" in r): (r["top1_agreement"], r["mean_kl"])
                for r in committed if r["model"] == model}
        for inputs in ("bfloat16", "token", "token, qkv 16-bit", "group32, qkv 16-bit",
                       "token, qkv+o+down 16-bit"):
            assert mine[("channel", inputs, True)][0] == mine[("channel", inputs, False)][0]
            assert mine[("channel", inputs, True)][1] == pytest.approx(
                mine[("channel", inputs, False)][1], abs=2e-6)
