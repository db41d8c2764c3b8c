"""Real OpenAI clients against the router: the official `openai` client, LangChain's
ChatOpenAI and litellm, over HTTP (uvicorn on a loopback port, tests/routerserver.py) to a
real tiny engine in this process, with a real Redis. What each client sends must be
honoured or refused by name (router/schema.py); these tests fail when a client sends a
field the router does not know."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redisserver import running
from routerserver import RouterServer

MAX_MODEL_LEN = 1024
CHAT = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def server() -> Iterator[RouterServer]:
    from replicas import Engine, EngineConfig

    with running() as redis:
        engine = Engine(EngineConfig(tp=1, max_model_len=MAX_MODEL_LEN))
        server = RouterServer(engine, redis.url()).start()
        try:
            yield server
        finally:
            server.stop()
            engine.shutdown()


def test_the_openai_client(server: RouterServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert client.models.retrieve("tpserve").id == "tpserve"
    out = client.chat.completions.create(model="tpserve", messages=CHAT, temperature=0,
                                         max_completion_tokens=5, logprobs=True,
                                         top_logprobs=2, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens // 2
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob
               for t in content)  # greedy: the chosen token is the most likely one
    stream = client.chat.completions.create(model="tpserve", messages=CHAT, temperature=0,
                                            max_completion_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(content)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tpserve", messages=CHAT, max_tokens=2,
                                       extra_body={"frobnicate": 1})
    assert refused.value.body["param"] == "frobnicate"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_echo_logprobs_equal_transformers_log_softmax(server: RouterServer) -> None:
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 1 on /v1/completions."""
    import openai
    import torch
    from transformers import AutoModelForCausalLM

    from replicas.tiny import tiny_model_dir
    from replicas.tokenizer import Tokenizer

    prompt = "The quick brown fox jumps over the lazy dog"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="tpserve", prompt=prompt, max_tokens=1, echo=True,
                                    logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    ids = Tokenizer(tiny_model_dir()).encode(prompt)
    got = choice.logprobs.token_logprobs
    assert len(got) == len(ids) + 1 and got[0] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert torch.allclose(torch.tensor(got[1:len(ids)]), want, atol=1e-4)


def test_langchain_chat_openai(server: RouterServer) -> None:
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="tpserve",
                     max_tokens=5, temperature=0, max_retries=0)
    answer = llm.invoke("Once upon a time")
    assert isinstance(answer, AIMessage) and answer.content
    assert "".join(c.content for c in llm.stream("Once upon a time")) == answer.content

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    called = llm.bind_tools([add]).invoke("What is 1 + 2?")
    assert isinstance(called, AIMessage)  # the tiny model may or may not call it


def test_litellm(server: RouterServer) -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch from the internet
    import litellm

    out = litellm.completion(model="openai/tpserve", api_base=f"{server.url}/v1",
                             api_key="none", messages=CHAT, max_tokens=4, temperature=0)
    text = out.choices[0].message.content
    assert text and out.usage.completion_tokens == 4 or out.choices[0].finish_reason == "stop"
    streamed = litellm.completion(model="openai/tpserve", api_base=f"{server.url}/v1",
                                  api_key="none", messages=CHAT, max_tokens=4, temperature=0,
                                  stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text


SCHEMA = {"type": "object", "properties": {
    "count": {"type": "integer"}, "colour": {"enum": ["red", "green", "blue"]},
    "ok": {"type": "boolean"}}, "required": ["count", "colour", "ok"],
    "additionalProperties": False}
# enums and booleans: a random model's integers may run on for ever (digits are valid JSON)
LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch the light.", "parameters": {
        "type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                         "on": {"type": "boolean"}},
        "required": ["colour", "on"], "additionalProperties": False}}}


def matches(value: object) -> bool:
    return (isinstance(value, dict) and set(value) == {"count", "colour", "ok"}
            and isinstance(value["count"], int) and value["colour"] in ("red", "green", "blue")
            and isinstance(value["ok"], bool))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_weights_give_json_that_matches_the_schema(server: RouterServer,
                                                          seed: int) -> None:
    import json

    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(
        model="tpserve", messages=CHAT, max_tokens=200, seed=seed, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "thing",
                                                                "schema": SCHEMA}})
    assert out.choices[0].finish_reason == "stop"
    assert matches(json.loads(out.choices[0].message.content))
    anything = client.chat.completions.create(
        model="tpserve", messages=CHAT, max_tokens=200, seed=seed, temperature=0,
        response_format={"type": "json_object"})
    text = anything.choices[0].message.content
    if anything.choices[0].finish_reason == "stop":  # a random model may fill max_tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_forced_tool_choices_return_a_valid_call(server: RouterServer) -> None:
    import json

    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    for choice in ("required", {"type": "function", "function": {"name": "set_light"}}):
        out = client.chat.completions.create(
            model="tpserve", messages=[{"role": "user", "content": "Red light, please"}],
            tools=[LIGHT], tool_choice=choice, max_tokens=100, temperature=0,
            parallel_tool_calls=False)
        reply = out.choices[0]
        assert reply.finish_reason == "tool_calls", (choice, reply)
        (call,) = reply.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "set_light" and call.id
        assert arguments["colour"] in ("red", "green", "blue") and isinstance(
            arguments["on"], bool) and len(arguments) == 2
        streamed = client.chat.completions.create(
            model="tpserve", messages=[{"role": "user", "content": "Red light, please"}],
            tools=[LIGHT], tool_choice=choice, max_tokens=100, temperature=0,
            parallel_tool_calls=False, stream=True)
        deltas = [c.choices[0] for c in streamed if c.choices]
        calls = [t for d in deltas for t in d.delta.tool_calls or []]
        assert [json.loads(t.function.arguments) for t in calls][:1] == [arguments]
        assert deltas[-1].finish_reason == "tool_calls"


def test_strict_tools_with_auto_are_served(server: RouterServer) -> None:
    """A strict function with tool_choice "auto" (what OpenAI's Agents SDK sends by
    default): served, its calls constrained to the schema (tests/test_structured.py has the
    grammar), the text free. The tiny random model answers in text or calls validly."""
    import json

    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    strict = {**LIGHT, "function": {**LIGHT["function"], "strict": True}}
    for stream in (False, True):
        out = client.chat.completions.create(
            model="tpserve", messages=[{"role": "user", "content": "Red light, please"}],
            tools=[strict], tool_choice="auto", max_tokens=60, temperature=0,
            parallel_tool_calls=False, stream=stream)
        if stream:
            chunks = [c.choices[0] for c in out if c.choices]
            calls = [t for c in chunks for t in c.delta.tool_calls or []]
            reason = chunks[-1].finish_reason
        else:
            calls, reason = out.choices[0].message.tool_calls or [], out.choices[0].finish_reason
        assert reason in ("stop", "length", "tool_calls")
        for call in calls:
            arguments = json.loads(call.function.arguments)
            assert call.function.name == "set_light" and set(arguments) == {"colour", "on"}


def test_langchain_structured_output(server: RouterServer) -> None:
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Thing(BaseModel):  # no integer: a random model's digits may run on for ever
        colour: Literal["red", "green", "blue"]
        ok: bool

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="tpserve",
                     max_tokens=200, temperature=0, max_retries=0)
    for method in ("json_schema", "function_calling"):
        thing = llm.with_structured_output(Thing, method=method).invoke("Describe a thing")
        assert isinstance(thing, Thing), method


def test_lm_eval_loglikelihood_on_a_local_task(server: RouterServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's `local-completions` model runs a multiple-choice task of local data
    through the router (prompts as token-id lists, echo + logprobs); each choice's
    loglikelihood equals transformers' sum of log_softmax over its tokens."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from replicas.tiny import tiny_model_dir

    rows = [{"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
            {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(
        "task: tpserve_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args={
            "base_url": f"{server.url}/v1/completions", "model": "tpserve",
            "tokenizer": tiny_model_dir(), "tokenizer_backend": "huggingface",
            "num_concurrent": 1, "max_retries": 1},
        tasks=["tpserve_local"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    samples = out["samples"]["tpserve_local"]
    assert len(samples) == len(rows) and 0.0 <= out["results"]["tpserve_local"]["acc,none"] <= 1
    for sample in samples:
        for (context, continuation), ((got, _),) in zip(sample["arguments"], sample["resps"],
                                                         strict=True):
            ctx = tokenizer.encode(context)
            ids = ctx + tokenizer.encode(context + continuation)[len(ctx):]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            want = torch.log_softmax(logits, -1)[torch.arange(len(ctx) - 1, len(ids) - 1),
                                                 torch.tensor(ids[len(ctx):])].sum()
            assert abs(got - float(want)) < 1e-3, (context, continuation, got, float(want))
