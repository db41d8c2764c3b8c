"""The OpenAI request bodies the router reads, and what it does with each of their fields.

Contract: every field of OpenAI's chat and completions requests (as the official client
defines them) is either honoured or refused with a 400 that names it; nothing is dropped
without a word. `FIELDS` says which, and why, per route; the README's table is made from
it (`python -m router.schema`). A refused field is accepted only when absent, null, or set
to the value that means what tpserve does anyway (`store: false`, `modalities: ["text"]`,
...). A field OpenAI does not define is a 400 too ("unknown parameter"), except tpserve's
own extensions (`EXTENSIONS`).

`CompletionBody` / `ChatBody` validate a body (pydantic, strict types: "5" is not 5);
`engine_params` turns one into the engine's SamplingParams fields (replicas/config.py
owns their defaults and checks them again).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOKENS_CAP = 1 << 20
MAX_N = 16  # choices per request (n, and prompts x n on /v1/completions)
MAX_PROMPTS = 64  # prompts in one /v1/completions list
MAX_CHOICES = 128  # prompts x n: engine requests one HTTP request may start
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4

# Fields refused unless absent, null, or one of these values (the ones that mean what
# tpserve does anyway), with the reason a user reads in the 400.
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "audio": ((), "tpserve serves text-only models"),
    "modalities": ((["text"],), "tpserve serves text-only models: only [\"text\"]"),
    "prediction": ((), "predicted outputs (speculative decoding) are not supported"),
    "web_search_options": ((), "tpserve has no web search"),
    "reasoning_effort": ((), "no reasoning-effort control for these models"),
    "verbosity": ((), "no verbosity control for these models"),
    "moderation": ((), "tpserve runs no moderation model"),
    "functions": ((), "deprecated by OpenAI: send `tools`"),
    "function_call": ((), "deprecated by OpenAI: send `tool_choice`"),
    "store": ((False,), "tpserve stores no completions (sessions: X-Session-ID)"),
    "metadata": ((), "tpserve stores no completions to attach metadata to"),
    "service_tier": (("auto", "default"), "one service tier: \"auto\" or \"default\""),
    "prompt_cache_retention": ((), "the prefix cache keeps blocks while memory allows; "
                               "no retention control"),
    "prompt_cache_options": ((), "no prefix-cache options"),
    "safety_identifier": ((), "tpserve runs no abuse detection; to pin a client to a "
                          "replica send `user` or X-Session-ID"),
    "suffix": ((), "insertion (text after the completion) is not supported"),
}

# tpserve's own fields, beyond OpenAI's
EXTENSIONS = {
    "top_k": "sample among the k most likely tokens (0: off)",
    "ignore_eos": "generate exactly the token limit",
    "return_token_ids": "each choice also lists its token ids",
    "session": "chat: {\"append\": true} prepends the stored history of the X-Session-ID",
}

# How each OpenAI field is honoured (the README's table; refused ones come from REFUSED)
HONOURED: dict[str, str] = {
    "model": "must be the served model's id (else 404)",
    "messages": "roles system, developer (given to the template as system), user, "
                "assistant (with tool_calls, content null), tool; content a string or "
                "text parts (other part types: 400)",
    "prompt": f"a string, token ids, or a list of up to {MAX_PROMPTS} of either (one "
              f"choice per prompt and n, at most {MAX_CHOICES} in all)",
    "max_tokens": "the completion's token limit; absent, generation may run to the end "
                  "of the context (as vLLM; OpenAI's completions stop at 16)",
    "max_completion_tokens": "the completion's token limit (wins over max_tokens)",
    "temperature": "0 is greedy", "top_p": "nucleus sampling",
    "n": f"independent choices, 1..{MAX_N} (seed s: choice i uses s + i)",
    "best_of": "only equal to n (no server-side ranking)",
    "seed": "same seed, prompt and parameters: same tokens",
    "stop": f"up to {MAX_STOP} strings; not included in the text",
    "stream": "server-sent events ending in `data: [DONE]`",
    "stream_options": "include_usage (a last chunk with usage); include_obfuscation "
                      "only false",
    "user": "the session key a client is pinned by, when no X-Session-ID",
    "prompt_cache_key": "the session key (pinned to one replica, whose prefix cache "
                        "holds the prompt) when no X-Session-ID; before `user`",
    "presence_penalty": "-2..2, over the tokens generated so far",
    "frequency_penalty": "-2..2, over the tokens generated so far",
    "logit_bias": "token id -> bias in -100..100, added to the logits",
    "logprobs": "chat: true/false; completions: 0..20 alternatives per token",
    "top_logprobs": f"chat: 0..{MAX_TOP_LOGPROBS} alternatives per token (needs logprobs)",
    "echo": "completions: the prompt is returned before the completion, with its "
            "tokens' logprobs when logprobs is set",
    "tools": "functions given to the model's chat template (a template that renders no "
             "tools: 400); calls parsed from the reply in the template's format (Hermes/"
             "Qwen `<tool_call>`, Llama 3 JSON, GLM-4)",
    "tool_choice": "none (the template gets no tools), auto (the model decides; with "
                   "strict functions its calls, not its text, are constrained to their "
                   "schemas), required or a named function (decoding constrained to a "
                   "valid call)",
    "parallel_tool_calls": "false: at most one call",
    "response_format": "text, json_object (any JSON object) or json_schema: decoding "
                       "constrained by xgrammar, always strictly (`strict` is implied; "
                       "an object listing `properties` takes no others unless its "
                       "additionalProperties says so); compact JSON, no free whitespace; "
                       "a string with minLength/maxLength holds no escapes (no quote, "
                       "backslash or control character: xgrammar 0.2.9)",
}


def field_status(route: str) -> list[tuple[str, str, str]]:
    """(field, "honoured" | "refused" | "extension", how or why) for a route's fields."""
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    params = chat if route == "chat" else completions
    rows = []
    for name in sorted(params.CompletionCreateParamsBase.__annotations__) + ["stream"]:
        if name in REFUSED:
            allowed, why = REFUSED[name]
            ok = ", ".join(json.dumps(v) for v in allowed)
            rows.append((name, "refused", why + (f" (accepted: {ok})" if ok else "")))
        else:
            rows.append((name, "honoured", HONOURED.get(name, "?")))
    rows += [(name, "extension", how) for name, how in EXTENSIONS.items()
             if route == "chat" or name != "session"]
    return rows


class ParamError(ValueError):
    """A body field that is refused or unknown; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def check_extra(extra: dict[str, Any] | None) -> None:
    """Refuse each field of a body that no model field took: an OpenAI field tpserve does
    not honour (unless null or a harmless value), or one OpenAI does not define."""
    for name, value in (extra or {}).items():
        if name in REFUSED:
            allowed, why = REFUSED[name]
            if value is None or any(value == v and type(value) is type(v) for v in allowed):
                continue
            raise ParamError(name, f"not supported: {why}")
        raise ParamError(name, "unknown parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: Literal[False] | None = None


class Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, max_length=300)
    ignore_eos: bool | None = None
    return_token_ids: bool | None = None

    @model_validator(mode="after")
    def _refuse_extra(self) -> Body:
        check_extra(self.model_extra)
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit() or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: {token!r}: {bias} must map a token id (digits) "
                                 "to a bias in -100..100")
        return self

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def alternatives(self) -> int | None:
        """None: no logprobs; else the alternatives per token (0..20)."""
        return None

    def engine_params(self, choice: int = 0) -> dict[str, Any]:
        """SamplingParams fields for choice `choice` (seed s: s + choice). Only fields set
        away from their defaults travel, so an engine without a feature refuses the
        request (400) rather than ignoring it."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params: dict[str, Any] = {
            "max_tokens": self.token_limit(), "stop": stop,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p, "top_k": self.top_k or 0,
            "seed": None if self.seed is None else (self.seed + choice) % 2**63,
            "ignore_eos": bool(self.ignore_eos)}
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                params[name] = getattr(self, name)
        if self.logit_bias:
            params["logit_bias"] = {int(t): b for t, b in self.logit_bias.items()}
        top = self.alternatives()
        if top is not None:
            params["logprobs"] = True
            if top:
                params["top_logprobs"] = top
        return params


PromptIds = list[int]


class CompletionBody(Body):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _check(self) -> CompletionBody:
        if self.best_of is not None and self.best_of != self.choices:
            raise ValueError(f"best_of: {self.best_of} differs from n ({self.choices}); "
                             "tpserve does not rank candidates: send best_of equal to n or "
                             "leave it out")
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt: empty; send at least one token")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts in one request")
        if len(prompts) * self.choices > MAX_CHOICES:
            raise ValueError(f"n: {len(prompts)} prompts x n={self.choices} choices is over "
                             f"{MAX_CHOICES} in one request")
        return self

    def prompts(self) -> list[str | PromptIds]:
        """The prompts of the request, one or several."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], (str, list)):
            return list(p)  # type: ignore[arg-type]
        return [p]  # type: ignore[list-item]

    def alternatives(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str = Field(max_length=1 << 20)


class ToolFunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: ToolFunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=1 << 20)
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: None = None

    @model_validator(mode="before")
    @classmethod
    def _parts(cls, data: Any) -> Any:
        """A content part of another type than text is refused by name."""
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for j, part in enumerate(data["content"]):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" and isinstance(kind, str):
                    raise ValueError(f"content[{j}].type {kind!r}: tpserve serves text-only "
                                     "models; send text parts")
        return data

    @model_validator(mode="after")
    def _check(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only a tool message answers a call")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (null only for an assistant's tool calls)")
        for call in self.tool_calls or []:
            try:
                json.loads(call.function.arguments)
            except ValueError as e:
                raise ValueError(f"tool_calls: arguments of {call.function.name!r} are not "
                                 f"JSON: {e}") from e
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template reads it: developer as system, text parts
        joined by newlines, tool-call arguments as objects (templates render them)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # every schema is enforced strictly


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: give it with type \"json_schema\", and only then")
        return self

    def structured(self) -> dict[str, str] | None:
        """The engine's StructuredSpec fields (None: free text)."""
        if self.type == "json_object":
            return {"kind": "json_object", "spec": ""}
        if self.json_schema is not None:
            return {"kind": "json_schema", "spec": json.dumps(self.json_schema.schema_ or {})}
        return None


class SessionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    append: bool = False


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    session: SessionOptions | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: set logprobs to true to get them")
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice: send `tools` to choose among")
        if len(set(names)) != len(names):
            raise ValueError("tools: two functions have the same name")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: {choice.function.name!r} is not one of the tools")
        forced = isinstance(choice, NamedToolChoice) or choice == "required"
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: a forced tool_choice already constrains the "
                             "reply to a call; send one of the two")
        return self

    def engine_params(self, choice: int = 0) -> dict[str, Any]:
        params = super().engine_params(choice)
        structured = self.response_format.structured() if self.response_format else None
        if structured is not None:
            params["structured"] = structured
        return params

    def tools_spec(self) -> dict[str, Any] | None:
        """The wire's tools: None without tools or with tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        choice = self.tool_choice or "auto"
        return {"tools": [t.model_dump(exclude_none=True) for t in self.tools],
                "choice": choice if isinstance(choice, str) else choice.model_dump(),
                "parallel": self.parallel_tool_calls is not False}

    def token_limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def table() -> str:
    """The README's tables of the request fields, per route."""
    out = []
    for route in ("chat", "completions"):
        out.append(f"| {route} field | status | how, or why not |\n|---|---|---|")
        out += [f"| `{name}` | {status} | {how} |" for name, status, how in field_status(route)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(), end="")
