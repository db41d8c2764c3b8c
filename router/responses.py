"""The OpenAI response bodies: whole completions, stream chunks, usage and logprobs.

A request has one or more choices (`n`, and on /v1/completions a list of prompts: choice
index = prompt index * n + j). Each `Choice` gathers the wire deltas its engine stream
sent; the functions here shape them as OpenAI's chat and completions responses.

Logprobs are OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
top_logprobs}]}`, and completions' `{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`, where `text_offset` counts characters into the choice's returned text
(the prompt's too, with echo). A token's text is the engine's decoding of that one token,
and `bytes` its UTF-8: a token holding part of a character reads as U+FFFD.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from router import wire


@dataclass
class Choice:
    """One choice of a request: its engine request, and what came back so far."""

    index: int
    request: wire.Request
    prompt_text: str | None = None  # echo: the prompt as the client sent it, if text
    logprobs: bool = False  # the request asked for them (set from `request`)
    deltas: list[wire.Delta] = field(default_factory=list)
    offset: int = 0  # characters of this choice's text sent so far (text_offset)
    calls: int = 0  # tool calls sent so far (a stream's tool_calls index)
    stream: Any = None  # the engine stream (AsyncGenerator[wire.Item, None])

    def __post_init__(self) -> None:
        self.logprobs = "logprobs" in self.request.params

    @property
    def echo(self) -> bool:
        return self.request.echo

    def echoed(self) -> str:
        """The prompt's text as returned with echo ("" without echo)."""
        if not self.echo:
            return ""
        if self.prompt_text is not None:
            return self.prompt_text
        return (self.deltas[0].prompt_text or "") if self.deltas else ""


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(tokens: list[wire.TokenLogprob]) -> dict[str, Any]:
    return {"content": [{**_entry(t.token, t.logprob),
                         "top_logprobs": [_entry(a, p) for a, p in t.top]} for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: list[wire.TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
            "text_offset": offsets}


def _delta_logprobs(choice: Choice, delta: wire.Delta, first: bool) -> list[wire.TokenLogprob]:
    """The token logprobs a delta adds to its choice: with echo, the prompt's first."""
    head = (delta.prompt_logprobs or []) if first and choice.echo else []
    return head + (delta.logprobs or [])


def _logprobs(route: str, choice: Choice, tokens: list[wire.TokenLogprob]) -> Any:
    if not choice.logprobs:
        return None
    if route == "chat":
        return chat_logprobs(tokens)
    shaped = completion_logprobs(tokens, choice.offset)
    choice.offset += sum(len(t.token) for t in tokens)
    return shaped


def _call(call: wire.ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def message(choice: Choice) -> dict[str, Any]:
    """A chat choice's whole message: its content (None when it is only tool calls) and
    its tool calls."""
    text = "".join(d.text for d in choice.deltas)
    calls = [_call(c) for d in choice.deltas for c in d.tool_calls or []]
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _chat_delta(choice: Choice, delta: wire.Delta, first: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant"} if first else {}
    if delta.text or not delta.tool_calls:
        out["content"] = delta.text
    if delta.tool_calls:
        out["tool_calls"] = [{"index": choice.calls + k, **_call(c)}
                             for k, c in enumerate(delta.tool_calls)]
        choice.calls += len(delta.tool_calls)
    return out


def _head(cid: str, kind: str, model: str) -> dict[str, Any]:
    return {"id": cid, "object": kind, "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def whole(route: str, cid: str, model: str, choices: list[Choice], token_ids: bool,
          counted: dict[str, int]) -> dict[str, Any]:
    """A whole (not streamed) response: every choice's text, finish reason, logprobs."""
    out = []
    for choice in sorted(choices, key=lambda c: c.index):
        tokens = [t for i, d in enumerate(choice.deltas)
                  for t in _delta_logprobs(choice, d, i == 0)]
        shaped: dict[str, Any] = {"index": choice.index,
                                  "finish_reason": choice.deltas[-1].finish_reason,
                                  "logprobs": _logprobs(route, choice, tokens)}
        if route == "chat":
            shaped["message"] = message(choice)
        else:
            shaped["text"] = choice.echoed() + "".join(d.text for d in choice.deltas)
        if token_ids:
            shaped["token_ids"] = [t for d in choice.deltas for t in d.token_ids]
        out.append(shaped)
    kind = "chat.completion" if route == "chat" else "text_completion"
    return {**_head(cid, kind, model), "choices": out, "usage": counted}


def chunk(route: str, cid: str, model: str, choice: Choice, delta: wire.Delta, first: bool,
          token_ids: bool) -> dict[str, Any]:
    """One stream chunk: what `delta` adds to `choice` (`first`: its first delta). The
    router's CPU per streamed token (it was the GPU stack's bottleneck): the plain case
    builds one dict of each kind and nothing else."""
    shaped: dict[str, Any] = {"index": choice.index, "finish_reason": delta.finish_reason,
                              "logprobs": _logprobs(route, choice, _delta_logprobs(
                                  choice, delta, first)) if choice.logprobs else None}
    if route == "chat":
        shaped["delta"] = (_chat_delta(choice, delta, first) if first or delta.tool_calls
                           else {"content": delta.text})
        kind = "chat.completion.chunk"
    else:
        shaped["text"] = (choice.echoed() if first else "") + delta.text
        kind = "text_completion"
    if token_ids:
        shaped["token_ids"] = list(delta.token_ids)
    return {"id": cid, "object": kind, "created": int(time.time()), "model": model,
            "choices": [shaped]}


def plain_event(route: str, cid: str, model: str, choice: Choice, delta: wire.Delta) -> str:
    """The server-sent event of `chunk` for a plain token (not a choice's first, no
    logprobs, tool calls or token ids), the same bytes formatted directly: json.dumps of
    the chunk's dict costs ~2.2 us, this ~0.4 (the router's CPU per streamed token)."""
    kind, field = (("chat.completion.chunk", '"delta": {"content": %s}') if route == "chat"
                   else ("text_completion", '"text": %s'))
    reason = "null" if delta.finish_reason is None else json.dumps(delta.finish_reason)
    body = field % json.dumps(delta.text)
    return (f'data: {{"id": {json.dumps(cid)}, "object": "{kind}", "created": '
            f'{int(time.time())}, "model": {json.dumps(model)}, "choices": [{{"index": '
            f'{choice.index}, "finish_reason": {reason}, "logprobs": null, {body}}}]}}\n\n')


def usage_chunk(route: str, cid: str, model: str, counted: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage: no choices, the usage."""
    kind = "chat.completion.chunk" if route == "chat" else "text_completion"
    return {**_head(cid, kind, model), "choices": [], "usage": counted}
