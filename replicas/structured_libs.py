"""The first grammar-library comparison (install, import, compile, masks over one valid
instance): `python -m replicas.structured_libs --lib {xgrammar,llguidance,outlines-core}
[--tokenizer DIR] [--vocab 150000] [--out FILE]`. It chose llguidance; the masks in the
states a model's decoding reaches (replicas/grammar_replay.py) then chose xgrammar
(replicas/PERF.md, v0.23).

Run once per library, each in a clean virtual environment holding the CPU torch, the
project's transformers and tokenizers, and that one library (the project needs only the
chosen one). One JSON line per library: what its install added beyond torch, transformers,
tokenizers and numpy (sizes of the distributions, and whether any is a CUDA wheel), its
import time in a fresh process that has already imported torch and transformers (as the
engine has), the time to wrap the tokenizer, to compile a typical JSON schema and the
generic JSON grammar, the time to fill one request's token mask (a packed bitmask) per
token while a valid instance is fed through the matcher, and which JSON-schema features
it compiles. The tokenizer is a byte-level BPE trained here on local Python sources (the
standard library and transformers') to `--vocab` tokens: nothing comes from a hub.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from replicas.jsonlines import emit, spread

LIBS = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines_core"}
BASE = ("torch", "transformers", "tokenizers", "numpy")

# a typical response_format schema: nested object, enum, integer bounds, array of strings
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role", "tags", "address", "active", "score"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace, Countess of Lovelace (née Byron)", "age": 36,
            "role": "admin", "tags": ["mathematics", "analytical engine", "poetry", "notes"],
            "address": {"city": "London", "zip": "10115"}, "active": True, "score": 9.75}

# JSON-schema features, each alone: which a library compiles
FEATURES: dict[str, dict[str, Any]] = {
    "enum": {"enum": ["a", "b", 3]},
    "const": {"const": "x"},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "ref_defs": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                 "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}},
    "recursive_ref": {"$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"},
    "pattern": {"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"},
    "string_length": {"type": "string", "minLength": 2, "maxLength": 8},
    "format_date": {"type": "string", "format": "date"},
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                     "maxItems": 3},
    "number_bounds": {"type": "number", "minimum": 0.5, "exclusiveMaximum": 10},
    "nullable": {"type": ["string", "null"]},
    "additional_properties_schema": {"type": "object",
                                     "additionalProperties": {"type": "integer"}},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
}


def train_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE of `vocab` tokens trained on local sources, saved in HF format."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(transformers.__file__).parent]
    files = sorted(p for root in roots for p in root.rglob("*.py"))
    texts = (p.read_bytes().decode("utf-8", "replace") for p in files)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(folder))


def added_distributions(lib: str) -> dict[str, int]:
    """Distributions in this environment outside the closure of BASE's requirements
    (what installing `lib` added), with their installed size in bytes."""
    keep, todo = set(), list(BASE)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in keep:
            continue
        keep.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    sizes = {}
    for dist in md.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name not in keep and name not in ("pip", "uv", "setuptools", "wheel"):
            sizes[name] = sum(os.path.getsize(dist.locate_file(f)) for f in dist.files or []
                              if os.path.exists(dist.locate_file(f)))
    assert lib in sizes, f"{lib} is not installed here"
    return sizes


def import_seconds(module: str) -> float:
    """Import time of `module` in a fresh process that imported torch and transformers."""
    code = ("import time, torch, transformers; t = time.perf_counter(); import "
            f"{module}; print(time.perf_counter() - t)")
    runs = [float(subprocess.run([sys.executable, "-c", code], check=True, text=True,
                                 capture_output=True).stdout) for _ in range(3)]
    return min(runs)


class Lib:
    """One library behind a common face: wrap the tokenizer, compile, match, fill. Each
    fills `mask`, a packed bitmask [1, ceil(vocab / 32)] int32 (bit t % 32 of word t // 32
    is token t)."""

    name = ""
    mask: Any

    def __init__(self, hf: Any, vocab: int, eos: int) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any] | None) -> Any:  # None: any JSON value/object
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any) -> None:
        raise NotImplementedError

    def accept(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def allowed(self, token: int) -> bool:
        """Whether the last fill allowed `token`."""
        return bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)


class Xgrammar(Lib):
    name = "xgrammar"

    def __init__(self, hf: Any, vocab: int, eos: int) -> None:
        import torch
        import xgrammar as xgr

        self.x = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgr.allocate_token_bitmask(1, vocab)
        self.torch = torch

    def compile(self, schema: dict[str, Any] | None) -> Any:
        if schema is None:
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)

    def matcher(self, compiled: Any) -> Any:
        return self.x.GrammarMatcher(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.mask, 0)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class Llguidance(Lib):
    name = "llguidance"

    def __init__(self, hf: Any, vocab: int, eos: int) -> None:
        import llguidance
        import llguidance.hf
        import numpy as np

        # not llguidance.torch: its torch.compile'd helper costs ~3.8 s to import
        self.g = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos)
        self.mask = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        grammar = self.g.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"},
            defaults={"whitespace_flexible": True})
        error, messages = self.g.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer)
        if error:
            raise ValueError(messages[0])
        return grammar

    def matcher(self, compiled: Any) -> Any:
        matcher = self.g.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill(self, matcher: Any) -> None:
        matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, hf: Any, vocab: int, eos: int) -> None:
        import torch
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        self.Guide, self.Index, self.regex = Guide, Index, build_regex_from_schema
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        special = set(hf.all_special_ids)
        for text, token in hf.get_vocab().items():
            if token != eos and token not in special:
                tokens.setdefault(bytes(byte_of[c] for c in text), []).append(token)
        self.vocab = Vocabulary(eos, tokens)
        self.mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        if schema is None:
            raise ValueError("no generic JSON grammar: regular expressions only")
        return self.Index(self.regex(json.dumps(schema), r"[ ]?"), self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.Guide(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)

    def accept(self, matcher: Any, token: int) -> bool:
        if not matcher.is_finished():  # a finished guide allows only EOS, and ends there
            matcher.advance(token)
        return True


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character a ByteLevel vocabulary uses."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mask_times(lib: Lib, compiled: Any, tokens: list[int], eos: int, runs: int = 5
               ) -> dict[str, Any]:
    """Feed `tokens` then EOS through `runs` fresh matchers; per-token times in
    microseconds of filling the mask (the first fill of a matcher included) and of
    accepting the token."""
    fills: list[float] = []
    accepts: list[float] = []
    for _ in range(runs):
        _feed(lib, lib.matcher(compiled), [*tokens, eos], fills, accepts)
    fill = spread(fills)
    return {"tokens": len(fills), "fill_us_mean": fill["mean"], "fill_us_p50": fill["p50"],
            "fill_us_p99": fill["p99"], "fill_us_max": fill["max"],
            "accept_us_mean": round(statistics.mean(accepts), 1)}


def _feed(lib: Lib, matcher: Any, tokens: list[int], fills: list[float],
          accepts: list[float]) -> None:
    for token in tokens:
        _, fill = timed(lambda m=matcher: lib.fill(m))
        if not lib.allowed(token):
            raise AssertionError(f"{lib.name}: the mask refused token {token} of the instance")
        ok, accept = timed(lambda m=matcher, t=token: lib.accept(m, t))
        assert ok, f"{lib.name}: token {token} not accepted"
        fills.append(fill * 1e6)
        accepts.append(accept * 1e6)


def measure(lib_name: str, folder: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    module = LIBS[lib_name]
    sizes = added_distributions(lib_name)
    row: dict[str, Any] = {
        "case": "grammar_library", "lib": lib_name, "version": md.version(lib_name),
        "install_added_mb": round(sum(sizes.values()) / 2**20, 1),
        "install_added": {k: round(v / 2**20, 1) for k, v in sorted(sizes.items())},
        "cuda_wheels": sorted(k for k in sizes if re.match(r"nvidia-|.*-cu\d+$", k)),
        "import_s": round(import_seconds(module), 3),
    }
    importlib.import_module(module)
    hf = AutoTokenizer.from_pretrained(str(folder))
    vocab, eos = len(hf), hf.eos_token_id
    cls = {"xgrammar": Xgrammar, "llguidance": Llguidance, "outlines-core": OutlinesCore}
    lib, row["tokenizer_s"] = timed(lambda: cls[lib_name](hf, vocab, eos))
    row["vocab"] = vocab
    tokens = hf.encode(json.dumps(INSTANCE, ensure_ascii=False))
    compiled, row["schema_compile_s"] = timed(lambda: lib.compile(SCHEMA))
    row["schema_mask"] = mask_times(lib, compiled, tokens, eos)
    try:
        compiled, row["json_object_compile_s"] = timed(lambda: lib.compile(None))
        row["json_object_mask"] = mask_times(lib, compiled, tokens, eos)
    except Exception as e:  # noqa: BLE001 - recorded as unsupported
        row["json_object_error"] = str(e)[:200]
    row["features"] = {}
    for feature, schema in FEATURES.items():
        try:
            _, took = timed(lambda s=schema: lib.matcher(lib.compile(s)))
            row["features"][feature] = round(took, 3)
        except Exception as e:  # noqa: BLE001 - recorded as unsupported
            row["features"][feature] = "error: " + str(e)[:120]
    for key in ("tokenizer_s", "schema_compile_s", "json_object_compile_s"):
        if key in row:
            row[key] = round(row[key], 4)
    return row


def environment() -> dict[str, Any]:
    """As replicas.bench.environment (not imported: these environments lack the engine's
    other dependencies)."""
    import platform

    import torch
    import transformers

    return {
        "hardware": {"cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "gpu": None},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": " ".join(["python -m replicas.structured_libs",
                             *(os.path.basename(a) if os.sep in a else a for a in sys.argv[1:])]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", choices=sorted(LIBS), required=True)
    parser.add_argument("--tokenizer", default=None,
                        help="its folder (trained there once); default: in the tpserve cache")
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from replicas.tiny import cache_root

    folder = Path(args.tokenizer or cache_root() / f"bpe-{args.vocab}")
    if not (folder / "tokenizer.json").is_file():
        train_tokenizer(folder, args.vocab)
    emit({**measure(args.lib, folder), **environment()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
