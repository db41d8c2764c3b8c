"""Which FP8 scaling keeps W8A8 (FP8 tensor cores) closest to the 16-bit model (issue
20's accuracy bar and its 256-request target): `python -m replicas.w8a8_formats [--model
DIR | --seeds 0,1] [--steps N] [--out FILE] [--table JSONL]`.

At 256 decode rows GLM-4-9B's layers are compute-bound in bf16, so weight-only FP8 cannot
pass bf16 there; FP8 tensor cores can, but `quantization="fp8-w8a8"` (e4m3 activations
with a scale per token) misses the 98 % top-1 bar (PERF.md v0.30). This measures finer
scales, simulated in transformers (a Llama checkpoint) with replicas/accuracy.py's method
and checkpoint: every linear layer of the decoder (not the LM head) computes in float32
from its weight and its input as FP8 would hold them, and the logits are compared with
the plain bfloat16 model's (top-1 agreement, mean KL). Formats, each e4m3 with float32
scales of max|block| / 448 (`fp8.row_scales`, `fp8.saturated`):

- weights: `channel`, a scale per output row (what `quantize_rows` stores); `block128`,
  a scale per 128 x 128 block;
- inputs: `bfloat16` (weight-only: the weight widened to bf16 first, as
  `quantization="fp8"` computes); `token`, a scale per token (`fp8-w8a8` today);
  `group128` and `group32`, a scale per token and run of 128 (or 32) input columns; and
  `token` with one kind of projection's inputs left 16-bit (that projection computed
  weight-only), to find which inputs cost the most; `group128` and `group32` with qkv's
  left 16-bit (128 x 128 weight blocks with 1 x 128 input groups is what Hopper's
  block-wise `torch._scaled_mm` takes).

Beside them the float32 floor, and the engine's own `fp8` and `fp8-w8a8` measures
(`accuracy.measure`), also with `w8a8_weight_only="qkv_proj"` and with it and
`w8a8_group=32`, which the (`channel`, `bfloat16`), (`channel`, `token`), (`channel`,
`token, qkv 16-bit`) and (`channel`, `group32, qkv 16-bit`) rows should reproduce
(ENGINE_TWINS). The trained checkpoint is 256 wide (768 in the MLP): a row has 2
groups of 128 there against 32 in GLM-4-9B, so `group32` is nearer GLM's share of a row.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from replicas.accuracy import compare, measure
from replicas.fp8 import quantize_blocks, quantize_groups, widen_groups
from replicas.kv_formats import logits, scoring_engine, study_main, study_start


def e4m3_blocks(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] (float32) as e4m3 with a float32 scale per `rows` x `cols` block
    (fp8.quantize_blocks): (the e4m3 values, float32 [R, C]; each one's block's scale,
    float32 [R, C])."""
    q, scales = quantize_blocks(x, rows, cols)
    return q.float(), scales.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def groups_of(size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inputs [..., K] as e4m3 with a scale per token and run of `size` columns (None: the
    whole token; fp8.quantize_groups), widened back to float32."""
    def rounded(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return widen_groups(*quantize_groups(rows, size or rows.shape[1])).reshape(x.shape)
    return rounded


WEIGHTS: dict[str, Quantizer] = {"channel": lambda w: e4m3_blocks(w, 1, w.shape[1]),
                                 "block128": lambda w: e4m3_blocks(w, 128, 128)}
# an input format: its rounding (None: 16-bit, weight-only) and the layers (by the end of
# their name) whose inputs stay 16-bit (computed weight-only) all the same
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUTS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor] | None, tuple[str, ...]]] = {
    "bfloat16": (None, ()), "token": (groups_of(None), ()),
    "group128": (groups_of(128), ()), "group32": (groups_of(32), ()),
    "token, o_proj 16-bit": (groups_of(None), ("o_proj",)),
    "token, down_proj 16-bit": (groups_of(None), ("down_proj",)),
    "token, qkv 16-bit": (groups_of(None), ("q_proj", "k_proj", "v_proj")),
    "token, gate_up 16-bit": (groups_of(None), ("gate_proj", "up_proj")),
    "group128, qkv 16-bit": (groups_of(128), ("q_proj", "k_proj", "v_proj")),
    "group32, qkv 16-bit": (groups_of(32), ("q_proj", "k_proj", "v_proj")),
    # only gate_up's inputs in FP8 (55 % of a GLM-4-9B layer's matmul FLOPs), and pairs
    # on the way there (PERF.md v0.47)
    "token, qkv+o 16-bit": (groups_of(None), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "token, qkv+down 16-bit": (groups_of(None), ("q_proj", "k_proj", "v_proj", "down_proj")),
    "token, qkv+o+down 16-bit": (groups_of(None), ("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "down_proj"))}


# the engine's own modes, each beside the simulated input format it computes as
ENGINE_TWINS: tuple[tuple[dict[str, str], str], ...] = (
    ({"quantization": "fp8"}, "bfloat16"), ({"quantization": "fp8-w8a8"}, "token"),
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj"}, "token, qkv 16-bit"),
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj", "w8a8_group": 32},
     "group32, qkv 16-bit"),
    ({"quantization": "fp8-w8a8", "w8a8_weight_only": "qkv_proj,o_proj,down_proj"},
     "token, qkv+o+down 16-bit"))


# the projections the engine splits by input rows (replicas/parallel.py RowParallelLinear):
# their bias is added once, after the all-reduce, so after the product's rounding
ROW_PARALLEL = ("o_proj", "down_proj")


@contextmanager
def computed_as(model: Any, weights: Quantizer, inputs: str) -> Iterator[None]:
    """Inside: each linear layer of `model`'s decoder computes from its weight as
    `weights` quantizes it and its input in the format INPUTS[inputs], as fp8.fp8_linear
    computes off the Triton path: in float32 with the scales applied to the FP8 values
    (FP8 tensor cores accumulate so) with the bias, rounded once to the model's dtype
    (a row-parallel projection's bias after the rounding, as the engine adds it after
    its all-reduce); a 16-bit input (weight-only) meets the weight widened as w8.to(dtype) *
    scale.to(dtype) in one F.linear."""
    rounding, kept = INPUTS[inputs]
    layers = [(name, m) for name, m in model.model.layers.named_modules()
              if isinstance(m, torch.nn.Linear)]
    if not layers:
        raise ValueError(f"no linear layers in {type(model).__name__}'s decoder")
    saved = [layer.forward for _, layer in layers]

    def simulated(name: str, layer: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        q, scale = weights(layer.weight.detach().float())
        dtype = layer.weight.dtype
        rounds = None if name.endswith(kept) else rounding
        if rounds is None:  # weight-only: fp8_linear's F.linear on the widened weight
            widened = q.to(dtype) * scale.to(dtype)
            return lambda x: F.linear(x, widened, layer.bias)
        w = q * scale

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = rounds(x.float()) @ w.T
            if layer.bias is None:
                return y.to(x.dtype)
            if name.endswith(ROW_PARALLEL):  # (the engine's: after its all-reduce)
                return y.to(x.dtype) + layer.bias.to(x.dtype)
            return (y + layer.bias.float()).to(x.dtype)  # (in the matmul's epilogue)
        return forward

    for name, layer in layers:
        layer.forward = simulated(name, layer)
    try:
        yield
    finally:
        for (_, layer), forward in zip(layers, saved, strict=True):
            layer.forward = forward


def rows(model_dir: str, name: str, count: int = 16, length: int = 128
         ) -> list[dict[str, Any]]:
    """Every (weights, inputs) format, the float32 floor and the engine's checks, for one
    checkpoint (`name` goes into the rows)."""
    prompts, model, base, floor = study_start(model_dir, count, length)
    out = [{"weights": "float32", "inputs": "float32", **floor}]
    for w_name, w_fmt in WEIGHTS.items():
        for x_name in INPUTS:
            with computed_as(model, w_fmt, x_name):
                out.append({"weights": w_name, "inputs": x_name,
                            **compare(base, logits(model, prompts))})
    engine = scoring_engine(model_dir, length)
    for changes, inputs in ENGINE_TWINS:
        row = measure(engine, changes, prompts)
        shown = ", ".join(f"{k}={v}" for k, v in changes.items())
        out.append({"weights": "channel", "inputs": inputs, "note": f"the engine: {shown}",
                    **{key: row[key] for key in ("positions", "top1_agreement", "mean_kl")}})
    return [{"kind": "w8a8_format", "model": name, **r} for r in out]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table: a column per checkpoint, a line per (weights,
    inputs) format, the float32 floor first and the engine's own measures last; each
    cell the top-1 agreement (mean KL) with the bfloat16 model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["weights"] == "float32":
            what = "float32 vs bf16 (the floor)"
        elif r.get("note", "").startswith("the engine"):
            what = f"the engine: `{r['note'].removeprefix('the engine: ')}`"
        else:
            what = f"{r['weights']} | {r['inputs']}"
        lines.setdefault(what, {})[r["model"]] = (
            f"{r['top1_agreement'] * 100:.2f} % ({r['mean_kl']:.5f})")
    order = sorted(lines, key=lambda w: (not w.startswith("float32"), w.startswith("the")))
    out = ["| weights | inputs | " + " | ".join(models) + " |",
           "|---" * (len(models) + 2) + "|"]
    for what in order:
        first = what if " | " in what else f"{what} | "
        out.append(f"| {first} | " + " | ".join(lines[what].get(m, "—") for m in models)
                   + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    return study_main("python -m replicas.w8a8_formats", __doc__, rows, table, argv)


if __name__ == "__main__":
    sys.exit(main())
