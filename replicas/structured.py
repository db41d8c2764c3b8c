"""Structured outputs: decoding constrained by a grammar, with llguidance.

Contract:
- `Grammars(tokenizer, vocab_size, eos_ids)` is one engine's: it wraps the tokenizer for
  llguidance once (~0.9 s at a 150k vocabulary, on the first constrained request) and
  keeps a bounded LRU cache of compiled grammars, one per distinct `StructuredSpec`.
- `check(spec)` compiles (or finds) the spec's grammar; a schema or grammar the library
  refuses raises `GrammarError` (a ConfigError: the client's 400) with its message.
  Safe from any thread (the engine calls it in the caller's thread, before the request
  reaches the scheduler).
- A json_schema object that lists `properties` and says nothing of others takes no
  others (`closed`: "additionalProperties": false, as OpenAI's strict mode and
  xgrammar's default do): JSON Schema's own default lets a model add keys without end,
  which a weak model does (seen: a random model's extra key never closed). An object
  without `properties` stays open.
- `constraint(spec)` gives a request its own matcher (`Constraint`), a copy of the
  cached, already-built one.
- `fill(constraints)` writes each constraint's allowed next tokens as a packed bitmask
  into a host tensor [M, ceil(vocab / 32)] int32 (pinned on a GPU engine): bit t % 32 of
  word t // 32 is token t. llguidance fills the rows in parallel threads, without the
  GIL. The engine calls it while the device runs the step's forward.
- `apply(logits, rows, bitmask)`: a copy of `logits` [N, vocab] whose rows[i] keep only
  the tokens bitmask[i] allows (the others -inf), on the logits' device.
- `Constraint.advance(token)` consumes a sampled token; True once the grammar is over
  (it accepts nothing but EOS, or it took EOS): the request then ends with "stop".
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import torch

from replicas.config import ConfigError, StructuredSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (one per distinct spec)
# compact JSON: no free whitespace between tokens, so a weak model cannot loop on spaces
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ConfigError):
    """A structured-output spec the grammar library cannot compile; says why."""


class Constraint:
    """One request's matcher: which tokens may come next, and whether it is over."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Consume `token`; True once the grammar is over (see `over`)."""
        if not self.matcher.consume_token(token):
            log.warning("structured output: token %d refused: %s", token,
                        self.matcher.get_error())
        return self.over

    @property
    def over(self) -> bool:
        """Nothing but EOS may follow (the grammar completed, took EOS, or erred)."""
        return bool(self.matcher.is_stopped())


class Grammars:
    """One engine's compiled grammars and llguidance tokenizer (see the module doc)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int],
                 pin: bool = False, cache_size: int = CACHE_SIZE) -> None:
        import llguidance
        import llguidance.hf

        self._lib = llguidance
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.eos_ids = sorted(eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=self.eos_ids)
        self._executor = llguidance.LLExecutor()
        self._pin = pin
        self._cache: OrderedDict[StructuredSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def check(self, spec: StructuredSpec) -> None:
        """Compile `spec` into the cache, or raise GrammarError."""
        self._compiled(spec)

    def constraint(self, spec: StructuredSpec) -> Constraint:
        """A fresh matcher for one request."""
        compiled = self._compiled(spec)
        with self._lock:
            return Constraint(compiled.deep_copy())

    def _compiled(self, spec: StructuredSpec) -> Any:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        matcher = self._lib.LLMatcher(self.tokenizer, self._grammar(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"cannot constrain the output to this {spec.kind}: "
                               f"{matcher.get_error()}")
        with self._lock:
            self._cache[spec] = matcher
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def _grammar(self, spec: StructuredSpec) -> str:
        """The spec as llguidance's grammar text."""
        matcher = self._lib.LLMatcher
        if spec.kind == "lark":
            return matcher.grammar_from_lark(spec.spec)
        schema = {"type": "object"} if spec.kind == "json_object" else closed(
            json.loads(spec.spec))
        try:
            return matcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"bad JSON schema: {e}") from None

    def fill(self, constraints: list[Constraint]) -> torch.Tensor:
        """Bitmasks [M, words] int32 on the host of the constraints' next tokens."""
        n = len(constraints)
        host = torch.empty((n, self.words), dtype=torch.int32, pin_memory=self._pin)
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(constraints)], host.data_ptr(),
            self.words * 4, n)
        for i, c in enumerate(constraints):
            if c.matcher.is_error():  # its mask may be empty: let it end
                host[i].zero_()
                for eos in self.eos_ids:
                    host[i, eos // 32] |= _bit(eos % 32)
        return host

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


def closed(schema: Any) -> Any:
    """`schema` with "additionalProperties": false on every object schema that lists
    `properties` and does not say whether it takes others (a new dict; input unchanged)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(s) for k, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    elif ("properties" in out and "additionalProperties" not in out
          and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


def _bit(k: int) -> int:
    """Bit k of an int32 word, as a (signed) int32 value."""
    return -(1 << 31) if k == 31 else 1 << k
