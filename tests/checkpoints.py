"""Tiny random checkpoints of every supported family, written with transformers itself.

`make_checkpoint(family, path, **overrides)` saves a float32 safetensors checkpoint plus
the tiny tokenizer (replicas/tiny.py) into `path` and returns it. Each family turns on the
config details our model definition must honour:

- llama:   llama3 rope scaling, attention_bias and mlp_bias
- mistral: head_dim (32) != hidden / heads (16), sliding_window 24
- qwen2:   tied embeddings, qkv bias
- qwen3:   q_norm / k_norm
- glm:     partial rotary (0.5, interleaved pairs), attention_bias, fused gate_up_proj

All use 2 kv heads (tp=2 splits them; `num_key_value_heads=1` makes tp=2 replicate),
rms_norm_eps 1e-5 and a non-default rope theta. Weights are drawn from a fixed seed with a
wide initializer_range, and biases and norm weights are randomised too (transformers
initialises them to 0 and 1, which would hide a loading bug); wide logits keep greedy
argmax well separated, so float32 TP and transformers agree token for token.
`sharded=True` writes several safetensors files and `model.safetensors.index.json`.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from replicas.tiny import TINY_CONFIG, build_tokenizer, special_token_ids

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "glm")
SEED = 0
CheckpointFactory = Callable[..., str]  # the `checkpoint` fixture: (family, **options)
SHARD_SIZE = "100KB"  # ~0.5 MB of float32 weights -> several shards

# the built-in tiny model's shapes; rms_norm_eps 1e-5 differs from transformers' 1e-6
COMMON: dict[str, Any] = dict(TINY_CONFIG)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so with head_dim 16 some frequencies are kept, some smoothed, some scaled
    "original_max_position_embeddings": 256,
}

FAMILY: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rope_parameters": LLAMA3_ROPE, "attention_bias": True, "mlp_bias": True},
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {
            "head_dim": 32,
            "sliding_window": 24,
            "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
        },
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
        },
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}},
    ),
    "glm": (
        GlmConfig,
        GlmForCausalLM,
        {
            "head_dim": 16,
            "attention_bias": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 20000.0,
                "partial_rotary_factor": 0.5,
            },
        },
    ),
}


# the GPU tests' bf16 tolerance: max |ours_bf16 - ref_fp32| <= FACTOR x the reference
# engine's own bf16 error + SLACK (tests/test_gpu.py says why)
BF16_FACTOR, BF16_SLACK = 1.5, 0.05


def prompts(vocab: int) -> list[list[int]]:
    """Three prompts (7, 33 and 60 tokens) drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (7, 33, 60)]


def make_checkpoint(
    family: str,
    path: str | Path,
    *,
    sharded: bool = False,
    seed: int = SEED,
    **overrides: Any,
) -> str:
    """Write a tiny random `family` checkpoint (float32 safetensors + tokenizer) to `path`.

    `overrides` replace config fields (e.g. `num_key_value_heads=1`). Returns `path`.
    """
    config_cls, model_cls, extra = FAMILY[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _copy_tokenizer(path)
    kwargs = {**COMMON, **extra, "vocab_size": vocab, **special_token_ids(), **overrides}
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _randomise_biases_and_norms(model)
    model.generation_config.pad_token_id = config.pad_token_id
    max_shard = SHARD_SIZE if sharded else "10GB"
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size=max_shard)
    return str(path)


@torch.no_grad()
def _randomise_biases_and_norms(model: torch.nn.Module) -> None:
    """transformers sets biases to 0 and norm weights to 1; make them matter."""
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, 0.1)
        elif "norm" in name:  # input/post_attention/final norms, q_norm, k_norm
            param.copy_(1.0 + 0.2 * torch.randn_like(param))


def _copy_tokenizer(path: Path) -> int:
    """Copy the tiny tokenizer's files into `path`; returns its vocabulary size."""
    source, vocab = _tokenizer_dir()
    for file in Path(source).iterdir():
        shutil.copy(file, path / file.name)
    return vocab


@functools.cache
def _tokenizer_dir() -> tuple[str, int]:
    """Train the tokenizer once per process (about a second) into a temporary folder."""
    folder = tempfile.mkdtemp(prefix="tpserve-tokenizer-")
    atexit.register(shutil.rmtree, folder, True)
    return folder, build_tokenizer(folder)
