"""Tool calls in a model's output text: which format a chat template asks for, and a
streaming parser that splits the text into content and calls.

Formats, as the model families' chat templates define them:

- `hermes` (Hermes, Qwen2/2.5/3): each call is `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, anywhere in the reply, after or between content.
- `llama3` (Llama 3.1+ JSON tool calling): the whole reply is one JSON object
  `{"name": ..., "parameters": {...}}` (several joined by `;`), optionally after
  `<|python_tag|>`.
- `glm4` (GLM-4 chat): the reply starts with the function's name on its own line, then
  its arguments as a JSON object.
- `json`: tool_choice "required" or a named function, where decoding was constrained to
  JSON (`required_schema`, `named_schema`): the reply is that JSON.

Strict functions with tool_choice "auto" constrain the calls, not the text around them
(`auto_call_tag`).

`ToolCallParser.feed` takes each new piece of text and returns the content that can go out
now and the calls completed so far; text that may still become a call is held back (a
partial `<tool_call>` tag, a reply that opens with `{`). `finish` flushes. Text that
looked like a call but does not parse as one goes out as content: nothing is lost.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

FORMATS = ("hermes", "llama3", "glm4", "json")
# whitespace in a row inside a constrained call's arguments: indented JSON fits, a weak
# model looping on spaces does not (JSON responses allow none: replicas/structured.py)
CALL_WHITESPACE_MAX = 16
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: an id for the client's tool message, the function's name, and its
    arguments as JSON text (OpenAI's shape)."""

    id: str
    name: str
    arguments: str


def new_call(name: str, arguments: Any) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(f"call_{secrets.token_hex(12)}", name, text)


def detect_format(chat_template: str | None, family: str) -> str | None:
    """The tool-call format a chat template asks the model for (None: it renders no
    tools, so a request with tools is refused rather than sent to a template that drops
    them)."""
    if not chat_template or "tools" not in chat_template:
        return None
    if HERMES_OPEN in chat_template:
        return "hermes"
    if "python_tag" in chat_template or '"parameters"' in chat_template:
        return "llama3"
    if family == "glm" or "observation" in chat_template:
        return "glm4"
    return {"qwen2": "hermes", "qwen3": "hermes", "llama": "llama3"}.get(family)


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """tool_choice "required": a JSON array of one or more calls {"name", "parameters"},
    each naming one of `tools` with arguments matching its parameters' schema."""
    calls = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "parameters": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}),
            "items": {"anyOf": calls}}


def named_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A named tool_choice: the reply is the function's arguments."""
    return tool["function"].get("parameters") or {"type": "object"}


def auto_call_tag(fmt: str, tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """tool_choice "auto" with strict functions: xgrammar's structural tag that constrains
    the calls of format `fmt` and leaves the text free. A call must name one of `tools`
    and give arguments matching its schema (a strict function's parameters, closed as a
    json_schema response's are, replicas/structured.py `prepared`; any JSON object for
    the others), laid out as the format's templates show it:

    - hermes: text, and wherever `<tool_call>` opens, `<tool_call>` newline `{"name": ...,
      "arguments": ...}` newline `</tool_call>`; text again after it (no second call
      without `parallel`);
    - llama3: the whole reply is calls, `{"name": ..., "parameters": ...}` joined by "; "
      (one without `parallel`), or it is text that never writes `{"name"`;
    - glm4: the whole reply is one call, the name on a line of its own then the arguments,
      or it is text that never writes a tool's name followed by a newline.

    The raw control characters that JSON responses ban cannot be banned here (text and
    layouts hold newlines), so a length-bounded string in a call may hold one (xgrammar's
    issue #800): such a call does not parse and goes out as text."""
    from replicas.structured import prepared  # the engine's side only (imports torch)

    def arguments(function: dict[str, Any]) -> dict[str, Any]:
        schema = prepared(function.get("parameters") or {"type": "object"}) if function.get(
            "strict") else {"type": "object"}
        return {"type": "json_schema", "json_schema": schema,
                "max_whitespace_cnt": CALL_WHITESPACE_MAX}

    functions = [t["function"] for t in tools]
    if fmt == "hermes":
        tags = [{"type": "tag", "begin": f'{HERMES_OPEN}\n{{"name": {json.dumps(f["name"])}, '
                                         '"arguments": ',
                 "content": arguments(f), "end": "}\n" + HERMES_CLOSE} for f in functions]
        form = {"type": "triggered_tags", "triggers": [HERMES_OPEN], "tags": tags,
                "stop_after_first": not parallel}
    elif fmt == "llama3":
        tags = [{"type": "tag", "begin": f'{{"name": {json.dumps(f["name"])}, "parameters": ',
                 "content": arguments(f), "end": "}"} for f in functions]
        form = {"type": "or", "elements": [
            {"type": "tags_with_separator", "tags": tags, "separator": "; ",
             "at_least_one": True, "stop_after_first": not parallel},
            {"type": "any_text", "excludes": ['{"name"']}]}
    elif fmt == "glm4":
        calls = [{"type": "sequence", "elements": [
            {"type": "const_string", "value": f["name"] + "\n"}, arguments(f)]}
            for f in functions]
        form = {"type": "or", "elements": [
            *calls, {"type": "any_text", "excludes": [f["name"] + "\n" for f in functions]}]}
    else:
        raise ValueError(f"tool calls in the {fmt!r} format cannot be constrained under "
                         "tool_choice \"auto\"")
    return {"type": "structural_tag", "format": form}


class ToolCallParser:
    """Splits a streamed reply into content and tool calls, in format `fmt` (FORMATS).
    `names`: the request's functions (a glm4 reply is a call only when its first line is
    one); `forced`: json format, tool_choice named this function (the reply is its
    arguments); `parallel`: more than one call is allowed (else the first is kept)."""

    def __init__(self, fmt: str, names: list[str], forced: str | None = None,
                 parallel: bool = True) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"tool-call format {fmt!r}: use one of {FORMATS}")
        self.fmt, self.names, self.forced, self.parallel = fmt, names, forced, parallel
        self.buffer = ""  # text held back
        self.started = False  # some content went out (llama3/glm4/json: not a call)
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content that can go out now, and the calls this text completed."""
        self.buffer += text
        if self.fmt == "hermes":
            return self._hermes(final=False)
        return self._whole(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the reply: whatever was held back, as content or calls."""
        if self.fmt == "hermes":
            return self._hermes(final=True)
        return self._whole(final=True)

    def _keep(self, calls: list[ToolCall]) -> list[ToolCall]:
        if not self.parallel:
            calls = calls[: max(0, 1 - len(self.calls))]
        self.calls += calls
        return calls

    def _hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        out, calls = [], []
        while True:
            start = self.buffer.find(HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, HERMES_OPEN)
                out.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            end = self.buffer.find(HERMES_CLOSE, start)
            if end < 0 and not final:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            body = self.buffer[start + len(HERMES_OPEN): end if end >= 0 else None]
            call = _call_object(body, "arguments")
            out.append(self.buffer[:start])
            if call is None:  # not a call after all: the text goes out as it was
                out.append(self.buffer[start: end + len(HERMES_CLOSE) if end >= 0 else None])
            else:
                calls.append(call)
            self.buffer = self.buffer[end + len(HERMES_CLOSE):] if end >= 0 else ""
        return "".join(out), self._keep(calls)

    def _whole(self, final: bool) -> tuple[str, list[ToolCall]]:
        """llama3, glm4, json: a reply is either all calls or all content; it is held
        while it can still be a call."""
        if self.started:
            out, self.buffer = self.buffer, ""
            return out, []
        lead = self.buffer.lstrip()
        stripped = lead.removeprefix(PYTHON_TAG).lstrip()
        if not final:
            if PYTHON_TAG.startswith(lead):  # the tag may be arriving
                return "", []
            if stripped and not self._may_be_call(stripped):
                self.started = True
                out, self.buffer = self.buffer, ""
                return out, []
            return "", []
        calls = self._parse_whole(stripped)
        if calls is None:
            out, self.buffer = self.buffer, ""
            return out, []
        self.buffer = ""
        return "", self._keep(calls)

    def _may_be_call(self, text: str) -> bool:
        if self.fmt in ("llama3", "json"):
            return text[0] in "{["
        first = text.split("\n", 1)[0]  # glm4: a function's name, on a line of its own
        return any(n.startswith(first) if "\n" not in text else n == first
                   for n in self.names)

    def _parse_whole(self, text: str) -> list[ToolCall] | None:
        if self.fmt == "glm4":
            name, _, args = text.partition("\n")
            call = _json_object(args)
            return [new_call(name, call)] if name in self.names and call is not None else None
        if self.fmt == "json":
            return self._parse_forced(text)
        parts = _joined_objects(text)
        calls = [_call_object(part, "parameters") for part in parts or []]
        return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]

    def _parse_forced(self, text: str) -> list[ToolCall] | None:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.forced is not None:
            return [new_call(self.forced, value)] if isinstance(value, dict) else None
        if not isinstance(value, list) or not all(
                isinstance(v, dict) and v.get("name") in self.names for v in value):
            return None
        return [new_call(v["name"], v.get("parameters", {})) for v in value]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (held back: the tag may
    be arriving)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _joined_objects(text: str) -> list[str] | None:
    """The JSON texts of `text`, JSON values joined by ";" (Llama 3's parallel calls),
    found by parsing, so that a ";" inside a string does not split a call; None when
    `text` is not that."""
    decoder, parts, at = json.JSONDecoder(), [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return None
        parts.append(text[at:end])
        rest = text[end:].lstrip()
        if not rest:
            return parts
        if not rest.startswith(";"):
            return None
        at = len(text) - len(rest) + 1


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _call_object(text: str, arguments_key: str) -> ToolCall | None:
    """{"name": ..., <arguments_key> or "arguments": {...}} as a call, else None."""
    value = _json_object(text.strip())
    if value is None or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", {}))
    if not isinstance(arguments, (dict, str)):
        return None
    return new_call(value["name"], arguments)
