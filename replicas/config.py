"""Configuration of the engine: what a user sets (EngineConfig, SamplingParams) and what
the model's transformers config implies (ModelSpec).

Each default lives here once; the CLI and YAML are built from these fields. Validation
happens in `__post_init__` with messages that say what to change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# (torch is imported only where a device is resolved: `tpserve up`, the Serve app's build
# task and the stack's tools read the config without torch's ~4 s import; the engine's own
# processes import it, and so does its Serve replica, through transformers' tokenizer)

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GlmForCausalLM": "glm",
}
SUPPORTED_TP = (1, 2, 4, 8)
DTYPES = ("float32", "float16", "bfloat16")  # EngineConfig.dtype and comm_dtype (torch's names)
KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # EngineConfig.kv_cache_dtype
MAX_PIECE_TOKENS = 2048  # EngineConfig.piece_graph_tokens' bound (replicas/pieces.py)
MAX_LM_HEAD_CANDIDATES = 1024  # EngineConfig.fp8_lm_head's bound (C rows read a step)
DEFAULT_LM_HEAD_CANDIDATES = 16  # ...and its value with FP8 weights (PERF.md v0.94)
# EngineConfig.piece_graph_tokens when not set, where pieces are captured (PERF.md v0.48)
DEFAULT_PIECE_TOKENS = 512
# rope types whose frequencies do not depend on the sequence length seen so far
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


MAX_TOP_LOGPROBS = 20  # the OpenAI API's bound
MAX_PENALTY = 2.0  # presence / frequency penalty, either sign (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # either sign (OpenAI's range)


# the decoder's linear layers as the model names them (replicas/model.py)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _names(listed: str) -> tuple[str, ...]:
    """The names of a comma-separated list, blanks dropped."""
    return tuple(name.strip() for name in listed.split(",") if name.strip())


class ConfigError(ValueError):
    """A setting the engine cannot run with; the message says what to change."""


class TooFewGPUs(ConfigError):
    """A tp larger than the GPUs this process sees (`tp`, `visible`)."""

    def __init__(self, tp: int, visible: int) -> None:
        super().__init__(f"tp={tp} needs {tp} GPUs, {visible} visible; lower tp or use "
                         "device='cpu'")
        self.tp, self.visible = tp, visible

    def __reduce__(self) -> tuple[type, tuple[int, int]]:  # (to another process whole)
        return type(self), (self.tp, self.visible)


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides how one engine replica (one TP group) runs."""

    model: str | None = None  # local HF-format directory; None = the built-in tiny model
    tp: int = 1
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    # all-reduce payload: auto (the model's own 16-bit dtype; float16 for a float32
    # model) | float16 | bfloat16 | float32
    comm_dtype: str = "auto"
    max_model_len: int | None = None  # prompt + max_tokens bound; default: the model's
    kv_cache_memory: int | None = None  # bytes of KV cache per rank; None: measured / default
    num_kv_blocks: int | None = None  # exact pool size (overrides kv_cache_memory)
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 512  # tokens in one step (chunked prefill budget)
    load_format: str = "auto"  # auto: safetensors from `model`; random: random init
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # seed of random init and of unseeded sampling
    dist_timeout_s: float = 300.0  # a collective that waits longer fails instead of hanging
    # share of the GPU memory free after loading that the KV pool and the largest step's
    # activations (measured at start, Worker._activation_peak) may take together
    gpu_memory_utilization: float = 0.90
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (GPU only)
    # steps that are not plain decode (they admit prompts or prefill chunks) of up to this
    # many tokens: each layer's work but attention replayed from CUDA graphs in pieces
    # per token bucket, attention run eagerly between them (replicas/pieces.py); 0: all
    # eager. On a CPU (or without cuda_graphs) the same pieces run as plain calls, padded:
    # no gain there, it is what the tests hold against the eager forward. None (not set):
    # DEFAULT_PIECE_TOKENS on one GPU with cuda_graphs (measured there, PERF.md v0.48),
    # else 0: at tp > 1 until measured on several GPUs; `resolved_piece_graph_tokens`
    piece_graph_tokens: int | None = None
    # batch-1 matmuls: Triton GEMV where it beats cuBLAS (16-bit GPU); and W8A8's matmul at
    # a decode step's rows: Triton where it beats `_scaled_mm` (kernels.pick_w8a8; picks
    # are per process and weight shape, so an engine started after a tuned one in the
    # same process finds them)
    gemv_kernels: bool = True
    # step N+1 is launched with step N's tokens still on the device (the host reads them
    # while the GPU runs it); at tp > 1 on GPUs too (rank 0 broadcasts those tokens on the
    # device), while CPU ranks at tp > 1 read each step's tokens before the next
    async_scheduling: bool = True
    # tp > 1: row-parallel matmuls over more tokens go in chunks of this many, each
    # chunk's all-reduce overlapping the next chunk's matmul (0: one reduce at the end)
    overlap_chunk_tokens: int = 2048
    # tp > 1 on CPU, ranks on one host: all-reduces through shared memory (replicas/shm.py)
    # instead of gloo, which costs ~2 ms a call on a small VM; False: always gloo
    shm_all_reduce: bool = True
    # tp > 1, ranks on one host: rank 0's step messages through shared memory
    # (replicas/shm.py ShmChannel) instead of two gloo broadcasts per step
    shm_step_messages: bool = True
    # tp > 1 on GPUs: all-reduces of up to 2 MiB (decode steps) in one kernel over
    # PyTorch symmetric memory (peer-to-peer loads over NVLink, never multicast;
    # replicas/symm.py) instead of NCCL; bfloat16 and float32 payloads
    one_shot_all_reduce: bool = True
    # ...and, in batch-1 decode, each all-reduce after a row-parallel GEMV folded into the
    # kernels beside it: that GEMV pushes its rows to every rank, the next norm GEMV sums
    # them as it reads (no all-reduce kernel; replicas/kernels/allreduce.py). Off until
    # measured faster on two GPUs (PERF.md v0.15: its first form was slower)
    fold_all_reduce: bool = False
    # tokens per streamed delta (Engine.add_request) after a request's first, which goes
    # at once: each delta is one message to the router (through Serve, a message of its
    # own, whose per-message cost set the GPU stack's pace, issue 19; on the direct data
    # path, an item of its step's frame); 1: every step's token as it comes
    stream_interval: int = 1
    # none | fp8 | fp8-w8a8: the linear layers' weights quantized to FP8 (e4m3, a scale
    # per output channel) once loaded; fp8: activations stay 16-bit (FP8 tiles widened in
    # the kernels); fp8-w8a8: activations quantized per token too, matmuls on FP8 tensor
    # cores. The embedding stays 16-bit; the LM head too but in decode steps of up to 64
    # sequences (fp8_lm_head; replicas/fp8.py)
    quantization: str = "none"
    # auto | fp8 | int8: the KV cache's entries in the model's dtype; in FP8 (e4m3, scale
    # 1): half the bytes of a 16-bit cache, twice the tokens in the same memory; or in
    # int8 with a float32 scale per (token, KV head), max|row| / 127: (head_dim + 4) /
    # (2 head_dim) of the bytes (1.94x the tokens at head_dim 128), and far closer to the
    # 16-bit model than e4m3 (replicas/kv_formats.py, PERF.md)
    kv_cache_dtype: str = "auto"
    # with quantization fp8-w8a8: the projections (comma-separated, of PROJECTIONS)
    # computed weight-only, their inputs left 16-bit: qkv's input costs W8A8 the most
    # accuracy (replicas/w8a8_formats.py, PERF.md v0.31)
    w8a8_weight_only: str = ""
    # with quantization fp8-w8a8: 0, a scale per token; 32, 64 or 128 (a power of two >=
    # 32), a scale per token and run of that many input columns (kernels.w8a8_groups):
    # 32 with qkv_proj weight-only kept W8A8 over the 98 % bar on CPU (PERF.md v0.31)
    w8a8_group: int = 0
    # with quantization fp8 or fp8-w8a8: the projections (comma-separated, of PROJECTIONS)
    # left in the model's 16-bit dtype, weights and inputs: "qkv_proj,o_proj,down_proj"
    # puts only gate_up (~55 % of a GLM-4-9B layer's matmul FLOPs) on FP8 tensor cores,
    # and nothing is widened from FP8 at large batches (PERF.md v0.47, v0.52)
    keep_16bit: str = ""
    # 0: the LM head stays 16-bit. C > 0: in steps of up to 64 rows (parallel.
    # FP8_HEAD_ROWS: decode of up to 64 sequences) it reads FP8 rows (a scale
    # per vocabulary row; half the bytes of GLM-4-9B's 1.24 GB head), and each row's C
    # highest logits are computed again from the 16-bit rows, kept beside (the head's
    # memory 1.5x): greedy tokens and the logits of each row's top C are the 16-bit
    # head's, the rest FP8's. Steps of more rows use the 16-bit rows. None: 16 with FP8
    # weights (quantization 'fp8' or 'fp8-w8a8', or an FP8 checkpoint), else 0
    # (measured: -4.7 % a token at batch 1 on an H100, the same top-1 agreement; PERF.md
    # v0.94; -3.2 % a step at 4 and 16 sequences, v0.96)
    fp8_lm_head: int | None = None

    def __post_init__(self) -> None:
        if self.tp not in SUPPORTED_TP:
            raise ConfigError(f"tp={self.tp} is not supported; choose one of {SUPPORTED_TP}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: use 'auto' or one of {sorted(DTYPES)}")
        if self.comm_dtype != "auto" and self.comm_dtype not in DTYPES:
            raise ConfigError(f"comm_dtype={self.comm_dtype!r}: use 'auto' or one of "
                              f"{sorted(DTYPES)}")
        if self.load_format not in ("auto", "random"):
            raise ConfigError(f"load_format={self.load_format!r}: use 'auto' or 'random'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: use 'auto', 'cpu' or 'cuda'")
        if self.piece_graph_tokens is not None and not (
                0 <= self.piece_graph_tokens <= MAX_PIECE_TOKENS):
            raise ConfigError(f"piece_graph_tokens must be in [0, {MAX_PIECE_TOKENS}], got "
                              f"{self.piece_graph_tokens}")
        if self.overlap_chunk_tokens < 0:
            raise ConfigError(f"overlap_chunk_tokens must be >= 0, got "
                              f"{self.overlap_chunk_tokens}")
        if self.fp8_lm_head is not None and not (
                0 <= self.fp8_lm_head <= MAX_LM_HEAD_CANDIDATES):
            raise ConfigError(f"fp8_lm_head={self.fp8_lm_head}: use 0 (a 16-bit head) or "
                              f"the logits to compute again, 1 to {MAX_LM_HEAD_CANDIDATES}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "stream_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ConfigError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.model is not None and not os.path.isdir(self.model):
            raise ConfigError(
                f"model directory {self.model!r} does not exist; pass a local directory "
                "holding config.json and *.safetensors (HF format), or model=None for "
                "the built-in tiny model"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of "
                              f"{', '.join(map(repr, KV_CACHE_DTYPES))}")
        if self.quantization not in ("none", "fp8", "fp8-w8a8"):
            raise ConfigError(f"quantization={self.quantization!r}: use 'none', 'fp8' "
                              "(FP8 weights) or 'fp8-w8a8' (FP8 weights and activations)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        weight_only = self.weight_only_projections()
        if set(weight_only) - set(PROJECTIONS):
            raise ConfigError(f"w8a8_weight_only={self.w8a8_weight_only!r}: name projections "
                              f"of {', '.join(PROJECTIONS)}, separated by commas")
        if weight_only and self.quantization != "fp8-w8a8":
            raise ConfigError(f"w8a8_weight_only={self.w8a8_weight_only!r} is for "
                              f"quantization='fp8-w8a8', not {self.quantization!r}")
        keep = self.kept_16bit_projections()
        if set(keep) - set(PROJECTIONS):
            raise ConfigError(f"keep_16bit={self.keep_16bit!r}: name projections of "
                              f"{', '.join(PROJECTIONS)}, separated by commas")
        if keep and self.quantization == "none":
            raise ConfigError(f"keep_16bit={self.keep_16bit!r} is for quantization 'fp8' or "
                              "'fp8-w8a8' (without quantization every projection is 16-bit)")
        if set(keep) & set(weight_only):
            raise ConfigError(f"{', '.join(sorted(set(keep) & set(weight_only)))}: in both "
                              "keep_16bit (16-bit weights) and w8a8_weight_only (FP8 weights); "
                              "name each in one")
        if self.w8a8_group and (self.w8a8_group < 32
                                or self.w8a8_group & (self.w8a8_group - 1)):
            raise ConfigError(f"w8a8_group={self.w8a8_group}: use 0 (a scale per token) or "
                              "a power of two >= 32")
        if self.w8a8_group and self.quantization != "fp8-w8a8":
            raise ConfigError(f"w8a8_group={self.w8a8_group} is for quantization='fp8-w8a8', "
                              f"not {self.quantization!r}")

    def weight_only_projections(self) -> tuple[str, ...]:
        """The projections w8a8_weight_only names (in PROJECTIONS' terms)."""
        return _names(self.w8a8_weight_only)

    def lm_head_candidates(self, fp8_weights: bool = False) -> int:
        """fp8_lm_head resolved: the FP8 head's rescored logits a row, 0 for a 16-bit
        head. `fp8_weights`: the layers' weights are FP8 whatever `quantization` says
        (a checkpoint stored in FP8 runs as quantization 'fp8')."""
        if self.fp8_lm_head is not None:
            return self.fp8_lm_head
        fp8 = fp8_weights or self.quantization != "none"
        return DEFAULT_LM_HEAD_CANDIDATES if fp8 else 0

    def kept_16bit_projections(self) -> tuple[str, ...]:
        """The projections keep_16bit names (in PROJECTIONS' terms)."""
        return _names(self.keep_16bit)

    def wire_dtype(self, model_dtype: torch.dtype) -> str:
        """The all-reduce payload's dtype for a model running in `model_dtype`."""
        if self.comm_dtype != "auto":
            return self.comm_dtype
        return "bfloat16" if str(model_dtype) == "torch.bfloat16" else "float16"

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_model_dir(self) -> str:
        """The model's directory: `model`, or the built-in tiny model's (made on first use)."""
        if self.model is not None:
            return self.model
        from replicas.tiny import tiny_model_dir

        return tiny_model_dir()

    def resolved_piece_graph_tokens(self) -> int:
        """The steps up to how many tokens run in pieces (0: none): the field where set,
        else DEFAULT_PIECE_TOKENS where they are captured, at tp=1 (one GPU, cuda_graphs
        on), else 0."""
        if self.piece_graph_tokens is not None:
            return self.piece_graph_tokens
        captured = self.resolved_device() == "cuda" and self.cuda_graphs and self.tp == 1
        return DEFAULT_PIECE_TOKENS if captured else 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


STRUCTURED_KINDS = ("json_object", "json_schema", "ebnf", "structural_tag")


@dataclass(frozen=True)
class StructuredSpec:
    """What a request's output must match (replicas/structured.py enforces it).

    kind "json_object": any JSON object (`spec` unused, ""); "json_schema": `spec` is
    the schema as JSON text; "ebnf": `spec` is a grammar in xgrammar's EBNF (GBNF:
    `root ::= ...`); "structural_tag": `spec` is xgrammar's structural tag as JSON text,
    e.g. a schema inside a model family's tool-call tags (`{"type": "structural_tag",
    "format": {"type": "tag", "begin": "<tool_call>", "content": {"type": "json_schema",
    "json_schema": {...}}, "end": "</tool_call>"}}`).
    Hashable: compiled grammars are cached by it.
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ConfigError(f"structured kind must be one of {', '.join(STRUCTURED_KINDS)}; "
                              f"got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ConfigError("structured spec must be a string (a JSON schema or a "
                              "structural tag as JSON text, or an EBNF grammar)")
        if self.kind != "json_object" and not self.spec.strip():
            raise ConfigError(f"structured kind {self.kind!r} needs a spec")
        if self.kind in ("json_schema", "structural_tag"):
            what = "JSON schema" if self.kind == "json_schema" else "structural tag"
            try:
                value = json.loads(self.spec)
            except ValueError as e:
                raise ConfigError(f"the {what} is not valid JSON: {e}") from None
            if self.kind == "json_schema" and not isinstance(value, dict | bool):
                raise ConfigError("a JSON schema must be a JSON object (or true/false)")
            if self.kind == "structural_tag" and not isinstance(value, dict):
                raise ConfigError("a structural tag must be a JSON object")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy."""

    # None: up to the model's context (the engine sets max_model_len - len(prompt))
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None  # same seed, same prompt, same params: same tokens
    stop: tuple[str, ...] = ()  # stop strings; not included in the text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # log-probabilities are "raw": log_softmax of the model's logits, before penalties,
    # logit_bias, temperature, top-k and top-p (vLLM's default)
    logprobs: bool = False  # return the log-probability of each chosen token
    # with logprobs (and/or prompt_logprobs): also this many most likely tokens at each
    # position, with their log-probabilities, most likely first
    top_logprobs: int = 0
    # return the log-probability of each prompt token given the ones before (the first
    # has none): the OpenAI API's `echo` with `logprobs`
    prompt_logprobs: bool = False
    # OpenAI penalties over the tokens generated so far in this request: the logit of a
    # token seen `count` times drops by presence_penalty * (count > 0) +
    # frequency_penalty * count; then logit_bias (token id -> bias) is added. Both act
    # before temperature, top-k, top-p and greedy's argmax
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)  # (unhashable)
    # constrained decoding (response_format); a dict {"kind", "spec"} is taken too
    structured: StructuredSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured, dict):
            object.__setattr__(self, "structured", StructuredSpec(**self.structured))
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise ConfigError("structured must be a StructuredSpec or {'kind', 'spec'}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens is not None and (
                not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise ConfigError(f"max_tokens must be a positive integer or None (up to the "
                              f"model's context), got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        self._check_logprobs()
        self._check_penalties()

    def _check_logprobs(self) -> None:
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                              f"got {self.top_logprobs!r}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise ConfigError("top_logprobs needs logprobs=True or prompt_logprobs=True")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ConfigError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], "
                                  f"got {value}")
        if self.logit_bias is None:  # (the API's null)
            object.__setattr__(self, "logit_bias", {})
        if not isinstance(self.logit_bias, dict):
            raise ConfigError("logit_bias must map token ids to biases")
        bias = {}
        for token, value in self.logit_bias.items():  # JSON keys arrive as strings
            if isinstance(token, bool) or not str(token).isdigit():
                raise ConfigError(f"logit_bias key {token!r} is not a token id")
            if (not isinstance(value, int | float) or isinstance(value, bool)
                    or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
                raise ConfigError(f"logit_bias of token {token} must be in [-{MAX_LOGIT_BIAS}, "
                                  f"{MAX_LOGIT_BIAS}], got {value}")
            bias[int(token)] = float(value)
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty or a bias changes the logits that tokens are chosen from."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts our model definition needs, read from a transformers config."""

    family: str  # llama | mistral | qwen2 | qwen3 | glm
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    hidden_act: str
    rotary_dim: int  # < head_dim for partial rotary (GLM)
    rope_interleaved: bool  # GLM rotates (even, odd) pairs; the rest rotate halves
    sliding_windows: tuple[int | None, ...] = field(default=())  # per layer
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @staticmethod
    def from_hf(hf_config: Any) -> ModelSpec:
        family = _family((getattr(hf_config, "architectures", None) or [""])[0])
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = _rope_parameters(c)
        partial = float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
        attention_bias = bool(getattr(c, "attention_bias", False))
        eos = getattr(c, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
        dtype = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None) or "float32"
        return ModelSpec(
            family=family,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias if family in ("llama", "qwen3") else False,
            mlp_bias=bool(getattr(c, "mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            hidden_act=c.hidden_act,
            rotary_dim=int(head_dim * partial),
            rope_interleaved=family == "glm",
            sliding_windows=_sliding_windows(family, c),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype).removeprefix("torch."),
        )

    def check_tp(self, tp: int) -> None:
        """Raise a ConfigError unless the model splits evenly over `tp` ranks."""
        _check_tp(self.num_heads, self.num_kv_heads, self.intermediate_size, tp)


def _family(arch: str) -> str:
    """The model family of a transformers architecture; ConfigError if not supported."""
    family = SUPPORTED_ARCHITECTURES.get(arch)
    if family is None:
        raise ConfigError(f"architecture {arch or '(none)'!r} is not supported; supported: "
                          + ", ".join(SUPPORTED_ARCHITECTURES))
    return family


def _check_tp(heads: int, kv_heads: int, intermediate_size: int, tp: int) -> None:
    if problems := _tp_problems(heads, kv_heads, intermediate_size, tp):
        fits = [t for t in SUPPORTED_TP if not _tp_problems(heads, kv_heads,
                                                              intermediate_size, t)]
        raise ConfigError(f"tp={tp} does not divide {', '.join(problems)}; choose tp from "
                          f"{fits} for this model")


def _tp_problems(heads: int, kv_heads: int, intermediate_size: int, tp: int) -> list[str]:
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads}")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"num_key_value_heads={kv_heads}")
    if intermediate_size % tp:
        problems.append(f"intermediate_size={intermediate_size}")
    return problems


def check_model_dir(model_dir: str, tp: int) -> None:
    """ModelSpec.from_hf's architecture check and check_tp on what `model_dir`'s
    config.json says, read as JSON: no transformers, so no torch (the engine replica's
    Serve process fails a wrong model or tp so at once, before its engine process starts).
    A config.json that leaves a head count or the MLP's width to its class's defaults is
    left to the engine's own check, on the whole config."""
    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {model_dir}/config.json: {e}") from e
    if not isinstance(c, dict):
        raise ConfigError(f"{model_dir}/config.json is not a JSON object")
    _family((c.get("architectures") or [""])[0])
    heads, width = c.get("num_attention_heads"), c.get("intermediate_size")
    kv_heads = c.get("num_key_value_heads") or heads
    if all(isinstance(v, int) and v > 0 for v in (heads, kv_heads, width)):
        _check_tp(heads, kv_heads, width, tp)


def hf_config_from_json(text: str) -> SimpleNamespace:
    """A transformers config's values (`to_json_string(use_diff=False)`: every attribute,
    defaults applied) as attributes, which is all ModelSpec.from_hf and the default rope
    read; without importing transformers."""
    return SimpleNamespace(**json.loads(text))


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config, in the transformers 5 form (`rope_parameters`)."""
    return _rope_parameters(hf_config)


def _rope_parameters(c: Any) -> dict[str, Any]:
    params = getattr(c, "rope_parameters", None)
    if params and "full_attention" in params:  # per-layer-type form; ours are uniform
        params = params["full_attention"]
    if not params:  # transformers 4 form
        params = dict(getattr(c, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    if params["rope_type"] not in STATIC_ROPE_TYPES:
        raise ConfigError(
            f"rope type {params['rope_type']!r} is not supported; supported: {STATIC_ROPE_TYPES}"
        )
    return params


def _sliding_windows(family: str, c: Any) -> tuple[int | None, ...]:
    window = getattr(c, "sliding_window", None)
    layers = c.num_hidden_layers
    if family == "mistral":
        return (window,) * layers
    if family in ("qwen2", "qwen3"):
        types = getattr(c, "layer_types", None) or ["full_attention"] * layers
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * layers
