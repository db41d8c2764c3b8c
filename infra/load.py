"""Load on the whole stack: `python -m infra.load [--mode load|pinning|pinning-engine|overhead]`.

Every mode prints one JSON line per result (and appends it to --out under
infra/results/): the figures, the configuration, the git revision, the host and the
command. Everything runs on loopback and stops by itself (bounded requests and time).

- `load` (default): `--clients` concurrent streaming clients, each running multi-turn chat
  sessions (X-Session-ID, `"session": {"append": true}`) through nginx, until
  `--duration` seconds or `--max-requests` requests. p50/p99 time to first token (TTFT)
  and inter-token latency (ITL), output tokens/s, errors (refused = no 200; failed = a
  200 whose stream broke or ended with an error event; hung = no end within
  `--request-timeout`), and sessions moved (X-Replica-ID changed within a session).
  Without --url it starts a local stack (the tiny model, tp=2, 2 replicas) on free ports.
- `pinning`: the payoff of session pinning. The same conversations (unique text per
  session, history growing past --history-tokens) on a fresh stack with `routing:
  pinned` and on one with `routing: random` (RouterConfig.routing); TTFT of turns >= 3
  and the replicas' prefix-cache hit rate (hit blocks x block size / prompt tokens, from
  the replicas' stats in /admin/replicas).
- `pinning-engine`: the same conversations on the engine alone (no Ray, HTTP or Redis):
  TTFT with the previous turn cached and with nothing cached, and the best hit rate a
  prefix cache can reach on them; the bound the `pinning` figures are read against.
- `overhead`: what nginx + router add to a 1-token completion, against the engine
  deployment called directly through a Serve DeploymentHandle from a Ray driver connected
  to the stack (the same hop the router itself makes). Sequential requests, the paths
  interleaved call by call. `--direct-ingress` also times the router replica's own HTTP
  server (Serve's direct ingress, an experimental Serve setting the stack does not use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "infra" / "results"
# words of the tiny model's training corpus: each is one or a few tokens
WORDS = ("the quick brown fox jumps over lazy dog journey thousand miles begins with single "
         "step question glitters gold best times worst wisdom age belief server request "
         "prompt model token layer cache keys values tensor parallel router user assistant "
         "system message sea wide deep sings sailors sleep weather paris sunny warm").split()


def driver_env() -> None:
    """Environment of a script that connects to the local stack's Ray as a driver (the
    overhead mode here, infra/chaos.py, infra/soak.py): stay on 127.0.0.1, where the
    stack's Ray listens, and use its token auth (~/.ray/auth_token; Ray turns it on by
    itself only for address="auto"). Ray reads both when first imported, so the scripts'
    main() calls this before anything imports ray; importing this module changes nothing.
    The driver also takes the stack's Serve settings (cluster/ray.env): its handle then
    reaches the engine the way the router's does (the overhead mode compares the two)."""
    from cluster.ray_env import ray_env

    wanted = {**ray_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    missing = {k: v for k, v in wanted.items() if k not in os.environ}
    if missing and "ray" in sys.modules:
        raise RuntimeError(f"set {missing} before ray is imported (Ray reads them then)")
    os.environ.update(missing)


# ---- one request and its measurements -----------------------------------------------


@dataclass
class Turn:
    """One chat request as the client saw it. Times are monotonic seconds."""

    session: str
    turn: int
    started: float
    content: str = ""  # the user message sent
    status: int = 0  # HTTP status; 0 when the connection failed before one
    replica: str = ""
    ttft_s: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""  # an error event, a broken stream, a refusal, or "hang"
    retries: int = 0  # refusals (429/503) retried after their Retry-After
    done: bool = False  # [DONE] arrived
    ended: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status == 200

    @property
    def ok(self) -> bool:
        return self.accepted and self.done and not self.error

    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass(frozen=True)
class LoadConfig:
    """What one load run sends; each default exists here once (the CLI is built from it)."""

    url: str = "http://127.0.0.1:8080"
    clients: int = 4
    turns: int = 4  # turns per session; a client then starts a new session
    max_tokens: int = 16
    user_words: int = 24  # words in each user message
    duration: float = 30.0  # seconds; clients stop starting turns after it
    max_requests: int = 200  # over all clients
    request_timeout: float = 60.0  # a stream not ended by then is a hang
    retries: int = 2  # a 429/503 is retried after its Retry-After, as the openai client does
    temperature: float = 0.0
    seed: int = 0


def user_message(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def chat_turn(http: aiohttp.ClientSession, config: LoadConfig, session: str, turn: int,
                    content: str, record: Turn | None = None) -> Turn:
    """One streaming chat turn of `session`; never raises, never waits past the timeout.
    Pass `record` to watch the turn while it runs (its status, replica, first token)."""
    record = record or Turn(session, turn, time.monotonic(), content)
    body = {"model": "tpserve", "messages": [{"role": "user", "content": content}],
            "max_tokens": config.max_tokens, "temperature": config.temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "session": {"append": turn > 0}}
    try:
        await asyncio.wait_for(_attempts(http, config, body, session, record),
                               config.request_timeout)
    except TimeoutError:
        record.error = "hang"
    except (aiohttp.ClientError, OSError, ValueError) as e:
        record.error = record.error or f"{type(e).__name__}: {e}"[:200]
    record.ended = time.monotonic()
    if record.accepted and not record.done and not record.error:
        record.error = "stream ended without [DONE]"
    return record


async def _attempts(http: aiohttp.ClientSession, config: LoadConfig, body: dict[str, Any],
                    session: str, record: Turn) -> None:
    """The request, and up to config.retries more after a 429/503 (its Retry-After, at
    most 2 s): a refusal is not an accepted request, and clients retry it."""
    while True:
        wait = await _stream(http, config.url, body, session, record)
        if wait is None or record.retries >= config.retries:
            return
        record.retries += 1
        await asyncio.sleep(wait)


async def _stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], session: str,
                  record: Turn) -> float | None:
    """One attempt; the seconds to wait before retrying it, or None when it is final."""
    async with http.post(f"{url}/v1/chat/completions", json=body,
                         headers={"X-Session-ID": session}) as resp:
        record.status = resp.status
        record.replica = resp.headers.get("X-Replica-ID", "")
        if resp.status != 200:
            record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            if resp.status in (429, 503):
                retry_after = resp.headers.get("Retry-After", "1")
                return min(2.0, float(retry_after)) if retry_after.isdigit() else 1.0
            return None
        record.error = ""  # an earlier attempt's refusal
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                record.done = True
                return None
            _event(record, json.loads(line[6:]))
    return None


def _event(record: Turn, event: dict[str, Any]) -> None:
    if "error" in event:
        record.error = f"error event: {event['error'].get('message', '')}"[:200]
        return
    if event.get("usage"):
        record.prompt_tokens = event["usage"]["prompt_tokens"]
        record.completion_tokens = event["usage"]["completion_tokens"]
    if event.get("choices"):
        now = time.monotonic()
        if record.ttft_s is None:
            record.ttft_s = now - record.started
        record.token_times.append(now)


# ---- clients ------------------------------------------------------------------------


@dataclass
class Budget:
    """Shared by the clients of one run: stop at the deadline or the request count."""

    deadline: float
    left: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> bool:
        if self.stop.is_set() or self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        self.left -= 1
        return True


async def client(http: aiohttp.ClientSession, config: LoadConfig, index: int, budget: Budget,
                 records: list[Turn], words: Callable[[int], int] | None = None) -> None:
    """Sessions of `config.turns` turns each, one turn at a time, until the budget ends.
    `words(turn)` sizes the user message of each turn (default: config.user_words)."""
    rng = random.Random(config.seed * 1000 + index)
    n = 0
    while True:
        session = f"load-{index}-{n}-{rng.getrandbits(32):08x}"
        for turn in range(config.turns):
            if not budget.take():
                return
            size = words(turn) if words else config.user_words
            records.append(await chat_turn(http, config, session, turn,
                                           user_message(rng, size)))
        n += 1


async def run_clients(config: LoadConfig, records: list[Turn], budget: Budget | None = None,
                      words: Callable[[int], int] | None = None) -> float:
    """Run the clients until the budget ends; the wall time in seconds."""
    budget = budget or Budget(time.monotonic() + config.duration, config.max_requests)
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=max(8, 2 * config.clients))
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http, config, i, budget, records, words)
                               for i in range(config.clients)))
    return time.monotonic() - started


# ---- summaries ----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def ms(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, q in (("p50", 50), ("p99", 99)):
        v = percentile(values, q)
        out[name] = None if v is None else round(v * 1e3, 2)
    return out


def sessions_moved(records: list[Turn]) -> int:
    """Sessions whose accepted turns were served by more than one replica."""
    seen: dict[str, set[str]] = {}
    for r in records:
        if r.accepted and r.replica:
            seen.setdefault(r.session, set()).add(r.replica)
    return sum(len(replicas) > 1 for replicas in seen.values())


def summarize(records: list[Turn], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    return {
        "requests": len(records), "ok": len(ok),
        "refused": sum(not r.accepted and r.error != "hang" for r in records),
        "failed_accepted": sum(r.accepted and not r.ok for r in records),
        "hung": sum(r.error == "hang" for r in records),
        "retried": sum(r.retries > 0 for r in records),
        "ttft_ms": ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": ms([gap for r in ok for gap in r.itl_s()]),
        "output_tokens_per_s": round(sum(r.completion_tokens for r in ok) / wall_s, 1)
        if wall_s > 0 else None,
        "sessions": len({r.session for r in records}),
        "sessions_moved": sessions_moved(records),
        "wall_s": round(wall_s, 1),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def environment() -> dict[str, Any]:
    """Host, versions, git revision and command of a result line."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip() or None
    except OSError:
        rev = None
    import ray

    return {"git_rev": rev,
            "host": {"cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count(), "python": platform.python_version(),
                     "ray": ray.__version__},
            "command": " ".join([f"python -m infra.{Path(sys.argv[0]).stem}",
                                 *sys.argv[1:]]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def emit(row: dict[str, Any], out: str | None) -> None:
    """Print one JSON line and append it to `out`."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")


def script_args(prog: str, description: str, config_cls: type, default_out: str,
                argv: list[str] | None,
                extra: Callable[[argparse.ArgumentParser], None] | None = None,
                ) -> tuple[Any, str | None, argparse.Namespace]:
    """The command line of a script driven by a config dataclass: one flag per field, and
    --out (a results file, '-' for none). Returns (config, out, all the arguments)."""
    from infra.cli import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, config_cls)
    parser.add_argument("--out", default=str(RESULTS / default_out),
                        help="append the JSON line here ('-' for none)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    return config_from_args(args, config_cls), None if args.out == "-" else args.out, args


# ---- the admin API: replica stats ---------------------------------------------------


def admin_replicas(edge: str, token: str) -> dict[str, Any]:
    req = urllib.request.Request(f"{edge}/admin/replicas",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def hit_tokens(edge: str, token: str) -> int:
    """Prompt tokens served from the prefix cache so far, over the live replicas."""
    rows = admin_replicas(edge, token)["replicas"]
    return sum((r.get("prefix_cache_hit_blocks") or 0) * (r.get("block_size") or 0)
               for r in rows)


# ---- modes ----------------------------------------------------------------------------


def load_mode(config: LoadConfig, out: str | None, local: bool) -> dict[str, Any]:
    """The load run; on a fresh local stack unless the URL was given."""
    if not local:
        return _load_row(config, out)
    from infra.stack import local_stack

    with local_stack() as stack:
        return _load_row(LoadConfig(**{**asdict(config), "url": stack.edge}), out,
                         {"stack": "local", "model": "tiny", "tp": 2,
                          "replicas": stack.config.replicas})


def _load_row(config: LoadConfig, out: str | None, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    records: list[Turn] = []
    wall = asyncio.run(run_clients(config, records))
    row = {"kind": "load", **summarize(records, wall), "config": asdict(config),
           **(extra or {}), **environment()}
    emit(row, out)
    return row


# A Llama shape for the pinning payoff on CPU: the built-in tiny model (hidden 64) prefills
# 1,000 tokens in about one decode step, so its TTFT is all fixed cost and no cache can
# show; this one prefills 1,200 tokens in ~0.6 s at tp=2 on 2 cores (~0.1 s for 170 new
# tokens after a cached prefix), a real model's proportions. Random weights
# (load_format=random), the tiny tokenizer.
PREFILL_MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6,
                 "num_attention_heads": 12, "num_key_value_heads": 4,
                 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": False}
PREFILL_MODEL_VERSION = "load-llama-v2"


def prefill_model_dir() -> str:
    """A config-only checkpoint (config.json + the tiny tokenizer) of PREFILL_MODEL, made
    once in the tpserve cache; serve it with load_format=random."""
    from transformers import LlamaConfig

    from replicas.tiny import build_tokenizer, cache_root, special_token_ids

    path = Path(cache_root()) / PREFILL_MODEL_VERSION
    if (path / "config.json").exists():
        return str(path)
    tmp = Path(str(path) + f".tmp-{os.getpid()}")
    vocab = build_tokenizer(tmp)
    config = LlamaConfig(vocab_size=vocab, **PREFILL_MODEL, **special_token_ids(),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(str(tmp))
    try:
        os.rename(tmp, path)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def engine_for(model: str) -> dict[str, Any]:
    """EngineConfig fields of a named load model: "tiny" (built in) or "prefill"."""
    if model == "tiny":
        return {"tp": 2}
    if model == "prefill":
        return {"tp": 2, "model": prefill_model_dir(), "load_format": "random"}
    raise ValueError(f"model={model!r}: use 'tiny' or 'prefill'")


@dataclass(frozen=True)
class PinningConfig:
    """The pinning-payoff run: conversations whose history grows past history_tokens."""

    # one conversation at a time: on 2 cores a second one would queue behind the first's
    # prefill and measure the queue, not the cache
    clients: int = 1
    # 20 x 4 turns >= 3 per side: random routing's TTFT is bimodal (the last turn's replica
    # or not, 1 time in `replicas`), and with 5 sessions its p50 moved 262-429 ms run to run
    sessions: int = 20
    turns: int = 6
    first_words: int = 300  # the first user message; later ones add `words` each
    words: int = 120
    max_tokens: int = 8
    # random routing still lands on the replica of the previous turn 1 time in `replicas`:
    # at 4 that luck keeps random's p50 near the pinned one (ratio 0.36 with 27 ms of stack
    # cost per turn, 0.30-0.35 even with none); 8 replicas, still few for a cluster, make it
    # 1 in 8 (0.25). `--pin-replicas 4` gives the other row of the README's table.
    replicas: int = 8
    history_tokens: int = 1000  # the summary checks the last turns' prompts exceed this
    model: str = "prefill"  # "prefill" (PREFILL_MODEL) or "tiny"


async def _conversations(config: PinningConfig, url: str, records: list[Turn]) -> float:
    load = LoadConfig(url=url, clients=config.clients, turns=config.turns,
                      max_tokens=config.max_tokens, duration=3600.0,
                      max_requests=config.clients * config.sessions * config.turns,
                      request_timeout=120.0)
    budget = Budget(time.monotonic() + 3600.0, load.max_requests)
    return await run_clients(load, records, budget,
                             lambda turn: config.first_words if turn == 0 else config.words)


def pinning_side(config: PinningConfig, routing: str) -> dict[str, Any]:
    """One side of the comparison on a fresh stack with the given routing."""
    from infra.stack import local_stack

    with local_stack(engine_for(config.model), replicas=config.replicas, routing=routing,
                     num_cpus=max(8, 2 * config.replicas + 2)) as stack:
        warm: list[Turn] = []  # one short request per replica path: imports, first steps
        asyncio.run(run_clients(LoadConfig(url=stack.edge, clients=2, turns=1, max_tokens=2,
                                           max_requests=4, seed=99), warm))
        time.sleep(2.5)  # replicas publish stats every second
        hits_before = hit_tokens(stack.edge, stack.token)
        records: list[Turn] = []
        wall = asyncio.run(_conversations(config, stack.edge, records))
        time.sleep(2.5)
        hits = hit_tokens(stack.edge, stack.token) - hits_before
    late = [r for r in records if r.ok and r.turn >= 2]
    prompt = sum(r.prompt_tokens for r in records if r.ok)
    return {"routing": routing, **summarize(records, wall),
            "ttft_turn3plus_ms": ms([r.ttft_s for r in late if r.ttft_s is not None]),
            "ttft_turn3plus_mean_ms": round(1e3 * statistics.mean(
                r.ttft_s for r in late if r.ttft_s is not None), 2) if late else None,
            "prefix_hit_rate": round(hits / prompt, 3) if prompt else None,
            "max_prompt_tokens": max((r.prompt_tokens for r in records), default=0)}


def pinning_mode(config: PinningConfig, out: str | None) -> dict[str, Any]:
    pinned = pinning_side(config, "pinned")
    random_side = pinning_side(config, "random")
    ratio = None
    if pinned["ttft_turn3plus_ms"]["p50"] and random_side["ttft_turn3plus_ms"]["p50"]:
        ratio = round(pinned["ttft_turn3plus_ms"]["p50"]
                      / random_side["ttft_turn3plus_ms"]["p50"], 3)
    row = {"kind": "pinning", "pinned": pinned, "random": random_side,
           "ttft_turn3plus_p50_ratio_pinned_over_random": ratio,
           "target_ratio": 1 / 3, "met": ratio is not None and ratio <= 1 / 3,
           "history_past_target": min(pinned["max_prompt_tokens"],
                                      random_side["max_prompt_tokens"])
           > config.history_tokens,
           "config": asdict(config), "stack": "local", "model": config.model, "tp": 2,
           **environment()}
    emit(row, out)
    return row


def cached_prefix(previous: list[int], prompt: list[int], block_size: int) -> int:
    """Tokens of `prompt` a prefix cache holding `previous` (the last turn's prompt and
    the tokens it generated) can serve: the common prefix in whole blocks, leaving at least
    one token to compute (the scheduler's rule)."""
    common = 0
    for a, b in zip(previous, prompt, strict=False):
        if a != b:
            break
        common += 1
    return min(common, len(prompt) - 1) // block_size * block_size


async def _engine_turns(engine: Any, config: PinningConfig, cold_token: int = 100
                        ) -> list[dict[str, Any]]:
    """The pinning mode's conversations on one engine, turn after turn as the router sends
    them (history re-rendered with the chat template, the reply as text). Per turn: the
    TTFT with the previous turn in the cache (pinned), the TTFT of the same prompt with
    nothing cached (its first token changed to one no other prompt starts with: cold_token,
    cold_token + 1, ...), and the tokens the cache could serve at best."""
    from replicas import SamplingParams

    rng = random.Random(config.clients * 1000 + config.sessions)
    reply = SamplingParams(max_tokens=config.max_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    turns: list[dict[str, Any]] = []
    for _ in range(config.sessions):
        messages: list[dict[str, str]] = []
        previous: list[int] = []
        for turn in range(config.turns):
            words = config.first_words if turn == 0 else config.words
            messages.append({"role": "user", "content": user_message(rng, words)})
            ids = engine.tokenizer.apply_chat_template(messages)
            start, ttft, out, text = time.perf_counter(), None, [], ""
            async for delta in engine.add_request(ids, reply):
                ttft = ttft or time.perf_counter() - start
                out += delta.token_ids
                text += delta.text
            start = time.perf_counter()
            async for _ in engine.add_request([cold_token + len(turns)] + ids[1:], one):
                cold = time.perf_counter() - start
            turns.append({"turn": turn, "prompt": len(ids), "pinned_s": round(ttft, 4),
                          "cold_s": round(cold, 4),
                          "cacheable": cached_prefix(previous, ids,
                                                     engine.config.block_size)})
            previous = ids + out
            messages.append({"role": "assistant", "content": text})
    return turns


def pinning_engine_mode(config: PinningConfig, out: str | None) -> dict[str, Any]:
    """The pinning mode's conversations on the engine alone (no Ray, HTTP or Redis): what
    the prefix cache can give at best, against which the stack's figures are read."""
    from replicas import Engine, EngineConfig

    with Engine(EngineConfig(**engine_for(config.model))) as engine:
        warm = PinningConfig(sessions=1, turns=2, model=config.model)
        asyncio.run(_engine_turns(engine, warm, cold_token=50))
        turns = asyncio.run(_engine_turns(engine, config))
    late = [t for t in turns if t["turn"] >= 2]
    pinned = ms([t["pinned_s"] for t in late])["p50"]
    cold = ms([t["cold_s"] for t in late])["p50"]
    row = {"kind": "pinning_engine", "ttft_turn3plus_p50_ms": {"pinned": pinned,
                                                              "cold": cold},
           "ratio": round(pinned / cold, 3) if pinned and cold else None,
           "new_tokens_turn3plus_p50": percentile(
               [t["prompt"] - t["cacheable"] for t in late], 50),
           "best_hit_rate": round(sum(t["cacheable"] for t in turns)
                                  / sum(t["prompt"] for t in turns), 3),
           "max_prompt_tokens": max(t["prompt"] for t in turns), "turns": turns,
           "config": asdict(config), "model": config.model, "tp": 2, **environment()}
    emit(row, out)
    return row


async def _overhead(edge: str, serve_url: str, router_url: str, calls: int, warmup: int = 20,
                    seed: int = 0) -> dict[str, list[float]]:
    """`calls` sequential 1-token completions per path, interleaved call by call in a
    shuffled order each round (no path always follows another or runs in a burst), after
    `warmup` untimed rounds (connections, imports, the prefix cache). Every path sends the
    same prompt and parameters, and each call is timed the same way: from the call until
    the whole response is read. (The handle is made inside the event loop: Serve may run
    its router on the caller's loop.) `router_url`: the router replica's own HTTP server
    (Serve's direct ingress), where nginx sends requests."""
    from ray import serve

    from cluster.control import APP_NAME, ENGINE

    handle = serve.get_deployment_handle(ENGINE, APP_NAME).options(stream=True)
    body = {"model": "tpserve", "prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0.0}
    request = {"prompt": [5, 6, 7, 8], "params": {"max_tokens": 1, "temperature": 0.0}}
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as http:
        async def post(base: str) -> None:
            async with http.post(f"{base}/v1/completions", json=body,
                                 headers={"X-Session-ID": "overhead-1"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

        async def direct() -> None:
            async for _ in handle.generate.remote(request):
                pass

        paths: dict[str, Callable[[], Awaitable[None]]] = {
            "direct_handle": direct, "nginx_router": lambda: post(edge),
            "router": lambda: post(router_url), "serve_router": lambda: post(serve_url)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(warmup + calls):
            order = list(paths)
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                await paths[name]()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def overhead_mode(calls: int, out: str | None) -> dict[str, Any]:
    """Start a local stack, connect a Ray driver to it, time the paths."""
    import ray

    from infra.edge import configured_upstreams
    from infra.services import nginx_conf
    from infra.stack import local_stack

    with local_stack() as stack:
        stack.connect()
        try:
            upstreams = configured_upstreams(nginx_conf(Path(stack.config.state_dir)))
            serve_url = f"http://127.0.0.1:{stack.config.serve_port}"
            if upstreams == [serve_url.removeprefix("http://")]:
                raise RuntimeError("nginx is on Serve's proxy, not on the router replica: "
                                   "is RAY_SERVE_ENABLE_DIRECT_INGRESS=0 in the environment?")
            times = asyncio.run(_overhead(stack.edge, serve_url, f"http://{upstreams[0]}",
                                          calls))
        finally:
            ray.shutdown()
    row = overhead_row(times)
    emit(row, out)
    return row


def overhead_row(times: dict[str, list[float]]) -> dict[str, Any]:
    """The result line of the overhead mode from each path's call times (seconds)."""
    from cluster.ray_env import ray_env

    p50 = {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
    added = p50["nginx_router"] - p50["direct_handle"]
    row = {"kind": "overhead", "calls_per_path": len(times["direct_handle"]),
           "p50_ms": p50, "p99_ms": {n: ms(t)["p99"] for n, t in times.items()},
           "added_p50_ms": round(added, 3),
           "nginx_p50_ms": round(p50["nginx_router"] - p50["router"], 3),
           "proxy_added_p50_ms": round(p50["serve_router"] - p50["direct_handle"], 3),
           "target_ms": 2.0, "met": added <= 2.0,
           "paths": {"direct_handle": "Ray driver -> DeploymentHandle (PinnedRouter, no "
                     "session) -> engine replica: the hop the router makes itself",
                     "nginx_router": "HTTP -> nginx -> the router replica's own server "
                     "(Serve's direct ingress; FastAPI, Redis pin, validation) -> engine "
                     "replica: the stack's path",
                     "router": "HTTP -> the router replica's own server -> engine replica "
                     "(no nginx)",
                     "serve_router": "HTTP -> Serve's proxy -> router -> engine replica "
                     "(the path without direct ingress)"},
           "serve_env": {k: os.environ.get(k) for k in ray_env()},
           "stack": "local", "model": "tiny", "tp": 2, **environment()}
    return row


# ---- the README's table -------------------------------------------------------------------

TABLE_FILES = ("load_cpu.jsonl", "pinning_cpu.jsonl", "overhead_cpu.jsonl", "chaos_cpu.jsonl",
               "soak_cpu.jsonl")


def _cell(row: dict[str, Any]) -> tuple[str, str, str]:
    """(what was measured, the figures, the target) of one result line."""
    kind, c = row["kind"], row.get("config", {})
    if kind == "load":
        return (f"load: {c['clients']} clients x {c['turns']}-turn sessions, "
                f"{c['max_tokens']} tokens/turn",
                f"TTFT p50/p99 {row['ttft_ms']['p50']}/{row['ttft_ms']['p99']} ms; ITL "
                f"p50/p99 {row['itl_ms']['p50']}/{row['itl_ms']['p99']} ms; "
                f"{row['output_tokens_per_s']} tok/s; {row['requests']} requests: "
                f"{row['refused']} refused, {row['failed_accepted']} failed, {row['hung']} "
                f"hung, {row.get('retried', 0)} retried after a 429/503; sessions moved "
                f"{row['sessions_moved']}/{row['sessions']}", "—")
    if kind == "pinning":
        p, r = row["pinned"], row["random"]
        return (f"pinning payoff ({row['model']} model, {c['replicas']} replicas, prompts up "
                f"to {min(p['max_prompt_tokens'], r['max_prompt_tokens'])} tokens)",
                f"TTFT turns >= 3 p50: pinned {p['ttft_turn3plus_ms']['p50']} ms, random "
                f"{r['ttft_turn3plus_ms']['p50']} ms (ratio "
                f"{row['ttft_turn3plus_p50_ratio_pinned_over_random']}); prefix-cache hit "
                f"rate pinned {p['prefix_hit_rate']}, random {r['prefix_hit_rate']}",
                "ratio <= 0.33")
    if kind == "pinning_engine":
        t = row["ttft_turn3plus_p50_ms"]
        return (f"pinning payoff, engine alone ({row['model']} model, no Ray/HTTP/Redis, "
                f"prompts up to {row['max_prompt_tokens']} tokens)",
                f"TTFT turns >= 3 p50: previous turn cached {t['pinned']} ms, nothing "
                f"cached {t['cold']} ms (ratio {row['ratio']}); new tokens per turn p50 "
                f"{row['new_tokens_turn3plus_p50']}; best possible prefix-cache hit rate "
                f"{row['best_hit_rate']}", "— (the bound of the row above)")
    if kind == "overhead":
        p50 = row["p50_ms"]
        from cluster.ray_env import ray_env
        from infra.edge import DIRECT_INGRESS_ENV

        # rows from before direct ingress (no "router" path) are labelled by the path instead
        unlike = {k: v for k, v in row.get("serve_env", {}).items()
                  if k in ray_env() and v != ray_env()[k]
                  and ("router" in p50 or k != DIRECT_INGRESS_ENV)}
        what = ("router overhead: 1-token completion"
                + (f" ({', '.join(f'{k}={v}' for k, v in unlike.items())}, not "
                   "cluster/ray.env's)" if unlike else ""))
        if "router" in p50:  # nginx on the router replica's own server (direct ingress)
            return (what, f"p50: engine handle {p50['direct_handle']} ms, nginx + router "
                    f"{p50['nginx_router']} ms (router alone {p50['router']} ms); added "
                    f"{row['added_p50_ms']} ms (nginx {row['nginx_p50_ms']}); through "
                    f"Serve's proxy instead {p50['serve_router']} ms, added "
                    f"{row['proxy_added_p50_ms']} ms", "added <= 2 ms")
        return (what,  # rows from before direct ingress: nginx -> Serve's proxy -> router
                f"p50: engine handle {p50['direct_handle']} ms, Serve + router "
                f"{p50['serve_router']} ms, nginx + router {p50['nginx_router']} ms; added "
                f"{row['added_p50_ms']} ms (nginx {row['nginx_p50_ms']})"
                + (f"; Serve proxy + FastAPI floor (GET /healthz) {p50['serve_healthz']} ms"
                   if "serve_healthz" in p50 else "")
                + (f"; Serve direct ingress (then experimental, not the stack's setting; no "
                   f"nginx): router {p50['ingress_router']} ms, added "
                   f"{row['direct_ingress_added_p50_ms']} ms, GET /healthz "
                   f"{p50['ingress_healthz']} ms" if "ingress_router" in p50 else ""),
                "added <= 2 ms")
    if kind == "chaos":
        return (f"chaos: {c['faults']} under {c['clients']} clients",
                f"accepted and failed: {row['failed_on_killed_replica']} on the killed "
                f"replica ({row['killed_streams_ended_with_error_event']} ended with an "
                f"error event), {row['failed_in_router_crash']} in a router crash, "
                f"{row['failed_other']} other; hung {row['hung']}; sessions lost "
                f"{row['sessions_lost']}/{row['sessions_checked']}; refused "
                f"{row['refused']}; turns unrecorded while Redis was down "
                f"{row['turns_unrecorded_redis_down']}",
                "0 other failures, 0 hangs, 0 sessions lost"
                + (" (a crash: streams through the router break)"
                   if "router_kill" in c["faults"] else ""))
    if kind == "soak":
        return (f"soak: {c['duration']:.0f} s, {c['clients']} clients",
                f"RSS growth after {c['warmup']:.0f} s warm-up, max over router and engine "
                f"processes {row['max_growth_bounded_mib']} MiB; {row['requests']} requests, "
                f"{row['failed_accepted']} failed", f"<= {row['bound_mib']:.0f} MiB")
    raise ValueError(f"unknown result kind {kind!r}")


def table(results: str | Path = RESULTS) -> str:
    """A markdown table of the results files (JSON lines) under `results`, for the README."""
    out = ["| measurement | result | target | met | rev |", "|---|---|---|---|---|"]
    for name in TABLE_FILES:
        path = Path(results) / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                what, figures, target = _cell(row)
                met = "—" if "met" not in row else ("yes" if row["met"] else "**no**")
                out.append(f"| {what} | {figures} | {target} | {met} | {row['git_rev']} |")
    return "\n".join(out)


# ---- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from infra.cli import add_config_arguments

    parser = argparse.ArgumentParser(prog="python -m infra.load",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["load", "pinning", "pinning-engine", "overhead"],
                        default="load")
    parser.add_argument("--out", help="append the JSON lines here (default: "
                        "infra/results/<mode>_cpu.jsonl; '-' for none)")
    parser.add_argument("--calls", type=int, default=300, help="overhead: calls per path")
    parser.add_argument("--table", metavar="DIR", nargs="?", const=str(RESULTS),
                        help="print the results under DIR (default infra/results) as the "
                        "README's markdown table")
    add_config_arguments(parser, LoadConfig, {"url": None})
    group = parser.add_argument_group("pinning")
    for f in PinningConfig.__dataclass_fields__.values():
        group.add_argument(f"--pin-{f.name.replace('_', '-')}", dest=f"pin_{f.name}",
                           type=type(f.default), default=f.default,
                           help=f"(default: {f.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    driver_env()
    from infra.cli import config_from_args

    args = build_parser().parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    stem = {"pinning-engine": "pinning"}.get(args.mode, args.mode)  # read with its stack row
    out = None if args.out == "-" else (args.out or str(RESULTS / f"{stem}_cpu.jsonl"))
    if args.mode in ("pinning", "pinning-engine"):
        fields = PinningConfig.__dataclass_fields__
        config = PinningConfig(**{n: getattr(args, f"pin_{n}") for n in fields})
        if args.mode == "pinning":
            pinning_mode(config, out)
        else:
            pinning_engine_mode(config, out)
    elif args.mode == "overhead":
        overhead_mode(args.calls, out)
    else:
        local = args.url is None
        args.url = args.url or LoadConfig.url
        load_mode(config_from_args(args, LoadConfig), out, local)
    return 0


if __name__ == "__main__":
    sys.exit(main())
