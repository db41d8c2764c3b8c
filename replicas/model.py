"""Decoder-only causal LMs (Llama, Mistral, Qwen2, Qwen3, GLM) over a paged KV cache.

One definition serves every family; the differences (biases, QK norm, partial and
interleaved rotary, sliding windows, tied embeddings) come from `ModelSpec`. The TP split
lives in the layers of `parallel.py`: this file reads like a single-device model. Parameter
paths mirror transformers' names, with q|k|v fused into `qkv_proj` and gate|up into
`gate_up_proj`, so a checkpoint tensor finds its layer by name (`checkpoint_target`).

A step's tokens come flattened: T tokens from B sequences, some prefilling a chunk, some
decoding one token. `ForwardBatch` carries the per-step index tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from replicas import kernels
from replicas.config import ModelSpec, rope_parameters
from replicas.fp8 import FP8, saturated
from replicas.kernels import RunSum, Site
from replicas.kv_cache import from_int8_rows, int8_rows
from replicas.parallel import (
    ColumnParallelLinear,
    Comm,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_range,
)


@dataclass
class ForwardBatch:
    """Device tensors of one step, built by the worker from the step message."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot each token writes
    block_tables: torch.Tensor  # [B, max_blocks] int64, 0-padded
    token_seq: torch.Tensor  # [T] which sequence each token belongs to
    token_off: torch.Tensor  # [T] index of the token within its sequence's chunk
    query_pos: torch.Tensor  # [B, max_q] positions of the chunk, padded with 0
    logits_indices: torch.Tensor  # [N] tokens whose next-token logits are wanted
    masks: dict[int | None, torch.Tensor]  # window -> [B, 1, max_q, keys] attend mask
    # the Triton path's view of the same step (see replicas/kernels/); masks are then empty
    cu_q: torch.Tensor | None = None  # [B + 1] int32, where each sequence's tokens start
    max_q: int = 0  # the longest chunk
    splits: int = 1  # key-range splits of decode attention
    # long prompts with no cached prefix: (start, end) of each sequence's tokens, for
    # PyTorch's flash attention (faster than the paged kernel on long causal chunks)
    fresh: tuple[tuple[int, int], ...] | None = None
    every_row: bool = False  # logits_indices is every token in order: no gather


def feed_tokens(ids: torch.Tensor, feed: torch.Tensor) -> None:
    """In place: each id -(j + 1) becomes feed[j], on the device (no host sync)."""
    if kernels.enabled(ids):
        kernels.feed_tokens(ids, feed)
    else:
        ids.copy_(torch.where(ids < 0, feed[(-ids - 1).clamp(min=0)], ids))


def attention_mask(query_pos: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[B, 1, max_q, keys] bool: key j is visible to a query at p iff j <= p and, with a
    sliding window w, p - j < w (transformers' convention)."""
    keys = torch.arange(num_keys, device=query_pos.device)
    diff = query_pos[:, :, None] - keys[None, None, :]  # [B, max_q, keys]
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    return visible.unsqueeze(1)


class Rotary(nn.Module):
    """Rotary position embedding with cos/sin tables precomputed for every position."""

    def __init__(self, hf_config: Any, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        self.rotary_dim = spec.rotary_dim
        self.interleaved = spec.rope_interleaved
        inv_freq, scale = rope_frequencies(hf_config, spec)
        positions = torch.arange(max_positions, dtype=torch.float32)  # on the default device
        freqs = positions[:, None] * inv_freq.to(positions.device)  # [P, rd/2]
        if self.interleaved:  # pairs (2i, 2i+1) share frequency i
            angles = freqs.repeat_interleave(2, dim=-1)
        else:  # halves: i and i + rd/2 share frequency i
            angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", angles.cos() * scale, persistent=False)  # [P, rd]
        self.register_buffer("sin", angles.sin() * scale, persistent=False)
        self._joined: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rd] of the step's positions, in `dtype`: looked up once per
        step, not per layer, and in one gather of [cos | sin] kept in that dtype (each
        lookup is a kernel launch, and batch-1 decode is launch-bound)."""
        key = (dtype, self.cos.device)
        joined = self._joined.get(key)
        if joined is None:
            joined = self._joined[key] = torch.cat((self.cos, self.sin), dim=-1).to(dtype)
        rows = joined[positions].unsqueeze(1)  # [T, 1, 2 rd]
        return rows[..., : self.rotary_dim], rows[..., self.rotary_dim :]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        # x: [T, heads, head_dim]; rotates the first rotary_dim features of each head
        cos, sin = rope  # [T, 1, rd]
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:
            half = self.rotary_dim // 2
            turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + turned * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rope_frequencies(hf_config: Any, spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """inv_freq [rotary_dim / 2] and the cos/sin scale, as transformers computes them."""
    params = rope_parameters(hf_config)
    if params["rope_type"] == "default":
        dim = spec.rotary_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (params["rope_theta"] ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, "cpu")
    return inv_freq.float(), float(scale)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: ForwardBatch,
    window: int | None, scales: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Attention of the step's queries over each sequence's cached keys.

    q: [T, heads, D]; caches: [blocks, block_size, kv_heads, D] -> [T, heads, D].
    Sequences are padded to the longest chunk and the longest context; the mask hides
    the padding. Padded query rows see key 0 (never empty rows, so no NaN). Masked slots
    are read too, so they must hold finite values (a masked NaN reaches the output
    through 0 * NaN): the pool starts zeroed, and the slots of a step whose results are
    thrown away are zeroed again (`Worker.clear`). `scales`: an int8 cache's (K, V) row
    scales.
    """
    num_seqs, max_q = b.query_pos.shape
    k_scale, v_scale = scales or (None, None)
    keys = read_cache(k_cache, b.block_tables, q.dtype, k_scale)  # [B, L, kv_heads, D]
    values = read_cache(v_cache, b.block_tables, q.dtype, v_scale)
    padded = q.new_zeros(num_seqs, max_q, *q.shape[1:])  # [B, max_q, heads, D]
    padded[b.token_seq, b.token_off] = q
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=b.masks[window], enable_gqa=True,
    )  # [B, heads, max_q, D]
    return out.transpose(1, 2)[b.token_seq, b.token_off]


def write_cache(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor,
                scale: torch.Tensor | None = None) -> None:
    """x [T, kv_heads, D] into the cache's slots [blocks, block_size, kv_heads, D]. An
    FP8 cache's entries saturate at +-448, as the Triton kernels write them
    (replicas/kernels/rope.py _to_cache), and go in as bytes (PyTorch has no FP8
    index_copy on CPU); an int8 cache's rows are rounded with a scale each, which goes
    into `scale` [blocks, block_size, kv_heads] (kv_cache.int8_rows)."""
    flat = cache.view(-1, *x.shape[1:])
    if cache.dtype == FP8:
        flat.view(torch.uint8).index_copy_(0, slots, saturated(x).view(torch.uint8))
    elif cache.dtype == torch.int8:
        assert scale is not None, "an int8 cache needs its scales"
        rows, row_scale = int8_rows(x)
        flat.index_copy_(0, slots, rows)
        scale.view(-1, x.shape[1]).index_copy_(0, slots, row_scale)
    else:
        flat.index_copy_(0, slots, x)


def read_cache(cache: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's cached entries through its block table [B, blocks] -> [B, L,
    kv_heads, D] in `dtype` (an FP8 cache's widened, gathered as bytes; an int8 cache's
    times their rows' `scale`)."""
    if cache.dtype == FP8:
        raw = cache.view(torch.uint8)[tables].view(FP8)
        return raw.flatten(1, 2).to(dtype)
    if cache.dtype == torch.int8:
        assert scale is not None, "an int8 cache needs its scales"
        return from_int8_rows(cache[tables].flatten(1, 2), scale[tables].flatten(1, 2), dtype)
    return cache[tables].flatten(1, 2)


def fresh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    spans: tuple[tuple[int, int], ...], out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Causal attention of whole prompts (no cached prefix) from the step's own q, k, v
    [T, heads | kv_heads, D], one SDPA call per sequence -> [T, heads, D] (`out`, if
    given)."""
    out = torch.empty_like(q) if out is None else out
    # never the math kernel on a GPU (it builds the L x L matrix): a fused one or an error
    backends = FUSED_SDPA if q.is_cuda else [*FUSED_SDPA, SDPBackend.MATH]
    with sdpa_kernel(backends):
        for start, end in spans:
            # 4-D [1, heads, L, D]: SDPA's fused kernels take no 3-D inputs (measured: with
            # them an 8192-token prompt took 2.4 s instead of 0.3 s on the H200)
            o = F.scaled_dot_product_attention(
                *(x[start:end].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
    return out


FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.CUDNN_ATTENTION]


class Attention(nn.Module):
    def __init__(self, hf_config: Any, spec: ModelSpec, layer: int, comm: Comm) -> None:
        super().__init__()
        tp, d = comm.world_size, spec.head_dim
        self.heads = spec.num_heads // tp
        if spec.num_kv_heads >= tp:  # split the KV heads
            self.kv_heads = spec.num_kv_heads // tp
            first_kv = comm.rank * self.kv_heads
        else:  # fewer KV heads than ranks: each rank keeps the one its queries use
            self.kv_heads = 1
            first_kv = comm.rank * spec.num_kv_heads // tp
        kv_rows = (first_kv * d, (first_kv + self.kv_heads) * d)
        self.qkv_proj = ColumnParallelLinear(
            spec.hidden_size,
            [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d],
            spec.qkv_bias, comm,
            part_shards=[shard_range(spec.num_heads * d, comm.rank, tp), kv_rows, kv_rows],
        )
        self.o_proj = RowParallelLinear(spec.num_heads * d, spec.hidden_size, spec.o_bias, comm)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.head_dim = d
        self.window = spec.sliding_windows[layer]

    def heads_of(self, qkv: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, D], k and v [T, kv_heads, D] from the qkv_proj output [T,
        (heads + 2 kv_heads) * D] (views, or q and k normed where the model has QK norm)."""
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        return q, k, v

    def place(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
              rotary: Rotary, rope: tuple[torch.Tensor, torch.Tensor],
              kv: tuple[torch.Tensor, ...], fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k and write k and v into the cache at `slots` [T]: the rotated
        (q, k) (`fast`, the Triton path: in place, one kernel)."""
        k_cache, v_cache, *scales = kv  # (an int8 cache's row scales)
        if fast:
            kernels.rope_and_cache(q, k, v, *rope, slots, k_cache, v_cache,
                                   rotary.rotary_dim, rotary.interleaved, scales)
            return q, k
        q, k = rotary(q, rope), rotary(k, rope)
        k_scale, v_scale = scales or (None, None)
        write_cache(k_cache, slots, k, k_scale)
        write_cache(v_cache, slots, v, v_scale)
        return q, k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: ForwardBatch,
               kv: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the step's rotated queries [T, heads, D] over the cache (k and v,
        already `place`d, for whole fresh prompts) -> [T, heads, D], into `out` if given."""
        k_cache, v_cache, *scales = kv
        if b.cu_q is None:  # PyTorch: padded sequences and masks
            attn = paged_attention(q, k_cache, v_cache, b, self.window, scales)
            return attn if out is None else out.copy_(attn)
        if b.fresh is not None and self.window is None:
            return fresh_attention(q, k, v, b.fresh, out)
        return kernels.paged_attention(q, k_cache, v_cache, b.block_tables, b.cu_q,
                                       b.positions, self.window, b.max_q, b.splits,
                                       scales=scales, out=out)

    def forward(self, qkv: torch.Tensor, b: ForwardBatch, rotary: Rotary,
                rope: tuple[torch.Tensor, torch.Tensor], kv: tuple[torch.Tensor, ...]
                ) -> torch.Tensor | Site | RunSum:
        """Attention from the layer's qkv_proj output [T, (heads + 2 kv_heads) * D] (the
        decoder layer runs the projection, fused with its norm) to o_proj's."""
        q, k, v = self.heads_of(qkv)
        if b.cu_q is not None and b.max_q == 1:  # Triton decode: rotary, cache write and
            # attention in one kernel
            k_cache, v_cache, *scales = kv
            new = kernels.NewKeys(k, v, *rope, b.slot_mapping, rotary.rotary_dim,
                                  rotary.interleaved)
            out = kernels.paged_attention(q, k_cache, v_cache, b.block_tables, b.cu_q,
                                          b.positions, self.window, 1, b.splits, new,
                                          scales)
        else:
            q, k = self.place(q, k, v, b.slot_mapping, rotary, rope, kv, b.cu_q is not None)
            out = self.attend(q, k, v, b, kv)  # [T, heads, D]
        return self.o_proj(out.reshape(out.shape[0], -1))


def _hf_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation of that name. Imported here, not at the top: the module
    costs ~1.5 s of every rank process's start, and every supported family uses silu."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def mlp_gemv_kinds(fp8: bool, fused_act: bool = True) -> tuple[str, str]:
    """(gate_up's GEMV kind, down's) for an MLP with FP8 weights or not (`fused_act`: its
    activation is SwiGLU), as `MLP.gemv_kinds` sets them and `--suite gemv` times them:
    SwiGLU on gate_up's output with FP8 weights, inside down's GEMV with 16-bit ones,
    unless $TPSERVE_SWIGLU_EPILOGUE says otherwise (fp8, the default; 1; 0)."""
    mode = os.environ.get("TPSERVE_SWIGLU_EPILOGUE", "fp8")
    if mode not in ("fp8", "1", "0"):
        raise ValueError(f"TPSERVE_SWIGLU_EPILOGUE={mode!r}: one of fp8, 1, 0")
    on = fused_act and (mode == "1" or (mode == "fp8" and fp8))
    return ("norm_swiglu" if on else "norm"), ("gated" if fused_act and not on else "plain")


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, comm: Comm) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(spec.hidden_size, [size, size], spec.mlp_bias,
                                                 comm)
        self.down_proj = RowParallelLinear(size, spec.hidden_size, spec.mlp_bias, comm)
        self.act = F.silu if spec.hidden_act == "silu" else _hf_activation(spec.hidden_act)
        self.fused_act = spec.hidden_act == "silu"
        # weight-only FP8's two terms may leave gate_up's two products for SwiGLU's
        # kernel to add (PERF.md v1.04)
        self.gate_up_proj.defers_two_terms = self.fused_act
        self.gemv_kinds()

    def gemv_kinds(self) -> None:
        """How the one-row GEMVs run the activation (DecoderLayer.finish, forward): with
        FP8 weights SwiGLU on gate_up's GEMV output, after its norm, and a plain down
        GEMV; with 16-bit ones SwiGLU inside the down GEMV, each of its programs making
        the activation (PERF.md v0.77: on the H200 the first is 0.96x the second's
        batch-1 decode with FP8 weights, 1.04x with bf16, whose gate_up tiles in pairs
        lose to cuBLAS). $TPSERVE_SWIGLU_EPILOGUE: "fp8" (that, the default), "1"
        (always the first), "0" (always the second). Called again by tune_gemv, once the
        weights are loaded (and maybe quantized)."""
        self.gate_up_proj.gemv_kind, self.down_proj.gemv_kind = mlp_gemv_kinds(
            self.gate_up_proj.weight.dtype == FP8, self.fused_act)

    def forward(self, gate_up: torch.Tensor | RunSum) -> torch.Tensor | Site | RunSum:
        """From the layer's gate_up_proj output [T, 2 I/tp] (run by the decoder layer,
        fused with its norm) to down_proj's. A RunSum (weight-only FP8's two terms'
        products, `defers_two_terms`): SwiGLU's kernel adds them as it reads them."""
        if isinstance(gate_up, RunSum):
            first, extra = gate_up.parts
            return self.down_proj(kernels.silu_and_mul(first, extra))
        if self.fused_act and kernels.enabled(gate_up):
            if self.down_proj.takes_gated(gate_up):  # SwiGLU inside the down GEMV
                return self.down_proj(gate_up, gated=True)
            if self.down_proj.takes_tokens_fp8():  # W8A8: SwiGLU quantized in one pass
                x8, x_scale = kernels.silu_mul_quantize_fp8(gate_up)
                return self.down_proj.forward_tokens_fp8(x8, x_scale, gate_up.dtype)
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, spec: ModelSpec, layer: int, comm: Comm) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(hf_config, spec, layer, comm)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, comm)
        # see forward: each norm runs inside the projection after it (MLP's gate_up_proj
        # has its kind from MLP)
        self.self_attn.qkv_proj.gemv_kind = "norm"

    def forward(self, x: torch.Tensor | Site | RunSum, residual: torch.Tensor | None,
                b: ForwardBatch,
                rotary: Rotary, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor | Site | RunSum, torch.Tensor]:
        """(this layer's output, the residual stream before it): the next norm adds the
        two, fused with the normalization (and, at batch 1 on GPUs, with the sum of the
        layer's all-reduce: the output is then a Site)."""
        qkv, residual = self.project(x, residual)
        return self.finish(self.self_attn(qkv, b, rotary, rope, kv), residual)

    def project(self, x: torch.Tensor | Site | RunSum, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to attention: (qkv_proj's output, the residual stream)."""
        return self.self_attn.qkv_proj.forward_normed(x, residual, self.input_layernorm)

    def finish(self, x: torch.Tensor | Site | RunSum, residual: torch.Tensor
               ) -> tuple[torch.Tensor | Site | RunSum, torch.Tensor]:
        """The layer after o_proj (its output `x`): the MLP, with its norm."""
        gate_up_proj, norm = self.mlp.gate_up_proj, self.post_attention_layernorm
        if gate_up_proj.takes_swiglu(x):  # one kernel: norm, gate_up and SwiGLU
            act, residual = gate_up_proj.forward_normed(x, residual, norm, swiglu=True)
            return self.mlp.down_proj(act), residual
        gate_up, residual = gate_up_proj.forward_normed(x, residual, norm)
        return self.mlp(gate_up), residual


class Backbone(nn.Module):
    def __init__(self, hf_config: Any, spec: ModelSpec, comm: Comm, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, comm)
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, spec, i, comm) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = Rotary(hf_config, spec, max_positions)


class CausalLM(nn.Module):
    """The model of one rank. `forward` returns next-token logits [N, vocab] (float32,
    full vocabulary on every rank) for the tokens in `b.logits_indices`."""

    def __init__(self, hf_config: Any, spec: ModelSpec, comm: Comm, max_positions: int) -> None:
        super().__init__()
        self.spec, self.comm = spec, comm
        self.model = Backbone(hf_config, spec, comm, max_positions)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, comm)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, b: ForwardBatch, kv_caches: list[tuple[torch.Tensor, ...]]
                ) -> torch.Tensor:
        self.comm.new_step()
        h, rope = self.embed(b.input_ids, b.positions)
        x: torch.Tensor | Site | RunSum = h
        residual = None
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, b, self.model.rotary, rope, kv)
        assert residual is not None, "a model has at least one layer"
        return self.head(x, residual, b)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The step's hidden states [T, hidden] and its rotary tables (see Rotary.tables)."""
        h = self.model.embed_tokens(ids)
        return h, self.model.rotary.tables(positions, h.dtype)

    def head(self, x: torch.Tensor | Site | RunSum, residual: torch.Tensor, b: ForwardBatch
             ) -> torch.Tensor:
        """Logits from the last layer's output and the residual stream: rows
        `b.logits_indices` (every row of the step's tokens if `b.every_row`; the first
        len(b.input_ids) rows when the step was padded)."""
        if isinstance(x, Site):  # the last layer's all-reduce, summed in a kernel of its own
            x = x.pull()
        elif isinstance(x, RunSum):  # the last down_proj's runs of K (PERF.md v0.80)
            x = x.total()
        if not b.every_row:  # [N, hidden]: only where logits are wanted
            x, residual = x[b.logits_indices], residual[b.logits_indices]
        elif x.shape[0] != b.input_ids.shape[0]:
            n = b.input_ids.shape[0]
            x, residual = x[:n], residual[:n]
        x, _ = self.model.norm(x, residual)
        return self.lm_head(x)


# checkpoint piece -> (our layer, which fused part); None = the tensor holds all parts
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "gate_up_proj": ("gate_up_proj", None),
}


def checkpoint_target(name: str) -> tuple[str, int | None] | None:
    """Map a transformers tensor name to (our module path, fused part), or None to skip."""
    if "rotary_emb" in name:
        return None
    parts = name.split(".")  # e.g. model.layers.3.self_attn.q_proj.weight
    module, part = parts[-2], None
    if module in _FUSED:
        module, part = _FUSED[module]
    return ".".join([*parts[:-2], module]), part
