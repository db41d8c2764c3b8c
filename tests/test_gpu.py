"""The engine on one CUDA GPU against transformers on the same GPU (run on the device
machine: `pytest -m gpu tests/test_gpu.py`).

- float32: greedy tokens equal transformers' for the first 16 new tokens, every family.
- bfloat16: the engine's logits are as close to the float32 reference as transformers'
  own bfloat16 logits are: max |ours_bf16 - ref_fp32| <= 1.5 x max |hf_bf16 - ref_fp32|
  + 0.05. bfloat16 keeps 8 bits of mantissa, so both differ from float32 by the same
  order; a bug (a wrong rotary, a missing bias) would differ by the logits' own scale.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import FAMILIES, CheckpointFactory
from transformers import AutoModelForCausalLM

from replicas import Engine, EngineConfig, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEW_TOKENS = 16
BF16_FACTOR, BF16_SLACK = 1.5, 0.05


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (7, 33, 60)]


def hf_model(ckpt: str, dtype: torch.dtype) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).cuda().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_greedy_matches_transformers_on_gpu(family: str,
                                                    checkpoint: CheckpointFactory) -> None:
    ckpt = checkpoint(family)
    hf = hf_model(ckpt, torch.float32)
    batch = prompts(hf.config.vocab_size)
    want = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW_TOKENS,
                        do_sample=False)[0, len(p):].tolist() for p in batch]
    del hf
    with Engine(EngineConfig(model=ckpt, device="cuda", dtype="float32")) as engine:
        got = engine.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                    ignore_eos=True))
    assert [o.token_ids for o in got] == want


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_bfloat16_logits_within_tolerance(family: str, checkpoint: CheckpointFactory) -> None:
    ckpt = checkpoint(family)
    ids = prompts(1000)[2]
    ref = hf_model(ckpt, torch.float32)(torch.tensor([ids], device="cuda")).logits[0].float()
    hf16 = hf_model(ckpt, torch.bfloat16)(torch.tensor([ids], device="cuda")).logits[0].float()
    with Engine(EngineConfig(model=ckpt, device="cuda", dtype="bfloat16")) as engine:
        ours = engine.score(ids).to("cuda")
    hf_err = (hf16 - ref).abs().max().item()
    our_err = (ours - ref).abs().max().item()
    print(f"{family}: bf16 max|diff| vs fp32: ours {our_err:.4f}, transformers {hf_err:.4f}")
    assert our_err <= BF16_FACTOR * hf_err + BF16_SLACK


def test_cuda_graph_decode_equals_eager(checkpoint: CheckpointFactory) -> None:
    """Decode steps replayed from CUDA graphs (batches padded to buckets, padded rows on
    the scratch block) give the tokens of the eager path, for batch sizes across buckets.
    float32: a padded bucket runs other GEMM shapes than the eager batch, and in bfloat16
    that rounding alone can flip a near-tied greedy token after ~20 steps (seen: 1 of 37
    sequences at token 21), which is not what this test is about."""
    ckpt = checkpoint("llama")
    # 5 rows (bucket 8) and 37 rows (bucket 64: more padded rows than a block has slots)
    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(37)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for graphs in (True, False):
        config = EngineConfig(model=ckpt, device="cuda", dtype="float32", cuda_graphs=graphs,
                              max_model_len=256, max_num_seqs=64)
        with Engine(config) as engine:
            assert (engine.worker.graphs is not None) == graphs
            outs[graphs] = [o.token_ids for o in engine.generate(prompts[:5], params)]
            outs[(graphs, 37)] = [o.token_ids for o in engine.generate(prompts, params)]
            outs[(graphs, "alone")] = engine.generate(prompts[:1], params)[0].token_ids
    assert outs[True] == outs[False]
    assert outs[(True, 37)] == outs[(False, 37)]
    assert outs[(True, "alone")] == outs[True][0]
