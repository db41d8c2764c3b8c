"""Tool calls parsed from a model's streamed reply (replicas/toolcalls.py), each format,
fed in every split: a character at a time and all at once."""

from __future__ import annotations

import json

import pytest

from replicas.toolcalls import (
    ToolCallParser,
    detect_format,
    named_schema,
    required_schema,
)

NAMES = ["get_weather", "add"]


def run(parser: ToolCallParser, text: str, step: int) -> tuple[str, list[tuple[str, dict]]]:
    out, calls = [], []
    for i in range(0, len(text), step):
        content, done = parser.feed(text[i: i + step])
        out.append(content)
        calls += done
    content, done = parser.finish()
    out.append(content)
    calls += done
    assert len({c.id for c in calls}) == len(calls)
    return "".join(out), [(c.name, json.loads(c.arguments)) for c in calls]


CASES = [
    ("hermes", 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris"}}\n</tool_call>', "Let me look.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>'
               '{"name": "add", "arguments": {"a": 2}}</tool_call>', "",
     [("add", {"a": 1}), ("add", {"a": 2})]),
    ("hermes", "no call here <tool_ca", "no call here <tool_ca", []),
    ("hermes", '<tool_call>{"name": "add", "argu', '<tool_call>{"name": "add", "argu', []),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1}}', "",
     [("add", {"a": 1})]),  # a reply that stops before the closing tag
    ("hermes", "<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after",
     []),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", {"city": "Oslo"})]),
    ("llama3", '{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {}}',
     "", [("add", {"a": 1}), ("add", {})]),
    ("llama3", '{"name": "note", "parameters": {"text": "a; b"}};{"name": "add", '
               '"parameters": {"a": 2}}', "",
     [("note", {"text": "a; b"}), ("add", {"a": 2})]),  # a ";" inside a string
    ("llama3", '{"name": "add", "parameters": {}} {"name": "add", "parameters": {}}',
     '{"name": "add", "parameters": {}} {"name": "add", "parameters": {}}', []),  # no ";"
    ("llama3", "Hello {there}", "Hello {there}", []),
    ("llama3", "{not a call}", "{not a call}", []),
    ("glm4", 'get_weather\n{"city": "Rome"}', "", [("get_weather", {"city": "Rome"})]),
    ("glm4", "get_weathering is fun", "get_weathering is fun", []),
    ("glm4", "Sunny today.", "Sunny today.", []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_each_format_splits_content_and_calls(fmt: str, text: str, content: str,
                                              calls: list, step: int) -> None:
    assert run(ToolCallParser(fmt, NAMES), text, step) == (content, calls)


def test_content_goes_out_as_it_comes_and_only_a_possible_tag_is_held() -> None:
    parser = ToolCallParser("hermes", NAMES)
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("s>") == ("<tools>", [])
    llama = ToolCallParser("llama3", NAMES)
    assert llama.feed("Sure") == ("Sure", [])  # cannot be a call: out at once
    held = ToolCallParser("llama3", NAMES)
    assert held.feed('{"name"') == ("", [])


def test_forced_json_calls_and_one_call_without_parallel() -> None:
    required = ToolCallParser("json", NAMES)
    text = '[{"name": "add", "parameters": {"a": 1}}, {"name": "get_weather", ' \
           '"parameters": {"city": "X"}}]'
    assert run(required, text, 5)[1] == [("add", {"a": 1}), ("get_weather", {"city": "X"})]
    assert run(ToolCallParser("json", NAMES, parallel=False), text, 5)[1] == [
        ("add", {"a": 1})]
    assert run(ToolCallParser("json", NAMES, forced="add"), '{"a": 3}', 2)[1] == [
        ("add", {"a": 3})]
    assert run(ToolCallParser("json", NAMES), '[{"name": "rm", "parameters": {}}]', 4) == (
        '[{"name": "rm", "parameters": {}}]', [])  # not one of the request's tools


def test_schemas_for_forced_choices() -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}},
             {"type": "function", "function": {"name": "noop"}}]
    schema = required_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == [
        "add", "noop"]
    assert "maxItems" not in required_schema(tools, parallel=True)
    assert named_schema(tools[1]) == {"type": "object"}


def test_the_format_comes_from_the_chat_template() -> None:
    assert detect_format("{{ messages }}", "qwen2") is None  # renders no tools
    assert detect_format("{% if tools %}<tool_call>{% endif %}", "llama") == "hermes"
    assert detect_format('{% if tools %}"parameters"{% endif %}', "llama") == "llama3"
    assert detect_format("{% if tools %}observation{% endif %}", "glm") == "glm4"
    assert detect_format(None, "qwen2") is None
