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
  interleaved call by call. (Rows from before that flag was removed also timed the router
  replica's own HTTP server, Serve's direct ingress; the table still reads them.)

The modes live here; the streaming client in infra/client.py, the run summary and a
result line's frame in infra/results.py, the README table (`--table`) in
infra/report.py, the overhead mode in infra/overhead.py, and the engine-alone run
(`pinning-engine`) and the load models in replicas/bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from infra.client import Budget, LoadConfig, Turn, run_clients, user_message
from infra.overhead import overhead_mode
from infra.report import TABLE_FILES, table  # noqa: F401 (TABLE_FILES: tests/test_chaos.py)
from infra.results import RESULTS, driver_env, emit, environment, ms, percentile, summarize

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
    """One side of the comparison on a fresh local stack with the given routing."""
    from infra.stack import auto_router_replicas, local_stack
    from replicas.bench import engine_for

    # (the replicas' tp=2 ranks, a third replica's room, each router replica's CPU)
    with local_stack(engine_for(config.model), replicas=config.replicas, routing=routing,
                     num_cpus=max(7, 2 * config.replicas + 1) + auto_router_replicas()
                     ) as stack:
        return pinning_conversations(config, stack.edge, stack.token, routing)


def pinning_conversations(config: PinningConfig, edge: str, token: str, routing: str
                          ) -> dict[str, Any]:
    """The conversations on a running stack (its nginx at `edge`, its admin token) whose
    router routes by `routing`: TTFT of turns >= 3, the replicas' prefix-cache hit rate
    over them (from /admin/replicas), the longest prompt."""
    warm: list[Turn] = []  # one short request per replica path: imports, first steps
    asyncio.run(run_clients(LoadConfig(url=edge, clients=2, turns=1, max_tokens=2,
                                       max_requests=4, seed=99), warm))
    time.sleep(2.5)  # replicas publish stats every second
    hits_before = hit_tokens(edge, token)
    records: list[Turn] = []
    wall = asyncio.run(_conversations(config, edge, records))
    time.sleep(2.5)
    hits = hit_tokens(edge, token) - hits_before
    late = [r for r in records if r.ok and r.turn >= 2]
    prompt = sum(r.prompt_tokens for r in records if r.ok)
    return {"routing": routing, **summarize(records, wall),
            "ttft_turn3plus_ms": ms([r.ttft_s for r in late if r.ttft_s is not None]),
            "ttft_turn3plus_mean_ms": round(1e3 * statistics.mean(
                r.ttft_s for r in late if r.ttft_s is not None), 2) if late else None,
            "prefix_hit_rate": round(hits / prompt, 3) if prompt else None,
            "max_prompt_tokens": max((r.prompt_tokens for r in records), default=0)}


def pinning_mode(config: PinningConfig, out: str | None) -> dict[str, Any]:
    row = {**pinning_row(config, pinning_side(config, "pinned"),
                         pinning_side(config, "random")),
           "stack": "local", "model": config.model, "tp": 2, **environment()}
    emit(row, out)
    return row


def pinning_row(config: PinningConfig, pinned: dict[str, Any], random_side: dict[str, Any]
                ) -> dict[str, Any]:
    """The comparison of the two sides (pinning_conversations' dicts): TTFT p50 of turns
    >= 3, pinned over random, against the target of 1/3."""
    ratio = None
    if pinned["ttft_turn3plus_ms"]["p50"] and random_side["ttft_turn3plus_ms"]["p50"]:
        ratio = round(pinned["ttft_turn3plus_ms"]["p50"]
                      / random_side["ttft_turn3plus_ms"]["p50"], 3)
    return {"kind": "pinning", "pinned": pinned, "random": random_side,
            "ttft_turn3plus_p50_ratio_pinned_over_random": ratio,
            "target_ratio": 1 / 3, "met": ratio is not None and ratio <= 1 / 3,
            "history_past_target": min(pinned["max_prompt_tokens"],
                                       random_side["max_prompt_tokens"])
            > config.history_tokens,
            "config": asdict(config)}


def user_turns(config: PinningConfig) -> list[list[str]]:
    """The user messages of the engine-alone conversations: config.sessions of
    config.turns messages, the first of each config.first_words words long, the others
    config.words."""
    rng = random.Random(config.clients * 1000 + config.sessions)
    return [[user_message(rng, config.first_words if turn == 0 else config.words)
             for turn in range(config.turns)] for _ in range(config.sessions)]


def pinning_engine_mode(config: PinningConfig, out: str | None) -> dict[str, Any]:
    """The pinning mode's conversations on the engine alone (no Ray, HTTP or Redis): what
    the prefix cache can give at best, against which the stack's figures are read."""
    from replicas.bench import pinning_engine

    warmup = user_turns(PinningConfig(sessions=1, turns=2, model=config.model))
    turns = pinning_engine(config.model, user_turns(config), config.max_tokens, warmup)
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
