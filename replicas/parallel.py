"""Tensor-parallel layers (Megatron split) and the communication they use.

Each layer owns its shard of the weights and knows how to load its shard from a full
checkpoint tensor (`load`). The all-reduce of a row-parallel layer is called in its own
`forward`, so the model file reads like a single-GPU model with the communication
visible.

Communication runs in `Comm.dtype` (16 bit by default). A float16 payload overflows
above 65504: the reduced result then holds inf. The all-reduce never syncs the host to
look; it records non-finite results in a device-side flag, and the engine reads that flag
with the step's sampled tokens (replicas/engine.py `_Flight`), so a float16 wire costs no
wait of its own. A step whose flag is set is run again on every rank with float32
communication (the step is idempotent: it rewrites the same KV slots), and so is a step
already launched on its tokens: overflow costs a step or two and never a wrong token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from replicas import kernels
from replicas.fp8 import (
    FP8,
    fp8_linear,
    is_fp8,
    takes_two_terms,
    two_term_linear,
    two_term_parts,
    two_term_products,
    two_terms_fold,
    two_terms_norm,
    w8a8_out_dtype,
    w8a8_tokens,
)
from replicas.kernels import RunSum, Site
from replicas.kernels.fp8mm import fold_runs_on
from replicas.shm import ShmAllReduce
from replicas.symm import OneShotAllReduce

log = logging.getLogger(__name__)


@dataclass
class Comm:
    """The rank's view of its TP group: rank, size, payload dtype and the overflow flag."""

    rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.float16
    group: dist.ProcessGroup | None = None
    overflow: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.bool))
    force_float32: bool = False  # set for the re-run of a step whose 16-bit payload overflowed
    # row-parallel matmuls over more tokens than this go in chunks whose all-reduces
    # overlap the next chunk's matmul (0: never)
    overlap_chunk: int = 0
    # CPU ranks of one host: all-reduces through shared memory instead of gloo (shm.py)
    shm: ShmAllReduce | None = None
    # GPUs: decode-size all-reduces in one symmetric-memory kernel instead of NCCL (symm.py)
    one_shot: OneShotAllReduce | None = None
    # ...and a batch-1 step's all-reduces folded into the GEMVs beside them (`fold`)
    fold_reduce: bool = False
    _sites: int = 0  # sites the step has used so far
    folded: int = 0  # all-reduces folded since the start (graph captures count once)

    def new_step(self) -> None:
        """A forward starts: its folded all-reduces number their sites from 0 again (every
        rank makes the same calls in the same order, so the numbers agree)."""
        self._sites = 0

    def fold(self, x: torch.Tensor, n: int) -> Site | None:
        """Where a one-row GEMV's output of n values goes instead of into an all-reduce
        kernel: a Site that its reader sums (`kernels.gemv_push`), or None (then
        `all_reduce`). Only for a wire dtype equal to x's and not float16 (its overflow
        check lives in the one-shot kernel)."""
        if (self.one_shot is None or not self.fold_reduce or self.force_float32
                or x.dtype != self.dtype or x.dtype == torch.float16):
            return None
        site = self.one_shot.site(self._sites, n, x.dtype)
        if site is not None:
            self._sites += 1
            self.folded += 1
        return site

    def to(self, device: torch.device) -> Comm:
        self.overflow = self.overflow.to(device)
        return self

    def all_reduce(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Sum `x` over the group, sending `self.dtype` (x's own dtype if `exact`).

        Returns x's dtype. `x` must be a fresh tensor: it may be reduced in place.
        """
        if self.world_size == 1:
            return x
        wire = x.dtype if exact else torch.float32 if self.force_float32 else self.dtype
        if self.one_shot is not None and self.one_shot.fits(x, wire):
            # one kernel: the cast to the wire, the sum and the float16 overflow check
            return self.one_shot.all_reduce(x, wire, self.overflow)
        payload = x.to(wire)  # no copy when x is already in the wire dtype
        if self.shm is not None and self.shm.fits(payload):
            payload = self.shm.all_reduce(payload)
        else:
            dist.all_reduce(payload, group=self.group)
        if wire == torch.float16 and payload.is_cuda:
            self.overflow |= ~torch.isfinite(payload).all()
        elif wire == torch.float16:  # CPU: one pass instead of isfinite's four; float16
            # values sum to a finite float32 unless one of them is inf or NaN
            self.overflow |= ~torch.isfinite(payload.sum(dtype=torch.float32))
        return payload.to(x.dtype)

    def matmul_all_reduce(self, x: torch.Tensor, weight: torch.Tensor,
                          scale: torch.Tensor | None = None, w8a8: int = 0
                          ) -> torch.Tensor:
        """x @ weight.T summed over the group, in x's dtype (an FP8 weight with its
        per-row `scale`: through replicas/fp8.py's fp8_linear).

        Over `overlap_chunk` tokens (a prefill), the rows go in chunks: each chunk's
        all-reduce is started asynchronously (NCCL runs it on its own stream, gloo on its
        own thread) while the next chunk's matmul computes, so only the last chunk's
        reduce is exposed. Not inside a CUDA graph capture (decode: one small reduce).
        """
        t = x.shape[0]
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        # through shared memory a reduce is a copy and an add: nothing to overlap
        if self.world_size == 1 or not 0 < self.overlap_chunk < t or capturing or (
                self.shm is not None and not x.is_cuda):
            return self.all_reduce(_matmul(x, weight, scale, None, w8a8))
        wire = torch.float32 if self.force_float32 else self.dtype
        out = torch.empty(t, weight.shape[0], dtype=x.dtype, device=x.device)
        started = []
        for start in range(0, t, self.overlap_chunk):
            end = min(t, start + self.overlap_chunk)
            payload = _matmul(x[start:end], weight, scale, None, w8a8).to(wire)
            started.append((start, end, payload,
                            dist.all_reduce(payload, group=self.group, async_op=True)))
        for start, end, payload, work in started:
            work.wait()
            if wire == torch.float16:
                self.overflow |= ~torch.isfinite(payload).all()
            out[start:end] = payload
        return out

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's `x` along the last dim (vocab shards of the logits)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def reset_overflow(self) -> None:
        self.overflow.zero_()


def _matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
            bias: torch.Tensor | None = None, w8a8: int = 0) -> torch.Tensor:
    """x @ weight.T (+ bias); an FP8 weight (scale not None) through fp8_linear."""
    if scale is None:
        return F.linear(x, weight, bias)
    return fp8_linear(x, weight, scale, bias, w8a8)


def _target(layer: nn.Module, name: str) -> torch.Tensor:
    """The tensor of `layer` that checkpoint tensor `name` fills: weight, bias, or (an FP8
    checkpoint, replicas/fp8.py) weight_scale."""
    kind = name.rsplit(".", 1)[-1]
    target = getattr(layer, kind, None) if kind in ("weight", "bias", "weight_scale") else None
    if target is None:
        raise ValueError(f"checkpoint has {name} but the layer has no {kind}")
    return target


def shard_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's equal share of `total` rows."""
    size = total // world_size
    return rank * size, (rank + 1) * size


# reads an index (rows, or (rows, columns)) of one checkpoint tensor, and nothing more
Index = slice | tuple[slice, slice]


def on_gemv(gemv: kernels.GemvConfig | None, x: torch.Tensor) -> bool:
    """Whether a layer with this tuned GEMV config runs `x` through it: one row only."""
    return gemv is not None and x.shape[0] == 1


class _KernelLinear(nn.Module):
    """What both sharded linears carry for their kernels: a tuned GEMV for one-row
    inputs, and the FP8 form replicas/fp8.py may give their weight."""

    gemv: kernels.GemvConfig | None
    gemv_kind: kernels.GemvKind
    weight_scale: torch.Tensor | None
    w8a8: int

    def _init_kernels(self) -> None:
        self.gemv = None  # one-row inputs: Triton GEMV (tuned)
        self.gemv_kind = "plain"  # as its owner calls it (pick_gemv)
        # per row, once the weight is FP8 (replicas/fp8.py quantize_model)
        self.register_buffer("weight_scale", None, persistent=False)
        # FP8 activations too (quantization="fp8-w8a8"): fp8.fp8_linear's w8a8
        self.w8a8 = 0

    def takes_tokens_fp8(self) -> bool:
        """Whether `forward_tokens_fp8` may be called: W8A8 with a scale per token."""
        return self.w8a8 == 1 and self.weight_scale is not None

    def _two_term_parts(self, x: torch.Tensor) -> RunSum | None:
        """Weight-only FP8 whose x takes two FP8 terms (fp8.two_term_parts: from
        TWO_TERM_ROWS rows, unfused, with fp8.two_terms_fold on), no bias, on the
        kernels' path: the two products unadded, for the reader to add as it reads them
        (PERF.md v1.04); else None."""
        if self.bias is not None or not self._weight_only_steps(x):
            return None
        assert self.weight_scale is not None
        return two_term_parts(x, self.weight, self.weight_scale)

    def _weight_only_steps(self, x: torch.Tensor) -> bool:
        """Whether x's product is weight-only FP8 (no W8A8) on the kernels' path, rows of
        a step, not the one-row GEMV's: where x may take two FP8 terms."""
        return (self.weight_scale is not None and not self.w8a8 and x.dim() == 2
                and kernels.enabled(x) and not on_gemv(self.gemv, x))

    def _tokens_fp8(self, x8: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype,
                    bias: torch.Tensor | None, defer: bool = False) -> torch.Tensor | RunSum:
        """This rank's product of an input of `dtype` given already quantized per token,
        (x8, x_scale) as fp8_linear would make them (a fused kernel: the norm's or
        SwiGLU's and the quantization in one pass), `bias` in the matmul's epilogue.
        `defer`: a pick in runs of K may leave them unadded (RunSum, PERF.md v0.80)."""
        assert self.weight_scale is not None
        out = w8a8_out_dtype(dtype, x8.is_cuda)
        y = w8a8_tokens(x8, x_scale, self.weight, self.weight_scale, bias, out, defer)
        return y if isinstance(y, RunSum) else y.to(dtype)


class ColumnParallelLinear(_KernelLinear):
    """y = x W^T with W's output rows split over ranks; output stays sharded.

    One weight may fuse several pieces (q|k|v, gate|up): each piece is sharded on its
    own, so the local weight is [q_shard; k_shard; v_shard]. `part_shards` overrides the
    even split (KV heads replicated when there are fewer than ranks).
    """

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, comm: Comm,
                 part_shards: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.comm = comm
        self.part_sizes = part_sizes  # full output rows of each fused piece
        # (start, end) rows of each piece that this rank keeps
        self.part_shards = part_shards or [
            shard_range(n, comm.rank, comm.world_size) for n in part_sizes
        ]
        local = sum(e - s for s, e in self.part_shards)
        self.weight = nn.Parameter(torch.empty(local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local), requires_grad=False) if bias else None
        self._init_kernels()
        self.defers_two_terms = False  # (see forward; MLP sets it on its gate_up_proj)

    def load(self, name: str, get: Callable[[Index], torch.Tensor], part: int | None) -> None:
        """Copy this rank's rows of checkpoint tensor `name` (weight or bias) into place.

        `get(rows)` reads only those rows from the checkpoint. part=None means the
        checkpoint tensor holds all pieces fused in order (GLM's gate_up_proj).
        """
        target = _target(self, name)
        pieces = range(len(self.part_sizes)) if part is None else [part]
        offset_full = 0
        for i in range(len(self.part_sizes)):
            start, end = self.part_shards[i]
            local_at = sum(e - s for s, e in self.part_shards[:i])
            if i in pieces:
                base = offset_full if part is None else 0
                rows = get(slice(base + start, base + end))
                target.data[local_at : local_at + end - start].copy_(rows)
            offset_full += self.part_sizes[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor | RunSum:
        """[tokens, in] -> [tokens, local_out]. With `defers_two_terms` (MLP's gate_up_proj
        under SwiGLU) weight-only FP8's two terms may come back unadded: a RunSum that
        SwiGLU's kernel adds as it reads it (PERF.md v1.04)."""
        if on_gemv(self.gemv, x):
            return kernels.gemv(x, self.weight, self.bias, self.gemv, scale=self.weight_scale)
        if self.defers_two_terms and (parts := self._two_term_parts(x)) is not None:
            return parts
        return _matmul(x, self.weight, self.weight_scale, self.bias, self.w8a8)

    def takes_swiglu(self, x: torch.Tensor | Site | RunSum) -> bool:
        """Whether `forward_normed(x, ..., swiglu=True)` may be called: a layer tuned as
        "norm_swiglu" (gate_up_proj's [gate; up]) on the one-row GEMV path."""
        if isinstance(x, RunSum):  # (a W8A8 matmul's output: not the one-row GEMV's)
            return False
        on = self.gemv is not None if isinstance(x, Site) else (
            on_gemv(self.gemv, x) and kernels.enabled(x))
        return self.gemv_kind == "norm_swiglu" and on

    def forward_normed(self, x: torch.Tensor | Site | RunSum, residual: torch.Tensor | None,
                       norm: RMSNorm, swiglu: bool = False
                       ) -> tuple[torch.Tensor | RunSum, torch.Tensor]:
        """(self(norm(x + residual)), x + residual): a decoder layer's norm and its
        projection; on the one-row GEMV path one kernel does both. `x` may be the Site of
        a folded all-reduce: that kernel then sums the ranks' rows as it reads them; or a
        RunSum (a W8A8 product's two runs of K): the norm's kernel adds them as it reads
        them (PERF.md v0.80). swiglu (where `takes_swiglu`): the first result is
        silu(gate) * up of it, from the same kernel."""
        if isinstance(x, RunSum):
            if not self._folds(x, residual, swiglu):
                x = x.total()
            else:
                first, extra = x.parts
                if (done := self._normed_fp8(first, residual, norm, extra)) is not None:
                    return done
                h, s = kernels.rms_norm(first, norm.weight, norm.eps, residual, extra=extra)
                assert s is not None
                return self(h), s
        if isinstance(x, Site) and self.gemv is None:
            x = x.pull()
        if isinstance(x, Site) or (on_gemv(self.gemv, x) and kernels.enabled(x)):
            assert self.gemv is not None
            return kernels.gemv_norm(x, residual, norm.weight, norm.eps, self.weight,
                                     self.bias, self.gemv, self.weight_scale, swiglu)
        assert not swiglu, "SwiGLU in the projection's kernel: the one-row GEMV only"
        if (done := self._normed_fp8(x, residual, norm)) is not None:
            return done
        h, residual = norm(x, residual)
        return self(h), residual

    def _normed_fp8(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                    extra: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor | RunSum, torch.Tensor] | None:
        """forward_normed where the norm's kernel quantizes its rows (x, plus `extra`'s
        where given) for this product in the same pass, the 16-bit row never written:
        W8A8 with a scale per token, or weight-only FP8's two terms (PERF.md v1.06);
        None where neither applies."""
        if self.takes_tokens_fp8() and kernels.enabled(x) and x.dim() == 2:
            x8, x_scale, s = kernels.rms_norm_quantize_fp8(x, norm.weight, norm.eps,
                                                           residual, extra=extra)
            return self.forward_tokens_fp8(x8, x_scale, x.dtype), s
        if self.takes_two_terms_normed(x):
            x8, x_scale, s = kernels.rms_norm_quantize_fp8(x, norm.weight, norm.eps,
                                                           residual, extra=extra, two=True)
            return self.from_two_terms(x8, x_scale, x.dtype), s
        return None

    def takes_two_terms_normed(self, x: torch.Tensor) -> bool:
        """Whether forward_normed has its norm's kernel write x's two FP8 terms (PERF.md
        v1.06; fp8.two_terms_norm): weight-only FP8 whose product of the normed x takes
        them (fp8.takes_two_terms), on the kernels' path, not the one-row GEMV's."""
        return (self._weight_only_steps(x) and two_terms_norm()
                and takes_two_terms(x, self.weight))

    def from_two_terms(self, x8: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype
                       ) -> torch.Tensor | RunSum:
        """This rank's product from x's two FP8 terms already made (x8 [2M, K], x_scale
        [2M, 1]): unadded (a RunSum) where forward would leave them so
        (`defers_two_terms`, no bias, fp8.two_terms_fold), else added, then the bias."""
        assert self.weight_scale is not None
        if self.defers_two_terms and self.bias is None and two_terms_fold():
            return RunSum(two_term_products(x8, x_scale, self.weight, self.weight_scale,
                                            dtype))
        return two_term_linear(x8, x_scale, self.weight, self.weight_scale, self.bias, dtype)

    def _folds(self, x: RunSum, residual: torch.Tensor | None, swiglu: bool) -> bool:
        """Whether forward_normed's norm adds x's parts itself: two of them, a residual to
        store their sum in, on the kernels' path, not the one-row GEMV's."""
        first = x.parts[0]
        return (len(x.parts) == 2 and residual is not None and not swiglu
                and kernels.enabled(first) and not on_gemv(self.gemv, first))

    def forward_tokens_fp8(self, x8: torch.Tensor, x_scale: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
        """forward(x) from x quantized per token (kernels.rms_norm_quantize_fp8); the
        output stays sharded (any tp), the bias added in the epilogue as fp8_linear does."""
        return self._tokens_fp8(x8, x_scale, dtype, self.bias)


def gemv_cache_path() -> Path:
    """Where measured GEMV picks are kept between starts: in tpserve's cache
    ($TPSERVE_CACHE, else ~/.cache/tpserve), as Triton keeps its kernels under ~/.triton."""
    from replicas.tiny import cache_root

    return cache_root() / "gemv_picks.json"


def gemv_cache_key(weight: torch.Tensor, has_bias: bool, kind: str) -> str:
    """A pick holds for one GPU model, software stack, kernel source and config list, and
    one weight shape, dtype and layer kind: change any, and the GEMV is timed again."""
    configs = hashlib.sha256(repr(kernels.gemv_configs(fp8=True)).encode()).hexdigest()[:12]
    return "|".join([_gemv_stack(weight.device), f"configs {configs}",
                     f"{tuple(weight.shape)} {weight.dtype}", f"bias={has_bias}", kind])


@functools.cache
def _gemv_stack(device: torch.device) -> str:
    """The GPU model, torch, Triton and the kernels package's source, once a process (the
    source is read and hashed once, not for every layer shape)."""
    import triton  # (only called on the GPU path, where Triton is present)

    modules = sorted(Path(kernels.__file__).parent.glob("*.py"))  # the kernels package
    source = hashlib.sha256(b"".join(p.read_bytes() for p in modules)).hexdigest()[:16]
    return "|".join([torch.cuda.get_device_name(device), f"torch {torch.__version__}",
                     f"triton {triton.__version__}", f"kernels {source}"])


def read_picks(path: Path) -> dict[str, dict[str, Any]]:
    """The kept picks; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        picks = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return picks if isinstance(picks, dict) else {}


def write_picks(path: Path, new: dict[str, dict[str, Any]]) -> None:
    """Merge `new` into the kept picks, atomically (a rename): two ranks or engines that
    start together each write a whole file, never a torn one. A read-only home only
    costs the timing on the next start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**read_picks(path), **new}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gemv_picks.")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("GEMV picks not kept in %s: %s", path, exc)


def tune_gemv(model: nn.Module, cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Give each linear layer the Triton GEMV config that beats cuBLAS on its shape at one
    row, by measurement on this GPU (layers of one shape share the answer), and each W8A8
    layer with a scale per token its few-row picks (`_tune_w8a8`); returns the times per
    shape, for the record. Picks measured before on the same GPU model and
    software are read from `cache` (default `gemv_cache_path()`) instead of timed."""
    path = cache or gemv_cache_path()
    kept, measured = read_picks(path), {}
    # what the layers' input rows are in (an FP8 layer's GEMV is timed on those)
    model_dtype = next((p.dtype for p in model.parameters() if p.dtype != FP8),
                       torch.bfloat16)
    picked: dict[tuple[int, int, bool, str], kernels.GemvConfig | None] = {}
    report: dict[str, dict[str, Any]] = {}
    for module in model.modules():  # (an MLP's kinds follow its weights' dtype)
        if hasattr(module, "gemv_kinds"):
            module.gemv_kinds()
    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear | ParallelLMHead):
            continue
        bias = module.bias if isinstance(module, ColumnParallelLinear) else None
        scale = module.weight_scale if is_fp8(module) else None
        key = (*module.weight.shape, bias is not None, module.gemv_kind,
               str(module.weight.dtype))
        if key not in picked:
            cache_key = gemv_cache_key(module.weight, bias is not None, module.gemv_kind)
            entry = kept.get(cache_key)
            hit = kept_pick(entry)
            if hit is not None:
                picked[key] = hit[0]
                report[str(key)] = {**(entry or {}), "cached": "yes"}
            else:
                fp8 = {} if scale is None else {"scale": scale, "dtype": model_dtype}
                picked[key], times = kernels.pick_gemv(module.weight, bias,
                                                       module.gemv_kind, **fp8)
                report[str(key)] = {**{k: round(v, 2) for k, v in times.items()},
                                    "chosen": str(picked[key] or "cublas")}
                measured[cache_key] = report[str(key)]
        module.gemv = picked[key]
        # W8A8 with a scale per token, at any tp (the base's test: a row-parallel layer
        # at tp > 1 takes no pre-quantized input, but still runs w8a8_tokens)
        if isinstance(module, _KernelLinear) and _KernelLinear.takes_tokens_fp8(module):
            _tune_w8a8(module, kept, measured, report)
    if measured:
        write_picks(path, measured)
    return report


def _tune_w8a8(module: _KernelLinear, kept: dict[str, Any], measured: dict[str, Any],
               report: dict[str, dict[str, Any]]) -> None:
    """A W8A8 layer's picks for a decode step's rows (`kernels.pick_w8a8`: a Triton
    config, `_scaled_mm` in runs of K side by side, or plain `_scaled_mm`, per count of
    rows), once per weight shape and process, kept
    in the GEMV picks' cache beside them (kernels.fp8mm.W8A8_PICKS)."""
    from replicas.kernels import fp8mm

    assert module.weight_scale is not None
    shape = (module.weight.shape[0], module.weight.shape[1])
    if shape in fp8mm.W8A8_PICKS:
        return
    has_bias = getattr(module, "bias", None) is not None
    cache_key = gemv_cache_key(module.weight, has_bias, fp8mm.w8a8_candidates()[0])
    entry = kept.get(cache_key)
    picks = kept_w8a8(entry)
    if picks is not None:
        report[f"w8a8 {shape}"] = {**entry, "cached": "yes"}
    else:
        picks, times = kernels.pick_w8a8(module.weight, module.weight_scale, has_bias)
        report[f"w8a8 {shape}"] = measured[cache_key] = {
            "picks": [[rows, list(config) if config else None] for rows, config in picks],
            **{f"{rows} rows": {name: round(us, 2) for name, us in t.items()}
               for rows, t in times.items()}}
    fp8mm.W8A8_PICKS[shape] = picks


def kept_w8a8(entry: Any) -> tuple[tuple[int, Any], ...] | None:
    """Kept W8A8 picks as ((rows, config or None), ...), or None when `entry` holds none
    usable (missing, malformed, or a config no longer in the list): then time again."""
    from replicas.kernels.fp8mm import W8A8_CUBLAS_CONFIGS, W8A8_TOKENS_CONFIGS

    picks = entry.get("picks") if isinstance(entry, dict) else None
    if not isinstance(picks, list) or not picks:
        return None
    out = []
    for pick in picks:
        if not (isinstance(pick, list) and len(pick) == 2 and isinstance(pick[0], int)):
            return None
        config = None if pick[1] is None else tuple(pick[1])
        if config is not None and config not in W8A8_TOKENS_CONFIGS + W8A8_CUBLAS_CONFIGS:
            return None
        out.append((pick[0], config))
    return tuple(out)


def kept_pick(entry: Any) -> tuple[kernels.GemvConfig | None] | None:
    """A kept pick as (config or None for cuBLAS,), or None when `entry` holds no usable
    pick (missing, malformed, or a config no longer in the list): then time it again."""
    chosen = entry.get("chosen") if isinstance(entry, dict) else None
    if chosen == "cublas":
        return (None,)
    if not isinstance(chosen, str):
        return None
    try:
        config = tuple(int(v) for v in chosen.strip("() ").split(","))
    except ValueError:
        return None
    known = kernels.gemv_configs(fp8=True)  # (every config either kind may pick)
    return (config,) if config in known else None  # type: ignore[return-value]


class RowParallelLinear(_KernelLinear):
    """y = sum_ranks x_r W_r^T: input columns split over ranks, one all-reduce after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        self.in_shard = shard_range(in_features, comm.rank, comm.world_size)
        local_in = self.in_shard[1] - self.in_shard[0]
        self.weight = nn.Parameter(torch.empty(out_features, local_in), requires_grad=False)
        # the bias is added once, after the reduce, so it is not counted tp times
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._init_kernels()

    def load(self, name: str, get: Callable[[Index], torch.Tensor], part: int | None) -> None:
        if not name.endswith("weight"):  # bias, an FP8 weight's scale: every row
            _target(self, name).data.copy_(get(slice(None)))
        else:
            # [out, in_shard]: safetensors reads only these columns of each row
            self.weight.data.copy_(get((slice(None), slice(*self.in_shard))))

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor | Site | RunSum:
        """[tokens, local_in] -> [tokens, out]; gated (one-row GEMV only, see
        `takes_gated`): x is [gate | up], 2 local_in wide, and silu(gate) * up goes in.
        One row on GPUs: the all-reduce may be folded (`Comm.fold`), and the Site is
        returned for the next norm GEMV to sum. W8A8 at tp=1 (`folds_runs`): a RunSum
        may be returned for the next norm to add (PERF.md v0.80); so may weight-only
        FP8's two terms at tp=1 (`_two_term_parts`, v1.04)."""
        if not gated and self.folds_runs() and not on_gemv(self.gemv, x) and (
                kernels.enabled(x) and x.dim() == 2):  # fp8_linear's steps, deferred
            return self.forward_tokens_fp8(*kernels.quantize_tokens_fp8(x), x.dtype)
        # weight-only FP8's two terms at tp=1, deferred as W8A8's runs (PERF.md v1.04)
        if not gated and self.comm.world_size == 1 and (
                parts := self._two_term_parts(x)) is not None:
            return parts
        if on_gemv(self.gemv, x):
            assert self.gemv is not None
            site = self.comm.fold(x, self.weight.shape[0]) if self.bias is None else None
            if site is not None:  # pushed to every rank; its reader sums it
                return kernels.gemv_push(x, self.weight, self.gemv, gated, site,
                                         self.weight_scale)
            y = self.comm.all_reduce(kernels.gemv(x, self.weight, None, self.gemv, gated,
                                                  self.weight_scale))
        else:
            y = self.comm.matmul_all_reduce(x, self.weight, self.weight_scale, self.w8a8)
        return y + self.bias if self.bias is not None else y

    def takes_gated(self, x: torch.Tensor) -> bool:
        """Whether `forward(x, gated=True)` may be called: a one-row step on the GEMV."""
        return on_gemv(self.gemv, x)

    def takes_tokens_fp8(self) -> bool:
        """As the base's, at tp=1 only (at tp > 1 forward's matmul_all_reduce overlaps
        its chunks' reduces)."""
        return super().takes_tokens_fp8() and self.comm.world_size == 1

    def folds_runs(self) -> bool:
        """Whether this layer's W8A8 product may leave its runs of K unadded (a RunSum):
        per-token W8A8 at tp=1 (nothing to all-reduce), no bias, TPSERVE_W8A8_FOLD not 0."""
        return self.takes_tokens_fp8() and self.bias is None and fold_runs_on()

    def forward_tokens_fp8(self, x8: torch.Tensor, x_scale: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor | RunSum:
        """forward(x) from x quantized per token (kernels.silu_mul_quantize_fp8): the
        ranks' products all-reduced, then the bias (or, `folds_runs`, maybe a RunSum)."""
        if self.folds_runs():
            return self._tokens_fp8(x8, x_scale, dtype, None, defer=True)
        y = self.comm.all_reduce(self._tokens_fp8(x8, x_scale, dtype, None))
        return y + self.bias if self.bias is not None else y


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, end, rows_per_rank) of rank's vocabulary rows; the last shard is padded."""
    per_rank = -(-vocab_size // world_size)
    start = rank * per_rank
    return start, min(vocab_size, start + per_rank), per_rank


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over ranks; rows outside a rank's range give
    zeros there, and one all-reduce assembles the full lookup."""

    def __init__(self, vocab_size: int, dim: int, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        self.start, self.end, per_rank = vocab_shard(vocab_size, comm.rank, comm.world_size)
        self.weight = nn.Parameter(torch.zeros(per_rank, dim), requires_grad=False)

    def load(self, name: str, get: Callable[[Index], torch.Tensor], part: int | None) -> None:
        rows = get(slice(self.start, self.end))
        self.weight.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [tokens] -> [tokens, dim]
        if self.comm.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.end - self.start)
        out = F.embedding(local.clamp(0, self.end - self.start - 1), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        # one rank holds each row: sending the model dtype keeps the lookup exact
        return self.comm.all_reduce(out, exact=True)


# an FP8 LM head reads its FP8 rows in steps of up to this many rows, its 16-bit rows in
# larger ones (PERF.md v0.94 at one row; v0.96 on an H100: GLM-4-9B's head through
# kernels.w8a16 240-290 us at 16-64 rows against 441-452 for the 16-bit matmul, 580 at
# 128 in its default config against 459; FP8 decode at 4 and 16 sequences -3.2 % a step)
FP8_HEAD_ROWS = 64


class ParallelLMHead(nn.Module):
    """logits = h E^T with E's vocab rows split over ranks (as the embedding's), then
    gathered to the full vocabulary on every rank.

    With an FP8 head (`fp8.quantize_head`, EngineConfig.fp8_lm_head = C): `weight` is
    FP8 (a scale per vocabulary row, `weight_scale`) and `weight16` the 16-bit rows. An
    input of up to FP8_HEAD_ROWS rows (decode of up to 64 sequences, where the head's
    bytes are the cost) reads the FP8 rows, and for each row each rank computes its
    shard's C highest logits again from `weight16` (C rows read; on the Triton path the
    C highest of each run's few highest, nearly always the same set), so the logits the
    tokens are chosen from are the 16-bit head's wherever they rank in a shard's top C,
    and FP8's (relative error ~2^-5 a weight) elsewhere: a grammar's mask, penalties or a
    logit_bias that leave only tokens outside the top C choose among FP8 logits. Inputs
    of more rows read `weight16` alone, as a 16-bit head."""

    def __init__(self, vocab_size: int, dim: int, comm: Comm) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.start, self.end, per_rank = vocab_shard(vocab_size, comm.rank, comm.world_size)
        self.weight = nn.Parameter(torch.zeros(per_rank, dim), requires_grad=False)
        self.gemv: kernels.GemvConfig | None = None  # one-row inputs: Triton GEMV (tuned)
        self.gemv_kind: kernels.GemvKind = "plain"  # as its owner calls it (pick_gemv)
        self.candidates = 0  # an FP8 head's C (0: a 16-bit head)
        self.register_buffer("weight_scale", None, persistent=False)
        self.register_buffer("weight16", None, persistent=False)

    load = VocabParallelEmbedding.load

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [n, dim] -> [n, vocab] float32
        if self.weight16 is None:
            local = self._logits(h, self.weight, None)
        elif h.shape[0] <= FP8_HEAD_ROWS:
            local = self._rescored(h, self._logits(h, self.weight, self.weight_scale))
        else:
            local = F.linear(h, self.weight16).float()
        return self.comm.all_gather_last(local)[:, : self.vocab_size]

    def _logits(self, h: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None
                ) -> torch.Tensor:  # [n, vocab_per_rank] float32
        if on_gemv(self.gemv, h):
            return kernels.gemv(h, weight, None, self.gemv, scale=scale).float()
        if scale is None:
            return F.linear(h, weight).float()
        if kernels.enabled(h):  # the FP8 batch kernel in the head's own configs
            config = kernels.w8a16_config(h.shape[0], kernels.W8A16_HEAD_PICKS)
            return kernels.w8a16(h, weight, scale, config=config).float()
        return fp8_linear(h, weight, scale, two_terms=False).float()

    def _rescored(self, h: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """`local` with each row's C highest logits computed again from the 16-bit rows,
        in h's dtype as a 16-bit head computes them (float32 sums, one rounding): on the
        Triton path in place, two kernels (`kernels.rescore_top`: the C highest of each
        run's few highest, where torch.topk took ~50 us, PERF.md v0.94)."""
        assert self.weight16 is not None
        if kernels.enabled(h):
            kernels.rescore_top(local, h, self.weight16, self.candidates)
            return local
        top = local.topk(min(self.candidates, local.shape[1]), dim=-1).indices  # [n, C]
        exact = torch.bmm(self.weight16[top], h[:, :, None])[..., 0]  # [n, C]
        return local.scatter(1, top, exact.float())


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def load(self, name: str, get: Callable[[Index], torch.Tensor], part: int | None) -> None:
        self.weight.data.copy_(get(slice(None)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s) * w, s) with s = x + residual (or x alone): the residual add of a
        decoder layer happens here, fused with the norm on the Triton path."""
        if kernels.enabled(x):
            y, s = kernels.rms_norm(x, self.weight, self.eps, residual)
            return y, x if s is None else s
        s = x if residual is None else x + residual  # in the model dtype, as the reference
        # float32 inside and the weight applied in the input dtype, as transformers does
        normed = F.rms_norm(s.float(), (s.shape[-1],), eps=self.eps)
        return self.weight * normed.to(s.dtype), s
