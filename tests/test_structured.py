"""Structured outputs (replicas/structured.py) on the built-in tiny model, whose random
weights never write JSON by themselves, and whose byte-level tokenizer can spell it:
json_object and json_schema outputs parse and validate, greedy and sampled; the request
ends with "stop" once the grammar is complete (or "length" when max_tokens cuts it, the
text then an unfinished prefix); bad specs are refused; unconstrained requests batched
with constrained ones keep their tokens; streaming, asynchronous scheduling and tp=2."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

import pytest
import torch

from replicas import (
    ConfigError,
    Engine,
    EngineConfig,
    RequestError,
    SamplingParams,
    StructuredSpec,
)
from replicas.sampler import sample_on_device

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = StructuredSpec("json_schema", json.dumps(SCHEMA))
JSON_OBJECT = StructuredSpec("json_object")
PROMPT = "Tell me about the user:"
SEEDS = (1, 3, 5)
# a random model closes a free JSON string by chance: sampled json_object outputs of the
# tiny model took 27 to 1,062 tokens over seeds 1 and 3-8 on CPU (seed 2's first key was
# still open at 1,900, and so was seed 3's on the H200); `free_object` biases it to close
LONG = 1900
CLOSING_BIAS = 3.0  # with it, seeds 1-8 stopped within 17-184 tokens (CPU)


@pytest.fixture(scope="module")
def engine() -> Engine:
    eng = Engine(EngineConfig(model=None, max_model_len=2048))
    yield eng
    eng.shutdown()


def check_schema(value: Any) -> None:
    """SCHEMA, checked by hand."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "role", "tags"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["age"]) is int and 0 <= value["age"] <= 150
    assert value["role"] in ("admin", "user", "guest")
    assert isinstance(value["tags"], list) and 1 <= len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in value["tags"])


def allowed_by(mask: torch.Tensor, vocab: int) -> set[int]:
    """The token ids one row of a packed bitmask allows (bit t % 32 of word t // 32)."""
    return {t for t in range(vocab) if mask[t // 32] >> (t % 32) & 1}


@functools.cache
def closing_tokens() -> tuple[int, ...]:
    """The tiny model's tokens that close a JSON string or object."""
    from transformers import AutoTokenizer

    from replicas.tiny import tiny_model_dir

    hf = AutoTokenizer.from_pretrained(tiny_model_dir())
    return tuple(i for t, i in hf.get_vocab().items()
                 if hf.convert_tokens_to_string([t]) in ('"', '"}', '",', '}'))


def free_object(seed: int | None) -> SamplingParams:
    """A json_object request whose sampled output ends on any device: CLOSING_BIAS on the
    tokens that close a string or an object (a random model alone may never close one)."""
    return params(JSON_OBJECT, seed, LONG,
                  logit_bias=dict.fromkeys(closing_tokens(), CLOSING_BIAS))


def params(spec: StructuredSpec, seed: int | None, max_tokens: int = 400,
           **more: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0 if seed is None else 1.0,
                          seed=seed, structured=spec, **more)


def test_unconstrained_output_of_this_model_is_no_json(engine: Engine) -> None:
    """The baseline the constraint changes: the same requests without it."""
    for seed in (None, *SEEDS):
        plain = SamplingParams(max_tokens=60, temperature=0.0 if seed is None else 1.0,
                               seed=seed)
        text = engine.generate([PROMPT], plain)[0].text
        with pytest.raises(ValueError):
            json.loads(text)


@pytest.mark.parametrize("seed", [None, *SEEDS])
def test_json_object_parses_and_stops(engine: Engine, seed: int | None) -> None:
    out = engine.generate([PROMPT], free_object(seed))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < LONG
    assert isinstance(json.loads(out.text), dict)
    assert out.text.endswith("}")  # the grammar ends there: no EOS step after it


@pytest.mark.parametrize("seed", [None, *SEEDS])
def test_json_schema_validates_and_stops(engine: Engine, seed: int | None) -> None:
    out = engine.generate([PROMPT], params(JSON_SCHEMA, seed))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < 400
    check_schema(json.loads(out.text))


def test_max_tokens_cuts_the_json_and_finishes_with_length(engine: Engine) -> None:
    """The grammar cannot stop the request early: max_tokens wins and the text is the
    unfinished prefix of a valid instance (what a client with too small a budget gets)."""
    full = engine.generate([PROMPT], params(JSON_SCHEMA, None))[0]
    cut = engine.generate([PROMPT], params(JSON_SCHEMA, None, max_tokens=8))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 8
    assert cut.token_ids == full.token_ids[:8] and full.text.startswith(cut.text)
    with pytest.raises(ValueError):
        json.loads(cut.text)


def test_rows_that_end_while_others_go_on_keep_every_mask_right(engine: Engine) -> None:
    """Rows of a batch end at different steps (max_tokens 3 and 7 among longer ones; a
    sampled row ends when its JSON closes): the masks of the rows that remain stay
    theirs. Each output equals the same request run alone."""
    reqs = [params(JSON_SCHEMA, None, max_tokens=3), free_object(3),
            params(JSON_SCHEMA, None, max_tokens=7), params(JSON_SCHEMA, 5),
            params(JSON_SCHEMA, None)]
    fill = engine.mask_fill_s
    together = engine.generate([PROMPT] * len(reqs), reqs)
    assert engine.mask_fill_s > fill
    for req, got in zip(reqs, together, strict=True):
        alone = engine.generate([PROMPT], req)[0]
        assert (got.token_ids, got.finish_reason) == (alone.token_ids, alone.finish_reason)
    assert [o.finish_reason for o in together[:3:2]] == ["length", "length"]
    check_schema(json.loads(together[3].text))
    assert isinstance(json.loads(together[1].text), dict)


def test_ignore_eos_and_logprobs_do_not_change_the_end(engine: Engine) -> None:
    out = engine.generate([PROMPT], params(JSON_SCHEMA, 5, ignore_eos=True, logprobs=True))[0]
    assert out.finish_reason == "stop"
    check_schema(json.loads(out.text))
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    assert all(lp <= 0.0 for lp in out.logprobs)


@pytest.mark.parametrize("spec, word", [
    (StructuredSpec("json_schema", json.dumps(
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})), "missing"),
    (StructuredSpec("json_schema", json.dumps({"type": "strnig"})), "strnig"),
    (StructuredSpec("ebnf", "root ::= undefined_rule"), "undefined_rule"),
    (StructuredSpec("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "tagg"}})), "tagg"),
])
def test_a_spec_the_library_refuses_is_a_request_error(engine: Engine, spec: StructuredSpec,
                                                       word: str) -> None:
    with pytest.raises(RequestError, match=word):
        engine.generate([PROMPT], params(spec, None))

    async def stream() -> None:
        async for _ in engine.add_request(PROMPT, params(spec, None)):
            pass

    with pytest.raises(RequestError):
        asyncio.run(stream())
    assert engine.healthy()
    check_schema(json.loads(engine.generate([PROMPT], params(JSON_SCHEMA, None))[0].text))


def test_bad_specs_are_config_errors() -> None:
    for kwargs, word in [({"kind": "yaml"}, "kind"), ({"kind": "json_schema"}, "spec"),
                         ({"kind": "json_schema", "spec": "{"}, "not valid JSON"),
                         ({"kind": "json_schema", "spec": "[1]"}, "JSON object"),
                         ({"kind": "ebnf", "spec": " "}, "spec"),
                         ({"kind": "structural_tag", "spec": "<tool_call>"}, "not valid JSON"),
                         ({"kind": "structural_tag", "spec": "[]"}, "JSON object")]:
        with pytest.raises(ConfigError, match=word):
            StructuredSpec(**kwargs)
    with pytest.raises(ConfigError, match="structured"):
        SamplingParams(structured="json")  # type: ignore[arg-type]
    # the wire's form: a dict; hashable and equal by value (the grammar cache's key)
    made = SamplingParams(structured={"kind": "json_schema", "spec": json.dumps(SCHEMA)})
    assert made.structured == JSON_SCHEMA and hash(made.structured) == hash(JSON_SCHEMA)


def test_unconstrained_requests_in_a_mixed_batch_keep_their_tokens(engine: Engine) -> None:
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompts = ["Once upon a time", PROMPT, "The quick brown fox", PROMPT, "Hello!"]
    alone = [engine.generate([p], plain)[0].token_ids for p in prompts[::2]]
    mixed = engine.generate(prompts, [plain, params(JSON_SCHEMA, None), plain,
                                      free_object(3), plain])
    assert [o.token_ids for o in mixed[::2]] == alone
    check_schema(json.loads(mixed[1].text))
    assert isinstance(json.loads(mixed[3].text), dict)
    constrained_alone = engine.generate([PROMPT], params(JSON_SCHEMA, None))[0]
    assert mixed[1].token_ids == constrained_alone.token_ids


def test_streaming_gives_the_same_json(engine: Engine) -> None:
    async def run() -> list:
        return [d async for d in engine.add_request(PROMPT, params(JSON_SCHEMA, 2))]

    deltas = asyncio.run(run())
    whole = engine.generate([PROMPT], params(JSON_SCHEMA, 2))[0]
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    check_schema(json.loads(whole.text))


def test_structural_tag_wraps_json_in_tool_call_tags(engine: Engine) -> None:
    """A schema inside a model family's tags (the form a tool call takes)."""
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
        "content": {"type": "json_schema", "json_schema": SCHEMA}}}
    out = engine.generate([PROMPT], params(StructuredSpec("structural_tag", json.dumps(tag)),
                                           3))[0]
    assert out.finish_reason == "stop"
    assert out.text.startswith("<tool_call>") and out.text.endswith("</tool_call>")
    check_schema(json.loads(out.text[len("<tool_call>"):-len("</tool_call>")]))


def test_ebnf_kind_and_a_grammar_that_goes_on_after_it_is_complete(engine: Engine) -> None:
    """An EBNF grammar; one complete after "a" that may still go on ("ab") is not over
    there: the request ends only once nothing but EOS may follow."""
    grammar = 'root ::= "yes" | "no" | "maybe" | "maybe not"'
    texts = {engine.generate([PROMPT], params(StructuredSpec("ebnf", grammar), seed))[0].text
             for seed in range(12)}
    assert texts <= {"yes", "no", "maybe", "maybe not"} and len(texts) >= 2, texts
    out = engine.generate([PROMPT], params(StructuredSpec("ebnf", 'root ::= "ab" | "abab"'),
                                           None))[0]
    assert out.text in ("ab", "abab") and out.finish_reason == "stop"


@pytest.mark.parametrize("tp", [1, 2])
def test_async_scheduling_and_tp2_give_the_same_json(engine: Engine, tp: int) -> None:
    """At tp=1 the next step is launched on the tokens still on the device, while the
    masks wait for them on the host: the same tokens as step by step, and at tp=2 (rank 0
    alone samples) as at tp=1."""
    reqs = [params(JSON_SCHEMA, None), params(JSON_SCHEMA, 5), free_object(8),
            SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    want = engine.generate([PROMPT] * 4, reqs)
    config = EngineConfig(model=None, max_model_len=2048, tp=tp, comm_dtype="float32",
                          async_scheduling=tp == 1)
    with Engine(config) as other:
        assert other._ahead == (tp == 1) and engine._ahead
        if tp == 1:
            other._ahead = False  # step by step
        got = other.generate([PROMPT] * 4, reqs)
    for a, b in zip(want, got, strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    check_schema(json.loads(got[0].text))


def test_masks_apply_on_their_rows_only_and_logprobs_stay_the_models(engine: Engine) -> None:
    grammars = engine._structured()
    first = grammars.constraint(JSON_OBJECT)
    second = grammars.constraint(JSON_SCHEMA)
    bitmask = grammars.fill([first, second])  # [2, words]
    vocab = engine.spec.vocab_size
    allowed = [allowed_by(bitmask[r], vocab) for r in range(2)]
    decode = engine.tokenizer.decode
    for row in allowed:  # compact JSON starts with "{": every allowed first token does
        assert row and all(decode([t]).startswith("{") for t in row)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    out = grammars.apply(logits, [0, 2], bitmask)
    assert torch.equal(out[1], logits[1])  # the unconstrained row is untouched
    for r, row in ((0, 0), (2, 1)):
        keep = torch.tensor([t in allowed[row] for t in range(vocab)])
        assert torch.equal(out[r][keep], logits[r][keep])
        assert bool((out[r][~keep] == float("-inf")).all())
    plist = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.0, seed=1)]
    tokens, logprobs = sample_on_device(logits, plist, [torch.Generator()] * 3,
                                        with_logprobs=True, argmax=logits.argmax(-1),
                                        choose=out)
    assert int(tokens[0]) in allowed[0] and int(tokens[2]) in allowed[1]
    assert int(tokens[1]) == int(logits[1].argmax())
    raw = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(logprobs, raw)  # under the model's distribution, not the mask's


def test_preemption_keeps_the_matchers_in_step(engine: Engine) -> None:
    """In a KV pool too small for the batch, sequences are preempted and computed again
    from their tokens; their matchers, fed only read tokens, give the same outputs."""
    reqs = [params(JSON_SCHEMA, None, 80), params(JSON_SCHEMA, 1, 80),
            params(JSON_SCHEMA, 2, 80), params(JSON_SCHEMA, 5, 80)]
    prompts = ["Hi", "Tell me", "A user:", "JSON please"]
    want = engine.generate(prompts, reqs)
    config = EngineConfig(model=None, num_kv_blocks=12, block_size=8, max_model_len=96)
    with Engine(config) as small:
        got = small.generate(prompts, reqs)
        assert small.stats()["preemptions"] > 0
    for a, b in zip(want, got, strict=True):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, "stop")
        check_schema(json.loads(b.text))


def test_leaving_a_constrained_stream_aborts_it(engine: Engine) -> None:
    async def run() -> int:
        seen = 0
        # unbiased: a free object that runs long, so that leaving it is what ends it
        async for d in engine.add_request(PROMPT, params(JSON_OBJECT, 1, LONG)):
            seen += len(d.token_ids)
            if seen >= 3:
                break
        return seen

    assert asyncio.run(run()) >= 3
    deadline = 50
    while engine.stats()["running"] and deadline:
        time.sleep(0.1)
        deadline -= 1
    assert engine.stats()["running"] == 0
    check_schema(json.loads(engine.generate([PROMPT], params(JSON_SCHEMA, None))[0].text))


@pytest.mark.parametrize("ahead", [False, True])
def test_float16_overflow_rerun_samples_again_under_the_same_masks(overflowing_model: str,
                                                                   ahead: bool) -> None:
    """At tp=2 every float16 step overflows and is run again in float32, then sampled
    again (with `ahead`, inside `_land`, before the matchers took its tokens): the same
    constrained tokens as float32 communication gives. (Greedy: a seeded row's generator
    has moved on by the rerun, constrained or not.)"""
    reqs = [params(JSON_SCHEMA, None, 120), params(JSON_OBJECT, None, 120)]

    def run(comm: str) -> tuple[list, int]:
        config = EngineConfig(model=overflowing_model, tp=2, comm_dtype=comm)
        with Engine(config) as eng:
            eng._ahead = ahead
            outs = eng.generate([PROMPT, PROMPT], reqs)
            return outs, eng.stats()["comm_overflow_retries"]

    exact, _ = run("float32")
    guarded, retries = run("float16")
    assert retries >= 8
    assert [o.token_ids for o in guarded] == [o.token_ids for o in exact]
    assert exact[0].finish_reason == "stop"
    check_schema(json.loads(guarded[0].text))
    assert guarded[1].text.startswith("{")


def test_objects_that_list_properties_take_no_others_unless_they_say_so() -> None:
    from replicas.structured import prepared

    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "c": {"type": "array", "items": {"properties": {"d": {}}}},
        "e": {"type": "object"}, "f": {"properties": {}, "additionalProperties": True}},
        "$defs": {"g": {"anyOf": [{"properties": {"h": {}}}]}}}
    out = prepared(schema)
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["a"]["additionalProperties"] is False
    assert props["c"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in props["e"]  # no properties listed: open
    assert props["f"]["additionalProperties"] is True  # said so
    assert out["$defs"]["g"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is left as it was


def test_bounded_strings_are_valid_json_strings(engine: Engine) -> None:
    """xgrammar 0.2.9 lets raw control characters into a string with minLength/maxLength
    (invalid JSON); a JSON constraint's mask bans every token that holds one, in such a
    string as anywhere, while the bounds and the other characters stay as they were."""
    grammars = engine._structured()
    hf = engine.tokenizer.hf
    spec = StructuredSpec("json_schema", json.dumps({"type": "string", "minLength": 2,
                                                     "maxLength": 4}))

    def allowed_after(text: str) -> set[int]:
        row = grammars.constraint(spec)
        for token in hf.encode(text, add_special_tokens=False):
            assert not row.advance(token), text
        return allowed_by(grammars.fill([row])[0], grammars.vocab_size)

    vocab = {t: hf.decode([t]) for t in range(len(hf))}
    control = {t for t, text in vocab.items() if any(ord(c) < 32 for c in text)}
    assert control  # the byte-level tokenizer has them (\x00-\x1f, "\n  ", ...)
    quote = hf.encode('"', add_special_tokens=False)[0]
    for prefix, can_close in [('"', False), ('"a', False), ('"ab', True), ('"abcd', True)]:
        allowed = allowed_after(prefix)
        assert not allowed & control, prefix
        assert (quote in allowed) == can_close, prefix
        assert any(vocab[t] == "b" for t in allowed) == (prefix != '"abcd'), prefix
    plain = grammars.constraint(StructuredSpec("ebnf", 'root ::= "a" [\\x00-\\x1f]'))
    plain.advance(hf.encode("a", add_special_tokens=False)[0])
    mask = grammars.fill([plain])[0]
    assert allowed_by(mask, grammars.vocab_size) & control  # only JSON kinds ban them


def test_grammar_replay_steps_rows_through_the_engines_matchers() -> None:
    """replicas.grammar_replay's measurement: a batch of texts stepped through the
    engine's matchers; a row whose text leaves the schema drops out there, the others
    run to their end."""
    from transformers import AutoTokenizer

    from replicas.grammar_replay import Xgrammar, replay
    from replicas.tiny import tiny_model_dir

    hf = AutoTokenizer.from_pretrained(tiny_model_dir())
    texts = ['{"name":"ab","age":3,"role":"user","tags":["x","y"]}',
             '{"name":"ab","age":3,"role":"boss"}']
    lists = [hf.encode(t, add_special_tokens=False) for t in texts]
    row = replay(Xgrammar(hf, 1), SCHEMA, lists)
    assert row["steps"] == len(lists[0]) and row["refused_rows"] == 1
    assert 0 < row["batch_fill_ms"]["p50"] <= row["batch_fill_ms"]["max"]
    assert 0 < row["row_fill_us"]["p50"] <= row["row_fill_us"]["max"]


def test_a_batch_split_over_fill_threads_gets_the_masks_of_one_thread(engine: Engine
                                                                     ) -> None:
    """A batch of FILL_ROWS_PER_THREAD rows a part or more, whose rows have been slow
    lately, is filled in parts on the pool's threads: each row's mask is the one a single
    thread fills, failed rows included; `close` stops the pool's threads, and the next
    fill starts them again. Cheap rows stay on one thread: no pool."""

    from replicas.structured import FILL_ROWS_PER_THREAD, Grammars

    hf = engine.tokenizer.hf
    text = '{"name":"abcdefgh","age":42,"role":"admin","tags":["x","yz"]}'
    tokens = hf.encode(text, add_special_tokens=False)
    rows = 5 * FILL_ROWS_PER_THREAD
    one, split = (Grammars(hf, engine.spec.vocab_size, [1], threads=n) for n in (1, 3))
    batches = []
    for grammars in (one, split):
        batch = [grammars.constraint(JSON_SCHEMA) for _ in range(rows)]
        for i, c in enumerate(batch):  # each row at its own point of the text
            for t in tokens[: i % len(tokens)]:
                c.advance(t)
        batch[3].advance(hf.encode("x", add_special_tokens=False)[0])  # refused: failed
        batches.append(batch)
    cheap = [split.constraint(JSON_SCHEMA) for _ in range(rows)]  # ~1 µs a mask
    for _ in range(3):
        split.fill(cheap)
    assert split._pool is None and 0 < split.row_fill_s < 1e-4
    split.row_fill_s = one.row_fill_s = 1e-3  # as if the rows had been slow
    assert torch.equal(one.fill(batches[0]), split.fill(batches[1]))
    assert len({tuple(m.tolist()) for m in one.fill(batches[0])}) > 5  # states differ

    assert one._pool is None and split._pool is not None
    # the pool starts a thread for a part only when none of its own is idle: 1 or 2 here
    started = set(split._pool._threads)
    assert 1 <= len(started) <= 2
    assert all(t.name.startswith("tpserve-mask") and t.is_alive() for t in started)
    split.close()
    assert split._pool is None and not any(t.is_alive() for t in started)
    split.row_fill_s = 1e-3
    assert torch.equal(one.fill(batches[0][:17]), split.fill(batches[1][:17]))  # 16 live
    assert split._pool is not None
    split.close()


def test_the_grammar_cache_is_bounded_in_count_and_in_bytes(engine: Engine) -> None:
    """Compiled grammars are kept least recently used first out, at most `cache_size` of
    them and at most `cache_bytes` (xgrammar's own count of what one holds)."""
    from replicas.structured import Grammars

    def spec(i: int) -> StructuredSpec:
        return StructuredSpec("json_schema", json.dumps({**SCHEMA, "title": f"s{i}"}))

    grammars = Grammars(engine.tokenizer.hf, engine.spec.vocab_size, [1], cache_size=3)
    for i in range(5):
        grammars.check(spec(i))
    one = grammars.cached_bytes // 3
    assert list(grammars._cache) == [spec(2), spec(3), spec(4)] and one > 0
    grammars.check(spec(2))  # used again: the newest
    grammars.check(spec(5))
    assert list(grammars._cache) == [spec(4), spec(2), spec(5)]
    small = Grammars(engine.tokenizer.hf, engine.spec.vocab_size, [1],
                     cache_bytes=int(2.5 * one))
    for i in range(4):
        small.check(spec(i))
    assert list(small._cache) == [spec(2), spec(3)] and small.cached_bytes <= 2.5 * one


def test_a_refused_token_ends_the_constraint_and_leaves_only_eos(engine: Engine) -> None:
    """A token the grammar refuses (sampling never picks one; a bug could) ends the
    request rather than corrupting the matcher: `over`, and its mask allows EOS alone."""
    grammars = engine._structured()
    good, bad = grammars.constraint(JSON_SCHEMA), grammars.constraint(JSON_SCHEMA)
    x = engine.tokenizer.hf.encode("x", add_special_tokens=False)[0]
    assert bad.advance(x) and bad.failed and bad.over
    assert not good.over
    masks = grammars.fill([good, bad])
    allowed = [allowed_by(masks[row], grammars.vocab_size) for row in range(2)]
    assert allowed[1] == set(grammars.eos_ids)
    assert len(allowed[0]) > 1 and not set(grammars.eos_ids) & allowed[0]


def test_auto_call_tag_constrains_calls_and_leaves_the_text_free(engine: Engine) -> None:
    """tool_choice "auto" with a strict function (replicas/toolcalls.py auto_call_tag), as
    the engine compiles it, in each format: text, or calls that name a tool and whose
    arguments match a strict function's schema (any object for a non-strict one); without
    parallel calls, one call and then nothing but EOS."""
    from replicas.toolcalls import auto_call_tag

    tools = [{"type": "function", "function": {"name": "set_light", "strict": True,
                                               "parameters": {
                                                   "type": "object", "properties": {
                                                       "colour": {"enum": ["red", "blue"]}},
                                                   "required": ["colour"],
                                                   "additionalProperties": False}}},
             {"type": "function", "function": {"name": "note", "parameters": {
                 "type": "object", "properties": {"text": {"type": "string"}}}}}]
    grammars = engine._structured()

    def matcher(fmt: str, parallel: bool) -> Any:
        spec = StructuredSpec("structural_tag", json.dumps(auto_call_tag(fmt, tools,
                                                                         parallel)))
        return grammars.constraint(spec).matcher

    def calls(fmt: str, args: str, name: str = "set_light") -> str:
        return {"hermes": f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n'
                          "</tool_call>",
                "llama3": f'{{"name": "{name}", "parameters": {args}}}',
                "glm4": f"{name}\n{args}"}[fmt]

    red, green, any_object = '{"colour": "red"}', '{"colour": "green"}', '{"any": [1]}'
    for fmt in ("hermes", "llama3", "glm4"):
        for text, ok in [(calls(fmt, red), True), ("No call at all.", True),
                         (calls(fmt, green), False),  # outside the strict schema
                         # no such tool: refused, but for glm4 that is text (a call
                         # there starts with a tool's name)
                         (calls(fmt, "{}", name="paint"), fmt == "glm4"),
                         (calls(fmt, any_object, name="note"), True)]:  # not strict
            m = matcher(fmt, parallel=True)
            assert (m.accept_string(text) and m.is_completed()) == ok, (fmt, text)
        one = matcher(fmt, parallel=False)
        assert one.accept_string(calls(fmt, red)) and one.is_completed()
        assert not one.accept_string("; " + calls(fmt, red))  # one call, then only EOS
    hermes = matcher("hermes", parallel=True)  # text around hermes calls, several calls
    assert hermes.accept_string("Sure. " + calls("hermes", red) + " and " + calls("hermes", red))
    llama = matcher("llama3", parallel=True)  # llama3: calls joined by "; ", no text
    assert llama.accept_string(calls("llama3", red) + "; " + calls("llama3", red))
    assert not matcher("llama3", parallel=True).accept_string("Sure. " + calls("llama3", red))
    assert not matcher("glm4", parallel=True).accept_string("Sure. " + calls("glm4", red))
    pretty = '{\n    "colour": "red"\n}'  # indented arguments fit; endless spaces do not
    assert matcher("hermes", parallel=True).accept_string(calls("hermes", pretty))
    assert not matcher("hermes", parallel=True).accept_string(
        calls("hermes", '{"colour":' + " " * 17 + '"red"}'))
    with pytest.raises(ValueError, match="json"):
        auto_call_tag("json", tools, True)
