"""Weights into a rank's model: streamed from safetensors (one file or sharded with an
index), each tensor read only as far as this rank's shard needs, or random-initialised
for benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from replicas.config import ConfigError
from replicas.model import CausalLM, checkpoint_target

log = logging.getLogger(__name__)
# an FP8 checkpoint's static KV-cache scales: llm-compressor's `self_attn.k_scale` and
# `v_scale`, AutoFP8's `kv_scale` and `k_proj` / `v_proj` `output_scale`
KV_CACHE_SCALE = re.compile(r"\.(self_attn\.(k|v|kv)_scale|[kv]_proj\.(output|kv)_scale)$")


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files, from its index when it is sharded."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ConfigError(
            f"no *.safetensors in {model_dir!r}; save the model with "
            "save_pretrained(..., safe_serialization=True) or use load_format='random'"
        )
    return [os.path.join(model_dir, f) for f in files]


def load_weights(model: CausalLM, model_dir: str, show_progress: bool) -> None:
    """Copy this rank's shard of every checkpoint tensor into `model`.

    Raises ConfigError when a layer of the model gets no tensor (a checkpoint that does
    not match its config).
    """
    modules = dict(model.named_modules())
    loaded: set[tuple[str, str, int | None]] = set()
    static: list[str] = []
    kv_scales: list[str] = []
    files = safetensors_files(model_dir)
    with tqdm(desc="loading weights", unit="tensor", disable=not show_progress) as bar:
        for path in files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    bar.update(1)
                    target = checkpoint_target(name)
                    if target is None:
                        continue
                    if model.spec.tie_word_embeddings and target[0] == "lm_head":
                        continue  # tied: the embedding is the head
                    module = modules.get(target[0])
                    if module is None:
                        raise ConfigError(f"checkpoint tensor {name} has no place in the model")
                    if name.endswith(".input_scale"):  # a static activation scale
                        static.append(name)
                        continue
                    if KV_CACHE_SCALE.search(name):  # an FP8 KV cache's static scale
                        kv_scales.append(name)
                        continue
                    if name.endswith("_scale"):  # an FP8 weight's: [out], [out, 1] or []
                        whole = f.get_tensor(name).float().reshape(-1)
                        module.load(name, lambda rows, t=whole: t if t.numel() == 1
                                    else t[rows], target[1])
                    else:
                        tensor = f.get_slice(name)
                        module.load(name, lambda rows, t=tensor: t[rows], target[1])
                    loaded.add((target[0], name.rsplit(".", 1)[1], target[1]))
    if static:
        log.warning("%d static activation scales (input_scale, e.g. %s) are not used: "
                    "activations are quantized per token (quantization='fp8-w8a8') or not "
                    "at all ('fp8')", len(static), static[0])
    if kv_scales:
        log.warning("%d static KV-cache scales (e.g. %s) are not used: the KV cache follows "
                    "kv_cache_dtype (fp8: e4m3 at scale 1; int8: a scale per token and head, "
                    "closer to the 16-bit model)", len(kv_scales), kv_scales[0])
    _check_complete(model, loaded)


def _check_complete(model: CausalLM, loaded: set[tuple[str, str, int | None]]) -> None:
    got = {(path, kind) for path, kind, _ in loaded}
    missing = []
    for path, module in model.named_modules():
        if not hasattr(module, "load"):
            continue
        for kind, param in module.named_parameters(recurse=False):
            if path == "lm_head" and model.spec.tie_word_embeddings:
                continue
            if param is not None and (path, kind) not in got:
                missing.append(f"{path}.{kind}")
    if missing:
        raise ConfigError(
            f"checkpoint is missing {len(missing)} tensors the config implies, e.g. "
            f"{missing[:3]}; is config.json the one saved with these weights?"
        )


@torch.no_grad()
def random_init(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights for benchmarks: normal(0, std) matrices, zero biases, unit norms."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:  # drawn where the weight lives: a 9B model in seconds on a GPU
            if param.device not in gens:
                gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, std, generator=gens[param.device])
