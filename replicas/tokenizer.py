"""The model's tokenizer and chat template (through transformers), and incremental
detokenization that never emits half a character."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the tokenizer class AutoTokenizer would take from tokenizer_config.json and that is
# loaded here by name: transformers' generic fast tokenizer (a tokenizer.json), which
# imports no model config and so no torch (AutoTokenizer's model configs import torch:
# ~5 s of CPU before the engine replica's child could start)
GENERIC_FAST = "PreTrainedTokenizerFast"


def load_hf_tokenizer(model_dir: str) -> Any:
    """transformers' tokenizer of `model_dir`, as AutoTokenizer.from_pretrained gives it:
    the generic fast tokenizer directly when tokenizer_config.json names it (the class
    AutoTokenizer takes from there), else AutoTokenizer's own choice."""
    try:
        named = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()
                           ).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        named = None
    if named == GENERIC_FAST:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class Tokenizer:
    """Encode, decode and chat-format for one model directory."""

    def __init__(self, model_dir: str) -> None:
        self.hf = load_hf_tokenizer(model_dir)
        # the Rust tokenizer directly: transformers' decode spends ~45 us per call
        # converting arguments, which at 256 sequences is 10+ ms of every decode step
        # (unless the tokenizer asks for transformers' clean-up pass, which it keeps)
        backend = getattr(self.hf, "backend_tokenizer", None)
        plain = not getattr(self.hf, "clean_up_tokenization_spaces", False)
        self._backend_decode = backend.decode if backend is not None and plain else None

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def decode(self, ids: list[int]) -> str:
        if self._backend_decode is None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self._backend_decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of `messages` rendered with the model's template, ready to generate;
        `tools` (OpenAI tool objects) go to the template too."""
        out = self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                          tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def warm(self) -> None:
        """Render and encode a one-message chat, once, at start: the template's first use
        compiles it (jinja), ~10 ms that a first request would otherwise wait for. A
        template that refuses this message is left for the requests to report."""
        self.decode(self.encode("warm"))
        if self.chat_template is not None:
            try:
                self.apply_chat_template([{"role": "user", "content": "warm"}])
            except Exception:  # noqa: BLE001 - (the template's own rules: a request's 400)
                pass

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return template if isinstance(template, str) or template is None else str(template)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id


class IncrementalDecoder:
    """Text of a growing token list, delivered as deltas.

    Each push decodes a short window (prefix_offset..): the new text is what the window
    adds to its decoded prefix (prefix_offset..read_offset), which is kept from the push
    before, so that a push costs one decode. The window starts over at the last read
    token once it holds more than `WINDOW` tokens (one more decode then). Text ending
    in U+FFFD is held back: a multi-byte character is still incomplete.
    Tokens that add no text at all (skipped special tokens, ids the tokenizer does not
    know) would grow the window without end, and each step's cost with it: once
    `LONG` tokens have added nothing, they count as read, and the window keeps the last
    `CONTEXT` of them (so that the next token decodes after some text, as it would).
    """

    WINDOW, LONG, CONTEXT = 4, 16, 4

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix = ""  # the decoded text of ids[prefix_offset:read_offset]

    def push(self, token_id: int) -> str:
        ids, decode = self.ids, self.tokenizer.decode
        ids.append(token_id)
        full = decode(ids[self.prefix_offset :])
        if full.endswith("\ufffd"):  # a character's bytes still to come
            return ""
        prefix = self._prefix
        if len(full) <= len(prefix):
            if full == prefix and len(ids) - self.read_offset > self.LONG:
                self._restart(len(ids) - self.CONTEXT, len(ids))
            return ""
        if len(ids) - self.prefix_offset > self.WINDOW:
            self._restart(self.read_offset, len(ids))
        else:
            self.read_offset, self._prefix = len(ids), full
        return full[len(prefix) :]

    def _restart(self, prefix_offset: int, read_offset: int) -> None:
        self.prefix_offset, self.read_offset = prefix_offset, read_offset
        self._prefix = self.tokenizer.decode(self.ids[prefix_offset:read_offset])
