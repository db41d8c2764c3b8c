"""Which 8-bit format keeps a KV cache closest to the 16-bit model (issue 20's accuracy
bar): `python -m replicas.kv_formats [--model DIR | --seeds 0,1] [--steps N] [--out FILE]`.

Simulated in transformers (a Llama checkpoint), with replicas/accuracy.py's method and
checkpoint: teacher-forced over held-out text, in bfloat16, each layer's keys (after
rotary) and/or values rounded as a cache of the format would store them, the logits
compared with the plain bfloat16 model's (top-1 agreement, mean KL). Formats:

- `e4m3`: FP8 with a scale of 1, saturated at +-448: what `kv_cache_dtype="fp8"` stores;
- `e4m3-row`: FP8 with a scale per (token, KV head), max|x| / 448;
- `int8-row`: int8 with a scale per (token, KV head), max|x| / 127, rounded half up:
  what `kv_cache_dtype="int8"` stores (`kv_cache.int8_rows`).

A row scale is float32, as the int8 cache keeps it: (head_dim + 4) bytes a (token, head)
against 2 * head_dim at 16 bits (0.516 of the bytes at head_dim 128).

Beside them, two reference rows: float32 against bfloat16 (how many top-1 tokens 16-bit
rounding alone flips: the measure's floor), and the engine's own `kv_cache_dtype="fp8"`
and `"int8"` measures (`accuracy.measure`), which the simulated `e4m3` and `int8-row`
rows should reproduce; then the engine's FP8 weights with a 16-bit cache and with each
8-bit one (the bar's two cases).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from replicas import EngineConfig
from replicas.accuracy import (
    TRAIN_STEPS,
    TRAINED_VERSION,
    compare,
    held_out,
    measure,
    trained_model_dir,
)
from replicas.fp8 import quantize_rows, saturated
from replicas.jsonlines import emit
from replicas.kv_cache import from_int8_rows, int8_rows

Rounding = Callable[[torch.Tensor], torch.Tensor]


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x through FP8 e4m3 at scale 1, saturated as the FP8 cache writes it
    (fp8.saturated), back in x's dtype."""
    return saturated(x).to(x.dtype)


def e4m3_row(x: torch.Tensor) -> torch.Tensor:
    """x through FP8 e4m3 with a float32 scale per row of the last dim (fp8.quantize_rows,
    FP8 weights' rounding)."""
    rows, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    return (rows.float() * scale[:, None]).reshape(x.shape).to(x.dtype)


def int8_row(x: torch.Tensor) -> torch.Tensor:
    """x through the int8 cache's rounding, widened back as the engine reads it
    (kv_cache.int8_rows, from_int8_rows)."""
    return from_int8_rows(*int8_rows(x), x.dtype)


FORMATS: dict[str, Rounding] = {"e4m3": e4m3, "e4m3-row": e4m3_row, "int8-row": int8_row}


@contextmanager
def cached_as(model: Any, keys: Rounding | None, values: Rounding | None) -> Iterator[None]:
    """Inside: `model` (transformers' Llama) reads its keys and values as a cache of
    these roundings would hold them (None: 16-bit, as computed)."""
    from transformers.models.llama import modeling_llama

    if not isinstance(model, modeling_llama.LlamaForCausalLM):
        raise ValueError(f"the KV-format simulation needs a Llama checkpoint, not "
                         f"{type(model).__name__}")
    rotary = modeling_llama.apply_rotary_pos_emb
    config = model.config
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)

    def rotated(q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = rotary(q, k, *args, **kwargs)  # k: [batch, kv heads, tokens, head_dim]
        return q, keys(k) if keys is not None else k

    def stored(_module: Any, _args: Any, v: torch.Tensor) -> torch.Tensor:
        assert values is not None
        return values(v.unflatten(-1, (-1, head_dim))).flatten(-2)  # a row per KV head

    hooks = ([layer.self_attn.v_proj.register_forward_hook(stored)
              for layer in model.model.layers] if values is not None else [])
    modeling_llama.apply_rotary_pos_emb = rotated
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary
        for hook in hooks:
            hook.remove()


def logits(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's logits at every position, float32 ([len, vocab] each)."""
    with torch.no_grad():
        out = model(torch.tensor(prompts)).logits.float()
    return list(out)


def study_start(model_dir: str, count: int, length: int
                ) -> tuple[list[list[int]], Any, list[torch.Tensor], dict[str, Any]]:
    """What a study of the checkpoint at `model_dir` starts from: `count` held-out
    prompts of `length` tokens, the model in bfloat16 (transformers), its logits on them,
    and the floor row (the model in float32 against it)."""
    import transformers

    prompts = held_out(model_dir, count, length)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                              dtype=torch.bfloat16).eval()
    base = logits(model, prompts)
    exact = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return prompts, model, base, {
        "note": "the model in float32 against bfloat16: how many top-1 tokens 16-bit "
        "rounding alone flips (the floor)", **compare(base, logits(exact.eval(), prompts))}


def scoring_engine(model_dir: str, length: int) -> EngineConfig:
    """The engine config a study measures the engine's own formats with. (Scoring runs
    prefill steps only: a GPU engine needs no decode graphs or GEMV tuning for it, which
    would cost each engine seconds to start.)"""
    return EngineConfig(model=model_dir, dtype="bfloat16", max_model_len=length * 2,
                        max_num_batched_tokens=64, cuda_graphs=False, gemv_kernels=False)


def rows(model_dir: str, name: str, count: int = 16, length: int = 128
         ) -> list[dict[str, Any]]:
    """Every format on keys, values and both, the float32 floor and the engine's check,
    for one checkpoint (`name` goes into the rows)."""
    prompts, model, base, floor = study_start(model_dir, count, length)
    out = [{"k": "float32", "v": "float32", **floor}]
    for fmt in FORMATS:
        for k, v in ((fmt, "bfloat16"), ("bfloat16", fmt), (fmt, fmt)):
            with cached_as(model, FORMATS.get(k), FORMATS.get(v)):
                out.append({"k": k, "v": v, **compare(base, logits(model, prompts))})
    engine = scoring_engine(model_dir, length)
    for weights, kv in (("none", "fp8"), ("none", "int8"), ("fp8", "auto"), ("fp8", "fp8"),
                        ("fp8", "int8")):
        row = measure(engine, {"quantization": weights, "kv_cache_dtype": kv}, prompts)
        fmt = {"int8": "int8-row", "fp8": "e4m3"}.get(kv, "bfloat16")
        out.append({"k": fmt, "v": fmt, "note": f"the engine: quantization={weights}, "
                    f"kv_cache_dtype={kv}", **{
                        key: row[key] for key in ("positions", "top1_agreement", "mean_kl")}})
    return [{"kind": "kv_format", "model": name, **r} for r in out]


# the README table's columns: a row's (k format, how it was measured) -> heading
COLUMNS = {("float32", "floor"): "float32 vs bf16 (the floor)",
           ("e4m3", "none"): "e4m3 KV (`fp8`)",
           ("e4m3-row", "simulated"): "e4m3, a scale per row",
           ("int8-row", "none"): "int8 KV (`int8`)",
           ("bfloat16", "fp8"): "FP8 weights",
           ("e4m3", "fp8"): "FP8 weights + e4m3 KV",
           ("int8-row", "fp8"): "FP8 weights + int8 KV"}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, a line per checkpoint: top-1 agreement (KL) with the
    bfloat16 model, keys and values both in each format (the engine's cache where it has
    one, else the simulation), and the engine with FP8 weights and each cache (the
    accuracy bar's cases)."""
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        note = r.get("note", "")
        how = (note.split("quantization=")[1].split(",")[0] if note.startswith("the engine")
               else "floor" if r["k"] == "float32" else "simulated")
        heading = COLUMNS.get((r["k"], how)) if r["k"] == r["v"] else None
        if heading is not None:
            cells.setdefault(r["model"], {})[heading] = (
                f"{r['top1_agreement'] * 100:.2f} % ({r['mean_kl']:.5f})")
    headings = list(COLUMNS.values())
    out = ["| checkpoint | " + " | ".join(headings) + " |",
           "|---" * (len(headings) + 1) + "|"]
    for model, row in cells.items():
        out.append(f"| {model} | " + " | ".join(row.get(h, "—") for h in headings) + " |")
    return "\n".join(out)


Study = Callable[[str, str], list[dict[str, Any]]]


def study_main(prog: str, doc: str | None, study: Study,
               table: Callable[[list[dict[str, Any]]], str], argv: list[str] | None) -> int:
    """The command line of an accuracy study of the trained checkpoints (this module's,
    replicas/w8a8_formats.py's): `study(model_dir, name)`'s rows for `--model DIR` or
    each of `--seeds` at `--steps`, to stdout and `--out`; or `--table JSONL`."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("--model", help="a Llama checkpoint directory (default: the "
                        "trained one of replicas/accuracy.py)")
    parser.add_argument("--seeds", default="0", help="trained checkpoints of these seeds")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--out", help="append the JSON lines here")
    parser.add_argument("--table", metavar="JSONL", help="print the rows of JSONL as the "
                        "README's markdown table, and measure nothing")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    if args.model:
        checkpoints = [(args.model, args.model)]
    else:
        checkpoints = [(trained_model_dir(seed, args.steps),
                        f"{TRAINED_VERSION} seed {seed}, {args.steps} steps")
                       for seed in (int(s) for s in args.seeds.split(","))]
    for model_dir, name in checkpoints:
        for row in study(model_dir, name):
            emit(row, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main("python -m replicas.kv_formats", __doc__, rows, table, argv)


if __name__ == "__main__":
    sys.exit(main())
