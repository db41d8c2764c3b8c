"""Structured outputs: decoding constrained by a grammar, with xgrammar.

Contract:
- `Grammars(tokenizer, vocab_size, eos_ids)` is one engine's: it wraps the tokenizer for
  xgrammar once (~1 s at a 150k vocabulary with its tokens' bytes listed, on the first
  constrained request) and keeps an LRU cache of compiled grammars, one per distinct
  `StructuredSpec`, bounded in count (CACHE_SIZE) and in bytes (CACHE_BYTES).
- `check(spec)` compiles (or finds) the spec's grammar; a schema or grammar the library
  refuses raises `GrammarError` (a ConfigError: the client's 400) with its message.
  Safe from any thread (the engine calls it in the caller's thread, before the request
  reaches the scheduler). Compiling precomputes, per grammar state, the tokens whose
  acceptance does not depend on the stack below it (~0.1 s for a typical schema):
  that is what keeps a mask cheap in every state (replicas/PERF.md, v0.23).
- JSON is compact (no free whitespace between tokens, "," and ":" as separators), so a
  weak model cannot loop on spaces.
- A json_schema object that lists `properties` and says nothing of others takes no
  others (`prepared`: "additionalProperties": false, as OpenAI's strict mode does): JSON
  Schema's own default lets a model add keys without end, which a weak model does (seen:
  a random model's extra key never closed). An object without `properties` stays open.
- A JSON constraint's mask never allows a token holding a raw control character
  (bytes 0x00-0x1f): compact JSON has none anywhere, and xgrammar 0.2.9 lets them into
  strings with `minLength`/`maxLength` (its issue #800). Such a string holds no escapes
  either (no quote or backslash: the same issue; its `pattern` path, which refuses both,
  compiles 10-15x slower).
- `constraint(spec)` gives a request its own matcher (`Constraint`).
- `fill(constraints)` writes each constraint's allowed next tokens as a packed bitmask
  into a host tensor [M, ceil(vocab / 32)] int32 (pinned on a GPU engine): bit t % 32 of
  word t // 32 is token t. xgrammar fills a row without the GIL. A batch is split over
  up to `threads` threads of a pool that lives as long as the Grammars only when that
  pays: each part gets FILL_ROWS_PER_THREAD rows or more and, by the rows' recent cost,
  FILL_PART_S of work or more (a mask costs 1 µs to ~1 ms by its state; handing a part
  to a thread costs 0.05-0.3 ms on the H200 host; xgrammar's own batch fill starts its
  threads on every call, ~0.5 ms even for one row: PERF.md v0.24). The engine calls it
  from its driver thread, while the device runs the step's forward; one fill at a time.
  `close()` stops the pool.
- `apply(logits, rows, bitmask)`: a copy of `logits` [N, vocab] whose rows[i] keep only
  the tokens bitmask[i] allows (the others -inf), on the logits' device.
- `Constraint.advance(token)` consumes a sampled token; True once the grammar is over
  (it accepts nothing but EOS, it took EOS, or it refused the token): the request then
  ends with "stop".
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from replicas.config import ConfigError, StructuredSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (one per distinct spec)
# and at most this many bytes of them (a typical schema compiles to ~1 MiB at a 150k
# vocabulary: its per-state token masks)
CACHE_BYTES = 512 << 20
FILL_THREADS_MAX = 8
# a part of a batch worth a pool thread: this many rows, and this much work by the rows'
# recent cost (see the module doc)
FILL_ROWS_PER_THREAD = 8
FILL_PART_S = 0.5e-3
# compact JSON: no free whitespace between tokens, so a weak model cannot loop on spaces
JSON_OPTIONS: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":"),
                                "strict_mode": False}  # `prepared` closes objects
# xgrammar's errors start with a time and its C++ source's path: not for a client
_ERROR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


class GrammarError(ConfigError):
    """A structured-output spec the grammar library cannot compile; says why."""


class Constraint:
    """One request's matcher: which tokens may come next, and whether it is over."""

    def __init__(self, matcher: Any, eos_bits: torch.Tensor, json: bool = False) -> None:
        self.matcher = matcher
        self.json = json  # a JSON kind: no raw control characters (see Grammars.fill)
        self.failed = False  # a token was refused: only EOS may follow
        self._eos_bits = eos_bits  # the packed bitmask of the EOS ids (Grammars')
        self._over = False

    def advance(self, token: int) -> bool:
        """Consume `token`; True once the grammar is over (see `over`)."""
        if not self.failed and not self.matcher.accept_token(token):
            log.warning("structured output: token %d refused by the grammar", token)
            self.failed = True
        self._over = self.failed or self.matcher.is_terminated() or (
            self.matcher.is_completed() and self._only_stop())
        return self._over

    @property
    def over(self) -> bool:
        """Nothing but EOS may follow (the grammar completed, took EOS, or refused)."""
        return self._over

    def _only_stop(self) -> bool:
        """The grammar is complete: does it allow anything but EOS next? (One mask, once
        per request: a grammar like `"a" | "ab"` is complete after "a" yet goes on.)"""
        mask = torch.empty((1, len(self._eos_bits)), dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(mask)
        return not bool((mask & ~self._eos_bits).any())


class Grammars:
    """One engine's compiled grammars and xgrammar tokenizer (see the module doc)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int],
                 pin: bool = False, cache_size: int = CACHE_SIZE,
                 cache_bytes: int = CACHE_BYTES, threads: int | None = None) -> None:
        import xgrammar

        self._lib = xgrammar
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.eos_ids = sorted(eos_ids)
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=self.eos_ids)
        control = re.compile(rb"[\x00-\x1f]")  # a raw control character
        self._json_bits = _packed([i for i, token in enumerate(info.decoded_vocab[:vocab_size])
                                   if not control.search(token)], self.words)
        self._eos_bits = _packed(self.eos_ids, self.words)
        # our own LRU keeps the compiled grammars: xgrammar's cache would hold them twice
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.threads = fill_threads() if threads is None else max(1, threads)
        # one single-threaded batch filler per part of a batch; the pool starts with the
        # first batch large enough to split
        self._fillers = [xgrammar.BatchGrammarMatcher(max_threads=1)
                         for _ in range(self.threads)]
        self._pool: ThreadPoolExecutor | None = None
        self.row_fill_s = 0.0  # a row's mask, recent mean (moving; the parts' own times)
        self._pin = pin
        self._cache: OrderedDict[StructuredSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self.cached_bytes = 0  # what the cached grammars hold
        self._lock = threading.Lock()

    def check(self, spec: StructuredSpec) -> None:
        """Compile `spec` into the cache, or raise GrammarError."""
        self._compiled(spec)

    def constraint(self, spec: StructuredSpec) -> Constraint:
        """A fresh matcher for one request."""
        return Constraint(self._lib.GrammarMatcher(self._compiled(spec)), self._eos_bits,
                          json=spec.kind in ("json_object", "json_schema"))

    def _compiled(self, spec: StructuredSpec) -> Any:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiled = self._compile(spec)
        with self._lock:
            if spec not in self._cache:
                self._cache[spec] = compiled
                self.cached_bytes += compiled.memory_size_bytes
            while len(self._cache) > 1 and (len(self._cache) > self._cache_size
                                            or self.cached_bytes > self._cache_bytes):
                self.cached_bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
        return compiled

    def _compile(self, spec: StructuredSpec) -> Any:
        """The spec compiled by xgrammar, or GrammarError with the library's reason."""
        compiler = self._compiler
        try:
            if spec.kind == "ebnf":
                return compiler.compile_grammar(spec.spec)
            if spec.kind == "structural_tag":
                return compiler.compile_structural_tag(spec.spec)
            schema = {"type": "object"} if spec.kind == "json_object" else prepared(
                json.loads(spec.spec))
            return compiler.compile_json_schema(json.dumps(schema), **JSON_OPTIONS)
        except (RuntimeError, ValueError, TypeError) as e:
            why = _ERROR_PREFIX.sub("", str(e).strip())
            raise GrammarError(f"cannot constrain the output to this {spec.kind}: "
                               f"{why}") from None

    def fill(self, constraints: list[Constraint]) -> torch.Tensor:
        """Bitmasks [M, words] int32 on the host of the constraints' next tokens."""
        n = len(constraints)
        host = torch.empty((n, self.words), dtype=torch.int32, pin_memory=self._pin)
        live = [i for i, c in enumerate(constraints) if not c.failed]
        if live:
            self._fill_live(constraints, live, host)
        json_rows = [i for i in live if constraints[i].json]
        if len(json_rows) == n:
            host.bitwise_and_(self._json_bits)
        else:
            for i in json_rows:
                host[i].bitwise_and_(self._json_bits)
        for i in (i for i, c in enumerate(constraints) if c.failed):  # let it end
            host[i] = self._eos_bits
        return host

    def _fill_live(self, constraints: list[Constraint], live: list[int],
                   host: torch.Tensor) -> None:
        """Fill rows `live` of `host`: in parts on the pool when that pays (module doc),
        and update the rows' recent mean cost."""
        parts = max(1, min(self.threads, len(live) // FILL_ROWS_PER_THREAD,
                           int(len(live) * self.row_fill_s / FILL_PART_S)))
        # rows dealt out in turn: a batch's slow states (long strings) come in runs
        chunks = [live[k::parts] for k in range(parts)]
        if parts > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, "tpserve-mask")
        pending = [self._pool.submit(self._fill_rows, self._fillers[k], constraints,
                                     chunk, host)
                   for k, chunk in enumerate(chunks[1:], 1)] if self._pool else []
        spent = self._fill_rows(self._fillers[0], constraints, chunks[0], host)
        spent += sum(part.result() for part in pending)
        self.row_fill_s += (spent / len(live) - self.row_fill_s) / 4

    @staticmethod
    def _fill_rows(filler: Any, constraints: list[Constraint], rows: list[int],
                   host: torch.Tensor) -> float:
        """Fill `rows` of `host` on this thread; the seconds it took."""
        start = time.perf_counter()
        filler.batch_fill_next_token_bitmask([constraints[i].matcher for i in rows], host,
                                             indices=rows)
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the fill threads (the pool, if it started); fill starts it again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor
              ) -> torch.Tensor:
        """logits [N, vocab] -> a copy where row rows[i] keeps only what bitmask[i]
        allows. The bits unpack on the device: [M, words] int32 viewed as bytes (little
        endian: token t is bit t % 8 of byte t // 8) -> [M, vocab] bool."""
        dev, (n, vocab) = logits.device, logits.shape
        words = bitmask.to(dev, non_blocking=True)  # [M, words]
        shifts = torch.arange(8, device=dev, dtype=torch.uint8)
        bits = (words.view(torch.uint8)[:, :, None] >> shifts) & 1  # [M, 4 * words, 8]
        banned = bits.view(len(rows), -1)[:, :vocab] == 0  # [M, vocab]
        if rows == list(range(n)):
            return logits.masked_fill(banned, float("-inf"))
        at = torch.tensor(rows).to(dev, non_blocking=True)
        out = logits.clone()
        out[at] = logits[at].masked_fill(banned, float("-inf"))
        return out


# the keywords whose values are schemas, or lists or maps of schemas
_SUBSCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def prepared(schema: Any) -> Any:
    """`schema` as xgrammar gets it (a new dict; input unchanged): "additionalProperties":
    false on every object schema that lists `properties` and does not say whether it
    takes others."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = prepared(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [prepared(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: prepared(s) for k, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = prepared(out["additionalProperties"])
    elif ("properties" in out and "additionalProperties" not in out
          and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


def fill_threads() -> int:
    """Threads that fill a batch's masks: half the host's cores (xgrammar's own default),
    at most FILL_THREADS_MAX (a many-core GPU host has the driver and the ranks to run)."""
    return max(1, min(FILL_THREADS_MAX, (os.cpu_count() or 2) // 2))


def _packed(ids: list[int], words: int) -> torch.Tensor:
    """A packed bitmask [words] int32 of the tokens `ids` (bit t % 32 of word t // 32 is
    token t)."""
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[ids] = 1
    # bit k's value in an int32 word (bit 31's is negative)
    weights = torch.tensor([1 << k for k in range(31)] + [-(1 << 31)], dtype=torch.int64)
    return (bits.view(words, 32) * weights).sum(1).to(torch.int32)
