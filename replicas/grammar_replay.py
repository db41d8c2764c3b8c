"""What a structured-output mask costs in the states decoding really reaches:
`python -m replicas.grammar_replay [--make-texts] [--batch 16 64] [--out FILE]`.

The texts are JSON outputs that the bench's random model (replicas/bench.py: the tiny
Llama with the 150k tokenizer and 151,936 logits) wrote under the bench's schema, once
as it is (a random model writes integers of hundreds of digits there) and once with the
age bounded to 0-150, so that the outputs go on into the short `maxLength` strings. They
are kept in STRUCTURED_TEXTS (made with `--make-texts`, 64 of each, 160 tokens, sampled
at temperature 1), as text: another machine trains another tokenizer, and each text is
tokenized again here.

Each batch of texts goes through its matchers step by step, as the engine drives them;
per step, the batch's masks are filled the way each library's engine code fills them,
and timed: xgrammar through `replicas.structured.Grammars.fill` (the engine's own path,
once per thread count of `--threads`) and, when it is installed, llguidance 1.9.1
through its `LLExecutor`, as tpserve did up to v0.22. Then each row's mask alone (a
second set of matchers), for the distribution of per-row costs. Both libraries get the
same schema (`replicas.structured.prepared`), so they accept the same language and pass
through the same states.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
from pathlib import Path
from typing import Any

import torch

from replicas.bench import STRUCTURED_MODEL, STRUCTURED_SPECIAL, seconds
from replicas.jsonlines import emit, spread

STRUCTURED_TEXTS = Path(__file__).resolve().parent / "results" / "structured_replay_texts.json"
EOS = STRUCTURED_SPECIAL["eos_token_id"]  # the bench's structured model's
VOCAB = STRUCTURED_MODEL["vocab_size"]


def schemas() -> dict[str, dict[str, Any]]:
    """The bench's schema, and the same with the age bounded to 0-150."""
    from replicas.bench import STRUCTURED_SCHEMA

    bounded = json.loads(json.dumps(STRUCTURED_SCHEMA))
    bounded["properties"]["users"]["items"]["properties"]["age"].update(minimum=0, maximum=150)
    return {"bench": STRUCTURED_SCHEMA, "bounded_age": bounded}


def make_texts(rows: int = 64, tokens: int = 160) -> dict[str, Any]:
    """`rows` outputs of the bench's tiny random model per schema (see the module doc)."""
    from replicas import Engine, EngineConfig, SamplingParams
    from replicas.bench import prompts_for, structured_model_dir
    from replicas.config import StructuredSpec

    out: dict[str, Any] = {}
    config = EngineConfig(model=structured_model_dir("tiny"), load_format="random",
                          max_model_len=512, max_num_seqs=rows)
    with Engine(config) as engine:
        for name, schema in schemas().items():
            params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0,
                                    ignore_eos=True,
                                    structured=StructuredSpec("json_schema", json.dumps(schema)))
            done = engine.generate(prompts_for(rows, 32, 150_000), params)
            out[name] = {"schema": schema, "texts": [o.text for o in done]}
    return out


class Xgrammar:
    """The engine's own path: replicas.structured.Grammars."""

    name = "xgrammar"

    def __init__(self, hf: Any, threads: int) -> None:
        from replicas.structured import Grammars

        self.grammars = Grammars(hf, VOCAB, [EOS], threads=threads)
        self.threads = threads

    def matchers(self, schema: dict[str, Any], n: int) -> list[Any]:
        from replicas.config import StructuredSpec

        spec = StructuredSpec("json_schema", json.dumps(schema))
        return [self.grammars.constraint(spec) for _ in range(n)]

    def fill(self, rows: list[Any]) -> None:
        self.grammars.fill(rows)

    def accept(self, row: Any, token: int) -> bool:
        row.advance(token)
        return not row.failed


class Llguidance:
    """llguidance 1.9.1 as tpserve's engine used it up to v0.22: compact JSON, masks
    filled by its LLExecutor's threads."""

    name = "llguidance"
    threads = None  # its executor's own

    def __init__(self, hf: Any) -> None:
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB, eos_token=[EOS])
        self.executor = llguidance.LLExecutor()
        self.words = (VOCAB + 31) // 32

    def matchers(self, schema: dict[str, Any], n: int) -> list[Any]:
        from replicas.structured import prepared

        grammar = self.lib.LLMatcher.grammar_from_json_schema(
            prepared(schema), defaults={"whitespace_flexible": False})
        first = self.lib.LLMatcher(self.tokenizer, grammar, log_level=0)
        return [first.deep_copy() for _ in range(n)]

    def fill(self, rows: list[Any]) -> None:
        host = torch.empty((len(rows), self.words), dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(rows)],
                                              host.data_ptr(), self.words * 4, len(rows))

    def accept(self, row: Any, token: int) -> bool:
        return bool(row.consume_token(token))


def replay(lib: Any, schema: dict[str, Any], token_lists: list[list[int]]) -> dict[str, Any]:
    """Step the batch `token_lists` through `lib`'s matchers (see the module doc). The
    batch's fills and the rows' lone fills run on two sets of matchers fed the same
    tokens: a library may keep the mask of a state it has just filled (llguidance does),
    and a second fill there would cost nothing."""
    batch_rows = lib.matchers(schema, len(token_lists))
    lone_rows = lib.matchers(schema, len(token_lists))
    live = [True] * len(token_lists)
    batch_s: list[float] = []
    row_s: list[float] = []
    for step in range(max(len(t) for t in token_lists)):
        alive = [i for i, tokens in enumerate(token_lists) if live[i] and step < len(tokens)]
        if not alive:
            break
        batch_s.append(seconds(lambda a=alive: lib.fill([batch_rows[i] for i in a])))
        for i in alive:
            row_s.append(seconds(lambda i=i: lib.fill([lone_rows[i]])))
        for i in alive:
            token = token_lists[i][step]
            live[i] = lib.accept(batch_rows[i], token) and lib.accept(lone_rows[i], token)
    return {"steps": len(batch_s), "refused_rows": live.count(False),
            "batch_fill_ms": spread(batch_s, 1e3, 3), "row_fill_us": spread(row_s, 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-texts", action="store_true",
                        help=f"write {STRUCTURED_TEXTS.name} anew (the engine, ~1 min on CPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="xgrammar fill threads, each a run (default: 1 and the "
                             "engine's fill_threads())")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.make_texts:
        STRUCTURED_TEXTS.write_text(json.dumps(make_texts(max(args.batch)), indent=1) + "\n")
    from transformers import AutoTokenizer

    from replicas.bench import environment, structured_model_dir

    hf = AutoTokenizer.from_pretrained(structured_model_dir("tiny"))
    from replicas.structured import fill_threads

    threads = args.threads or sorted({1, fill_threads()})
    libs: list[Any] = [Xgrammar(hf, n) for n in threads]
    try:
        libs.append(Llguidance(hf))
    except ImportError:
        print("llguidance is not installed: xgrammar alone", file=sys.stderr)
    saved = json.loads(STRUCTURED_TEXTS.read_text())
    for name, entry in saved.items():
        token_lists = [hf.encode(text, add_special_tokens=False) for text in entry["texts"]]
        for batch in args.batch:
            for lib in libs:
                row = replay(lib, entry["schema"], token_lists[:batch])
                emit({"case": "grammar_replay", "lib": lib.name,
                      "version": md.version(lib.name), "threads": lib.threads,
                      "schema": name, "batch": batch,
                      "vocab": VOCAB, **row,
                      **environment("replicas.grammar_replay")}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
