"""The message between the router and an engine replica, typed.

The router sends one `Request`; the replica streams back `Delta`s, or an `ErrorEvent`
that ends the stream. On the way they are plain JSON-able dicts (`to_dict` / `from_dict`,
`encode` / `decode`), which is what travels through Serve's handle. Contract:

- `Request`: exactly one of `prompt` (text or token ids) and `messages` (chat turns,
  templated on the engine side, which holds the tokenizer); `params` are SamplingParams
  fields (replicas/config.py owns their defaults and checks them).
- `Delta`: what one engine step added; the first of a stream also carries `prompt_tokens`.
  `finish_reason` is set on the last one. With `params["logprobs"]`, each token comes with
  a `TokenLogprob` (its text, log-probability and the `top_logprobs` alternatives); with
  `echo`, the first delta also has the prompt's text and (with logprobs) its tokens'.
- `ErrorEvent`: the request failed with an HTTP `status` and an OpenAI error `type`.
  Errors are mapped to a status once, where the engine is called (cluster/requests.py);
  the router forwards the status. 503 means "another replica may serve it".
- `from_dict` / `decode` raise `WireError` (a ValueError) on a malformed message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RETRYABLE = 503  # the replica failed, not the request: a retry may go elsewhere


class WireError(ValueError):
    """A message that is not a well-formed Request, Delta or ErrorEvent."""


def _field(data: Any, name: str, kinds: type | tuple[type, ...], optional: bool = False
           ) -> Any:
    """data[name] if it is of `kinds` (a bool is not an int here), None if optional."""
    if not isinstance(data, dict):
        raise WireError(f"expected a JSON object, got {type(data).__name__}")
    value = data.get(name)
    if value is None and optional:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise WireError(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {value!r:.80}")
    return value


def _ints(name: str, value: list[Any]) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise WireError(f"{name}: expected a list of integers")
    return list(value)


@dataclass(frozen=True)
class Request:
    """One generation request, router -> engine."""

    params: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # [{"role", "content", ...}], oldest first
    request_id: str | None = None
    echo: bool = False  # the first delta also has the prompt's text (and logprobs)
    # chat with tools: {"tools": [OpenAI tool], "choice": "auto" | "required" |
    # {"type": "function", "function": {"name"}}, "parallel": bool}
    tools: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise WireError("a request has exactly one of prompt and messages")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"params": dict(self.params)}
        if self.prompt is not None:
            data["prompt"] = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        if self.messages is not None:
            data["messages"] = [dict(m) for m in self.messages]
        if self.request_id is not None:
            data["request_id"] = self.request_id
        if self.echo:
            data["echo"] = True
        if self.tools is not None:
            data["tools"] = self.tools
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Request:
        params = _field(data, "params", dict, optional=True) or {}
        prompt = _field(data, "prompt", (str, list), optional=True)
        if isinstance(prompt, list):
            prompt = _ints("prompt", prompt)
        messages = _field(data, "messages", list, optional=True)
        if messages is not None and not all(isinstance(m, dict) for m in messages):
            raise WireError("messages: expected a list of objects")
        request_id = _field(data, "request_id", str, optional=True)
        echo = bool(_field(data, "echo", bool, optional=True))
        tools = _field(data, "tools", dict, optional=True)
        if tools is not None and not isinstance(tools.get("tools"), list):
            raise WireError("tools: expected {\"tools\": [...], \"choice\", \"parallel\"}")
        return cls(dict(params), prompt, messages, request_id, echo, tools)


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made: its id, the function's name, its arguments (JSON)."""

    id: str
    name: str
    arguments: str

    def to_list(self) -> list[str]:
        return [self.id, self.name, self.arguments]

    @classmethod
    def from_list(cls, data: Any) -> ToolCall:
        if not (isinstance(data, list) and len(data) == 3
                and all(isinstance(v, str) for v in data)):
            raise WireError(f"a tool call is [id, name, arguments], got {data!r:.80}")
        return cls(*data)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's text and log-probability (None: the prompt's first token, which has
    none), and the most likely tokens at its position, most likely first."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] = field(default_factory=list)

    def to_list(self) -> list[Any]:
        return [self.token, self.logprob, [[t, p] for t, p in self.top]]

    @classmethod
    def from_list(cls, data: Any) -> TokenLogprob:
        if not (isinstance(data, list) and len(data) == 3 and isinstance(data[0], str)
                and (data[1] is None or isinstance(data[1], (int, float)))
                and isinstance(data[2], list)):
            raise WireError(f"a token logprob is [token, logprob, top], got {data!r:.80}")
        top = []
        for pair in data[2]:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], (int, float))):
                raise WireError(f"a top logprob is [token, logprob], got {pair!r:.80}")
            top.append((pair[0], float(pair[1])))
        return cls(data[0], None if data[1] is None else float(data[1]), top)


def _tool_calls(data: Any) -> list[ToolCall] | None:
    value = _field(data, "tool_calls", list, optional=True)
    return None if value is None else [ToolCall.from_list(v) for v in value]


def _logprobs(data: Any, name: str) -> list[TokenLogprob] | None:
    value = _field(data, name, list, optional=True)
    return None if value is None else [TokenLogprob.from_list(v) for v in value]


# the keys of a plain token's dict (Delta.from_dict's fast path)
_DELTA_KEYS = frozenset(("token_ids", "text", "finish_reason", "replica", "prompt_tokens"))


@dataclass(slots=True)
class Delta:
    """What one engine step added to a request's output, engine -> router. One is made
    and read per streamed token on each side, where the router's CPU is the stack's
    bottleneck: slots (not frozen: a frozen init costs ~0.5 us more), and a plain
    token's dict is read without the general checks (`from_dict`)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "tool_calls" on the last
    replica: str  # the Serve replica id that runs the request
    prompt_tokens: int | None = None  # on the first delta of a stream
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked
    # echo, on the first delta: the prompt's text, and its tokens' logprobs when asked
    prompt_text: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None  # calls completed in this delta

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"token_ids": list(self.token_ids), "text": self.text,
                                "finish_reason": self.finish_reason, "replica": self.replica}
        if self.prompt_tokens is not None:
            data["prompt_tokens"] = self.prompt_tokens
        if self.prompt_text is not None:
            data["prompt_text"] = self.prompt_text
        if self.logprobs is not None:
            data["logprobs"] = [t.to_list() for t in self.logprobs]
        if self.prompt_logprobs is not None:
            data["prompt_logprobs"] = [t.to_list() for t in self.prompt_logprobs]
        if self.tool_calls is not None:
            data["tool_calls"] = [t.to_list() for t in self.tool_calls]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Delta:
        if type(data) is dict and len(data) <= 5:  # a plain token's, maybe prompt_tokens
            ids, text, reason = data.get("token_ids"), data.get("text"), data.get(
                "finish_reason")
            replica, prompt = data.get("replica"), data.get("prompt_tokens")
            if (type(ids) is list and all(type(t) is int for t in ids) and type(text) is str
                    and (reason is None or type(reason) is str) and type(replica) is str
                    and (prompt is None or type(prompt) is int)
                    and all(k in _DELTA_KEYS for k in data)):
                return cls(ids, text, reason, replica, prompt)
        return cls(_ints("token_ids", _field(data, "token_ids", list)),
                   _field(data, "text", str), _field(data, "finish_reason", str, True),
                   _field(data, "replica", str), _field(data, "prompt_tokens", int, True),
                   _logprobs(data, "logprobs"), _field(data, "prompt_text", str, True),
                   _logprobs(data, "prompt_logprobs"), _tool_calls(data))


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; ends the stream. `status` is the HTTP status to answer."""

    status: int
    type: str  # OpenAI error type: invalid_request_error | replica_unavailable | ...
    message: str
    replica: str = ""  # "" when no replica took the request

    @property
    def retryable(self) -> bool:
        return self.status == RETRYABLE

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "type": self.type, "message": self.message},
                "replica": self.replica}

    @classmethod
    def from_dict(cls, data: Any) -> ErrorEvent:
        error = _field(data, "error", dict)
        status = _field(error, "status", int)
        if not 400 <= status <= 599:
            raise WireError(f"error status {status} is not an HTTP error status")
        return cls(status, _field(error, "type", str), _field(error, "message", str),
                   _field(data, "replica", str, optional=True) or "")


Item = Delta | ErrorEvent  # what an engine stream yields


def encode(item: Item) -> dict[str, Any]:
    """An engine stream's item as a plain dict."""
    return item.to_dict()


def decode(data: Any) -> Item:
    """An engine stream's item from a plain dict: an ErrorEvent when it has "error"."""
    if isinstance(data, dict) and "error" in data:
        return ErrorEvent.from_dict(data)
    return Delta.from_dict(data)
