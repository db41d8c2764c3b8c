"""The real stack on a GPU machine, measured: `python -m infra.gpu_stack STEP ...`.

Steps (infra/device_stack.sh says how the stack's packages get onto a device machine; each
step is its own process, so the GPU is free between them):

- `checkpoint DIR`: a GLM-4-9B-shaped checkpoint (replicas/bench.py's SHAPES, random
  weights initialised by transformers in bf16 on the GPU) saved with `save_pretrained` as
  sharded safetensors with an index, and the built-in tiny tokenizer beside it.
- `engine DIR --out F`: the engine alone on it (replicas.Engine, no Ray): start-up and
  load throughput, the greedy tokens of PROMPT, and the load run's clients (LOAD, one
  turn each) driven straight into the engine.
- `stack DIR --state-dir S --engine-row F --out F`: a stack that `tpserve up --model DIR
  --detach --state-dir S` started: the replica's start-up and load throughput (its
  stats, through a Serve handle), a streaming chat through nginx -> router -> Serve with
  the openai client, its tokens against the engine row's, and the same load runs through
  nginx (infra/client.py's clients), with each stack process's CPU use over one of them;
  `--profile-dir D`: one more run with py-spy's samples of the router, the engine replica
  and the client in D. `--light`: the start, the chat and the prefix cache only (2-turn
  sessions of ~1,100-token prompts against one-turn chats of that length).
  The row's tp and replicas are the stack's (`tpserve up` records them).
- `pinning DIR --state-dir S --replicas N --out F`: session pinning's payoff on N tp=1
  GPU replicas: for routing pinned, then random, `tpserve up --model DIR --tp 1
  --replicas N --routing R` in S-R (a state directory each: Redis keeps the first
  side's sessions across `down`), infra/load.py's pinning conversations through nginx
  (one client, 20 sessions of 6 turns, histories past 1,000 tokens), `tpserve down`.

Each step prints one JSON line and appends it to --out. The rows of one H200 are in
infra/results/stack_gpu_h200.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from infra.client import Budget, LoadConfig, Turn, client, run_clients
from infra.results import emit, environment, summarize
from replicas.jsonlines import between

PROMPT = [{"role": "user", "content": "Tell me about the tensor-parallel replicas."}]
GREEDY_TOKENS = 32
# the stack's cost: 64 streaming clients, one-turn chats of 128 tokens each
LOAD = LoadConfig(clients=64, turns=1, max_tokens=128, user_words=24, duration=120.0,
                  max_requests=640, request_timeout=120.0)
# one client, one request at a time: the stack's latency without queueing
SEQUENTIAL = LoadConfig(clients=1, turns=1, max_tokens=16, user_words=24, duration=60.0,
                        max_requests=40, request_timeout=60.0, seed=3)
WARMUP = LoadConfig(clients=64, turns=1, max_tokens=8, user_words=24, duration=60.0,
                    max_requests=128, request_timeout=120.0, seed=7)


def make_checkpoint(path: str) -> dict[str, Any]:
    import torch
    import transformers

    from replicas.bench import hf_config
    from replicas.tiny import build_tokenizer

    started = time.perf_counter()
    config = hf_config("glm4-9b")
    config.dtype = torch.bfloat16
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    built = time.perf_counter()
    model.save_pretrained(path, max_shard_size="5GB")
    build_tokenizer(path)
    files = sorted(p.name for p in Path(path).iterdir())
    size = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    return {"kind": "gpu_checkpoint", "model": "glm4-9b-shaped", "files": files,
            "safetensors_bytes": size, "init_s": round(built - started, 1),
            "save_s": round(time.perf_counter() - built, 1),
            "gpu": torch.cuda.get_device_name()}


def load_gb_s(stats: dict[str, Any]) -> float | None:
    load = stats.get("startup_s", {}).get("load")
    return round(stats["weight_bytes"] / load / 1e9, 2) if load else None


async def engine_clients(engine: Any, config: LoadConfig, records: list[Turn]) -> float:
    """infra/client.py's one-turn clients (`client`: the same user messages, budget and
    parameters), each turn driven into the engine through the chat template instead of
    over HTTP; the wall time in seconds."""
    from replicas import SamplingParams

    assert config.turns == 1  # (the engine alone keeps no history)
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature,
                            ignore_eos=True)
    budget = Budget(time.monotonic() + config.duration, config.max_requests)

    async def engine_turn(session: str, turn: int, content: str) -> Turn:
        record = Turn(session, turn, time.monotonic(), content, status=200)
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": content}])
        record.prompt_tokens = len(ids)
        async for delta in engine.add_request(ids, params):
            if delta.token_ids:
                now = time.monotonic()
                record.ttft_s = record.ttft_s or now - record.started
                record.token_times.append(now)
                record.completion_tokens += len(delta.token_ids)
        record.done, record.ended = True, time.monotonic()
        return record

    started = time.monotonic()
    await asyncio.gather(*(client(engine_turn, config, i, budget, records)
                           for i in range(config.clients)))
    return time.monotonic() - started


def engine_run(engine: Any, config: LoadConfig) -> dict[str, Any]:
    records: list[Turn] = []
    wall = asyncio.run(engine_clients(engine, config, records))
    return summarize(records, wall)


def stack_run(edge: str, config: LoadConfig) -> dict[str, Any]:
    records: list[Turn] = []
    wall = asyncio.run(run_clients(LoadConfig(**{**asdict(config), "url": edge}), records))
    return summarize(records, wall)


# the stack's processes, by a part of their command line (Ray titles its workers)
PROCESSES = {"router": ":Router", "engine": ":Engine", "proxy": "ProxyActor",
             "controller": "ServeController", "nginx": "nginx", "redis": "redis-server",
             "raylet": "raylet", "gcs": "gcs_server",
             # the engine replica's engine process (replicas/engineproc.py) and the fork
             # server it came from (idle once it forked), by the server's command line
             # (its preload is the first fork server's of the process: replicas.engine in
             # a replica, maybe replicas.worker where ranks were spawned before)
             "engine_process": "multiprocessing.forkserver import main"}


def stack_pids() -> dict[str, list[int]]:
    from infra.procs import parent_pid, processes

    found: dict[str, list[int]] = {"client": [os.getpid()]}
    for pid, line in processes():  # (all but this process)
        for name, part in PROCESSES.items():
            if part in line:
                found.setdefault(name, []).append(pid)
    # the engine processes first: the fork servers' children, not the servers
    group = found.get("engine_process", [])
    servers = set(group)  # (a list being sorted reads as empty meanwhile)
    group.sort(key=lambda pid: parent_pid(pid) not in servers)
    return found


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    from infra import procs

    total: dict[str, float] = {}
    for name, group in pids.items():
        for pid in group:
            used = procs.cpu_seconds(pid)
            if used is not None:
                total[name] = total.get(name, 0.0) + used
    return total


ROUTER_TIMES = {"router_ttft": "tpserve_time_to_first_token_seconds",
                "engine_first_item": "tpserve_engine_first_item_seconds",
                # Serve's routing of the engine call (cluster/pinning.py): to each choice of
                # replicas (more of them than engine calls: requests chosen again)
                "routing_choose": "tpserve_engine_routing_seconds",
                # our choice itself (a new session's Redis claim in it)
                "choice": "tpserve_engine_choice_seconds",
                # Serve's probes of the chosen replica's queue length, the request waiting
                # (Serve's cache counted the replica full): a count a call, and their mean
                "queue_probe": "tpserve_engine_queue_probe_seconds",
                "router_loop_lag": "tpserve_loop_lag_seconds",
                # a chat turn's history written to Redis, before the stream's last event
                "history_append": "tpserve_history_append_seconds",
                # the direct data path's frames: the replica's write to the router's read
                "frame_age": "tpserve_data_path_frame_age_seconds"}


# an engine replica's way in, hop by hop, when the stack runs with TPSERVE_WAY_TRACE=1
# (cluster/waytrace.py): Serve's routing, the way over gRPC, Serve's dispatch
WAY_IN_HOPS = ("way_in_routing_ms", "way_in_transit_ms", "way_in_dispatch_ms")


def replica_inside(stats: dict[str, Any]) -> dict[str, Any]:
    """What a stack row records of the engine replica's stats (its last 512 requests):
    its way in (hop by hop when traced; and that of requests head-started), its
    preparation, its own TTFT and the engine's
    queue wait within it (admit_wait_ms), its loop lag."""
    return {"way_in_ms": stats.get("way_in_ms"), "prepare_ms": stats.get("prepare_ms"),
            "replica_ttft_ms": stats.get("replica_ttft_ms"),
            "admit_wait_ms": stats.get("admit_wait_ms"),
            "replica_loop_lag_ms": stats.get("loop_lag_ms"),
            **{key: stats[key] for key in (*WAY_IN_HOPS, "way_in_head_ms")
               if stats.get(key)}}


def head_start_share(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Of the requests that reached the engine replica between two of its stats, the
    share that came down the data connection ahead of their call (cluster/datapath.py's
    head start); None without the counts (an older replica, or a stats error)."""
    def count(stats: dict[str, Any], key: str) -> int | None:
        summary = stats.get(key)
        return summary.get("count") if isinstance(summary, dict) else None

    counts = [count(s, k) for s in (before, after) for k in ("way_in_ms", "way_in_head_ms")]
    if None in counts:
        return None
    way_in0, head0, way_in1, head1 = counts
    total = way_in1 - way_in0  # type: ignore[operator]
    return round((head1 - head0) / total, 3) if total else None  # type: ignore[operator]


def router_times(edge: str, session: str | None = None) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) of the router's ROUTER_TIMES histograms, every label (its
    /metrics through nginx: one router replica's, with several; with `session`, the one
    nginx sends that session's requests to): its time to first token
    (from taking a parsed request to its first delta) and, within it, from its call of
    the engine handle to the first item back, Serve's routing of that call, its event
    loop's lag and the data path's frames' age. Two readings around a run give that
    run's means (`means`)."""
    import re
    import urllib.request

    request = urllib.request.Request(f"{edge}/metrics",
                                     headers={"X-Session-ID": session} if session else {})
    with urllib.request.urlopen(request, timeout=30) as reply:
        text = reply.read().decode()
    return {key: tuple(sum(float(v) for v in re.findall(
                rf"^{name}_{part}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))
                for part in ("sum", "count"))  # type: ignore[misc]
            for key, name in ROUTER_TIMES.items()}


def means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
          ) -> dict[str, float]:
    """Each histogram's mean (ms) over what it recorded between two router_times, the
    choices of replicas per engine call (1.0: none chosen again) and Serve's queue-length
    probes per engine call (0: its cache always had room on the chosen replica)."""
    def count(key: str) -> float:
        return after[key][1] - before[key][1]

    out = {f"{key}_mean_ms": round((after[key][0] - before[key][0])
                                   / max(1.0, count(key)) * 1e3, 2) for key in before}
    calls = max(1.0, count("engine_first_item"))
    out["routing_choices_per_call"] = round(count("routing_choose") / calls, 3)
    out["queue_probes_per_call"] = round(count("queue_probe") / calls, 3)
    return out


def profiled_run(edge: str, config: LoadConfig, out_dir: str | None) -> dict[str, Any]:
    """A load run with each stack process's CPU use over it (cores), and, with out_dir
    and py-spy on PATH, py-spy's samples of the router, the engine replica and this
    client for PYSPY_S seconds from PYSPY_DELAY_S in (collapsed stacks, per thread)."""
    import shutil
    import subprocess

    pids = stack_pids()
    spies = []
    if out_dir and shutil.which("py-spy"):
        # (name, pid, flags): and the engine replica's samples of the thread holding the
        # GIL (--gil: their count over PYSPY_S * 100 is the share of time it is held; its
        # event loop and the engine's driver thread share it), read without stopping it
        runs = [(name, pid, "") for name in ("router", "engine", "engine_process", "client")
                for pid in pids.get(name, [])[:1]]
        runs += [("engine_gil", pid, " --gil --nonblocking")
                 for pid in pids.get("engine", [])[:1]]
        for name, pid, flags in runs:
            spies.append(subprocess.Popen(
                ["sh", "-c", f"sleep {PYSPY_DELAY_S}; exec py-spy record -p {pid} -d "
                 f"{PYSPY_S} -r 100 --threads{flags} -f raw -o {out_dir}/pyspy_{name}.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    before, started = cpu_seconds(pids), time.monotonic()
    row = stack_run(edge, config)
    wall = time.monotonic() - started
    after = cpu_seconds(pids)
    for spy in spies:
        spy.wait(timeout=60)
    row["cpu_cores"] = {name: round((after[name] - before.get(name, 0.0)) / wall, 2)
                        for name in after}
    row["pyspy"] = bool(spies)
    return row


PYSPY_DELAY_S, PYSPY_S = 2, 6
# load runs beyond the first two, each side (the engine alone, the stack): the comparison
# takes the mean of all of them
MORE_LOAD_RUNS = 2


def engine_step(model: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine alone under the stack's loads; `settings`: EngineConfig fields set
    otherwise (the row's `engine_set`; a stack compares with the engine row whose
    settings its replica shares, `engine_reference`)."""
    import torch

    from replicas import Engine, EngineConfig, SamplingParams

    settings = settings or {}
    started = time.perf_counter()
    engine = Engine(EngineConfig(model=model, tp=1, device="cuda", **settings))
    try:
        ready_s = time.perf_counter() - started
        stats = engine.stats()
        ids = engine.tokenizer.apply_chat_template(PROMPT)
        out = engine.generate([ids], SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0,
                                                    ignore_eos=True))[0]
        asyncio.run(engine_clients(engine, WARMUP, []))
        runs = [engine_run(engine, LOAD) for _ in range(2 + MORE_LOAD_RUNS)]
        stats_after = engine.stats()  # the last 512 requests: the second run's
        inside = {"engine_ttft_ms": stats_after["ttft_ms"],
                  "admit_wait_ms": stats_after["admit_wait_ms"]}
        sequential = engine_run(engine, SEQUENTIAL)
        peak = torch.cuda.max_memory_allocated()
        piece_steps = engine.stats()["piece_steps"]  # (read before shutdown drops them)
    finally:
        engine.shutdown()
    return {"kind": "gpu_engine", "model": "glm4-9b-shaped", "tp": 1, "engine_set": settings,
            "in_effect": {k: stats[k] for k in COMPARED_SETTINGS}, "piece_steps": piece_steps,
            "ready_s": round(ready_s, 2), "startup_s": stats["startup_s"],
            "weight_bytes": stats["weight_bytes"], "load_gb_s": load_gb_s(stats),
            "num_kv_blocks": stats["num_kv_blocks"], "prompt_ids": ids,
            "greedy_token_ids": list(out.token_ids), "load": runs[0], "load_repeat": runs[1],
            "load_more": runs[2:],
            "load_repeat_inside": inside,
            "load_config": asdict(LOAD), "sequential": sequential,
            "sequential_config": asdict(SEQUENTIAL), "peak_allocated_bytes": peak,
            "gpu": torch.cuda.get_device_name()}


# EngineConfig fields a stack's replica reports in its stats (their values in effect),
# which its reference engine row must share, with the value rows that lack one had
COMPARED_SETTINGS = {"piece_graph_tokens": 0}


def engine_reference(rows: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, Any]:
    """The last engine-alone row run with the settings of the replica whose `stats` these
    are (COMPARED_SETTINGS), or {}. An engine row's settings are those it recorded in
    effect (`in_effect`), else those it set (`engine_set`, rows from before)."""
    def settings(values: dict[str, Any]) -> dict[str, Any]:
        return {k: values.get(k, default) for k, default in COMPARED_SETTINGS.items()}

    want = settings(stats)
    return next((r for r in reversed(rows) if r.get("kind") == "gpu_engine" and settings(
        r.get("in_effect") or r.get("engine_set") or {}) == want), {})


def replica_stats(state_dir: str) -> dict[str, Any]:
    """The engine replica's own stats (start-up phases, weight bytes), from a Ray driver
    connected to the stack, through a Serve handle."""
    import ray
    from ray import serve

    from cluster.control import APP_NAME, ENGINE
    from infra.stack import Running

    async def stats() -> dict[str, Any]:  # (Serve runs the handle's router on this loop)
        handle = serve.get_deployment_handle(ENGINE, APP_NAME)
        return await asyncio.wait_for(handle.stats.remote(), 60)

    Running.recorded(state_dir).connect()
    try:
        return asyncio.run(stats())
    finally:
        ray.shutdown()


def _stats_or_error(state_dir: str) -> dict[str, Any]:
    """replica_stats, or {"error": ...} (a figure the row then lacks, not a failed row)."""
    try:
        return replica_stats(state_dir)
    except Exception as e:  # noqa: BLE001 - the rest is still worth measuring
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def replica_init_s(logs: str = "/tmp/ray/session_latest/logs/serve") -> float | None:
    """Seconds from Serve's "Started initializing replica" to "Finished initializing
    replica" in the (first) engine replica's log: its start-up as Serve saw it."""
    import datetime

    marks = {}
    for path in sorted(Path(logs).glob("replica_*_Engine_*.log"))[:1]:
        for line in path.read_text(errors="replace").splitlines():
            for mark in ("Started initializing", "Finished initializing"):
                if mark in line and mark not in marks:
                    stamp = " ".join(line.split()[1:3])  # INFO 2026-12-01 08:18:06,465 ...
                    marks[mark] = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
    if len(marks) < 2:
        return None
    return round((marks["Finished initializing"] - marks["Started initializing"])
                 .total_seconds(), 2)


def streaming_chat(edge: str, session: str = "gpu-stack-chat") -> dict[str, Any]:
    """PROMPT through nginx -> router -> Serve -> the GPU replica with the openai client,
    streamed, greedy, with the router's token-id extension; with the router's own TTFT of
    it (`router_ttft_ms`: from its parsed request to its first delta, the /metrics of the
    router replica nginx sends the session to, read around the call). The client's first use
    of its chat resources (a lazy import: ~20-50 ms here, more where its modules have no
    bytecode cached yet) happens before the clock starts: it is not the stack's time."""
    import openai

    client = openai.OpenAI(base_url=f"{edge}/v1", api_key="unused", max_retries=0)
    client.chat.completions  # noqa: B018 - (the lazy import, out of the timed request)
    before = router_times(edge, session)  # (the router replica the chat goes to)
    started = time.perf_counter()
    ttft, chunks, ids, text = None, 0, [], ""
    stream = client.chat.completions.create(
        model="tpserve", messages=PROMPT, max_tokens=GREEDY_TOKENS, temperature=0.0,
        stream=True, extra_body={"return_token_ids": True, "ignore_eos": True},
        extra_headers={"X-Session-ID": session})
    for chunk in stream:
        if not chunk.choices:
            continue
        ttft = ttft or time.perf_counter() - started
        chunks += 1
        choice = chunk.choices[0]
        ids += (choice.model_extra or {}).get("token_ids") or []
        text += choice.delta.content or ""
    total = time.perf_counter() - started
    return {"chunks": chunks, "ttft_ms": round(1e3 * (ttft or 0), 1),
            "total_ms": round(1e3 * total, 1), "token_ids": ids, "text_chars": len(text),
            "router_ttft_ms": one_request_ms(before, router_times(edge, session),
                                             "router_ttft")}


def one_request_ms(before: dict[str, tuple[float, float]],
                   after: dict[str, tuple[float, float]], key: str) -> float | None:
    """The one observation histogram `key` made between two router_times, in ms; None
    unless it made exactly one."""
    if after[key][1] - before[key][1] != 1:
        return None
    return round(1e3 * (after[key][0] - before[key][0]), 1)


# the prefix cache through the stack: sessions whose first turn is PREFIX_WORDS words
# (~1,060 tokens with the tiny tokenizer), the second turn's TTFT (history cached) against
# one-turn chats of the second turn's whole length (nothing cached)
PREFIX_SESSIONS, PREFIX_WORDS, PREFIX_NEXT_WORDS = 8, 900, 20


def engine_process_of(stats: dict[str, Any]) -> bool | None:
    """Whether the replica ran its engine in a process of its own (its stats name the
    child's pid, None when in the replica's own process); None when the stats failed."""
    if "engine_process" not in stats:
        return None
    return stats["engine_process"] is not None


def prefix_run(edge: str, token: str) -> dict[str, Any]:
    from infra.load import hit_tokens
    from infra.results import ms

    def run(config: LoadConfig, words: int, next_words: int) -> list[Turn]:
        records: list[Turn] = []
        asyncio.run(run_clients(config, records, None,
                                lambda turn: words if turn == 0 else next_words))
        return records

    base = LoadConfig(url=edge, clients=1, max_tokens=16, duration=300.0,
                      request_timeout=60.0)
    hits = hit_tokens(edge, token)
    pinned = run(LoadConfig(**{**asdict(base), "turns": 2, "seed": 11,
                               "max_requests": 2 * PREFIX_SESSIONS}),
                 PREFIX_WORDS, PREFIX_NEXT_WORDS)
    cold = run(LoadConfig(**{**asdict(base), "turns": 1, "seed": 12,
                             "max_requests": PREFIX_SESSIONS}),
               PREFIX_WORDS + PREFIX_NEXT_WORDS, 0)
    time.sleep(2.5)  # the replicas publish their stats every second
    second = [r for r in pinned if r.turn == 1 and r.ok]
    return {"sessions": PREFIX_SESSIONS, "ok": sum(r.ok for r in pinned + cold),
            "requests": len(pinned) + len(cold),
            "turn2_prompt_tokens": [r.prompt_tokens for r in second],
            "turn2_ttft_ms": ms([r.ttft_s for r in second if r.ttft_s is not None]),
            "cold_prompt_tokens": [r.prompt_tokens for r in cold if r.ok],
            "cold_ttft_ms": ms([r.ttft_s for r in cold if r.ok and r.ttft_s is not None]),
            "replicas": sorted({r.replica for r in pinned}),
            "prefix_hit_tokens": hit_tokens(edge, token) - hits}


def stack_step(model: str, state_dir: str, engine_row: str, profile_dir: str | None,
               light: bool = False) -> dict[str, Any]:
    """`light`: the replica's start, the front door and the prefix cache only (no load
    runs, no comparison with the engine)."""
    from cluster.datapath import head_start_on
    from cluster.engine import max_ongoing, switch_interval_ms
    from cluster.pinning import routing_tasks
    from cluster.ray_env import deviations
    from infra.stack import Running, read_state

    stack = Running.recorded(state_dir)
    shape = {"tp": read_state(state_dir).get("engine", {}).get("tp", 1),
             "replicas": stack.config.replicas, "router_replicas": stack.config.router_replicas,
             "data_path": stack.config.data_path}
    stats = _stats_or_error(state_dir)
    try:
        chat = streaming_chat(stack.edge)
    except Exception as e:  # noqa: BLE001 - the load run still says what the stack costs
        chat = {"error": f"{type(e).__name__}: {e}"[:300], "token_ids": None}
    try:  # the same chat in another session: a request after the first, for comparison
        again = streaming_chat(stack.edge, "gpu-stack-chat-again")
        chat["again"] = {k: again[k] for k in ("ttft_ms", "total_ms", "router_ttft_ms")}
    except Exception as e:  # noqa: BLE001 - (as the first's)
        chat["again"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if light:
        return {"kind": "gpu_stack_start", "model": "glm4-9b-shaped", **shape,
                "replica_init_s": replica_init_s(), "replica_startup_s": stats.get("startup_s"),
                "replica_start_s": stats.get("replica_start_s"),  # (as below)
                "weight_bytes": stats.get("weight_bytes"),
                "load_gb_s": load_gb_s(stats) if "weight_bytes" in stats else None,
                "stats_error": stats.get("error"), "chat": chat,
                "engine_process": engine_process_of(stats),
                "prefix": prefix_run(stack.edge, stack.token)}
    rows = [json.loads(line) for line in Path(engine_row).read_text().splitlines()
            if line.strip()] if engine_row else []
    engine = engine_reference(rows, stats)
    stack_run(stack.edge, WARMUP)
    load = stack_run(stack.edge, LOAD)
    before = router_times(stack.edge)
    replica_before = _stats_or_error(state_dir)
    repeat = profiled_run(stack.edge, LOAD, None)  # CPU use only
    inside: dict[str, Any] = means(before, router_times(stack.edge))
    after = _stats_or_error(state_dir)  # the replica's own view, the repeat run's
    if "error" in after:
        inside["error"] = after["error"]
    else:
        inside.update(replica_inside(after), engine_ttft_ms=after.get("ttft_ms"),
                      replica_means_ms=between(replica_before, after),
                      head_start_share=head_start_share(replica_before, after))
    more = [stack_run(stack.edge, LOAD) for _ in range(MORE_LOAD_RUNS)]
    # one client at a time: the path's own cost, hop by hop (the router's means and the
    # replica's over just these requests)
    before = router_times(stack.edge)
    replica_before = _stats_or_error(state_dir)
    sequential = stack_run(stack.edge, SEQUENTIAL)
    sequential_inside: dict[str, Any] = means(before, router_times(stack.edge))
    replica_after = _stats_or_error(state_dir)
    sequential_inside["replica_means_ms"] = between(replica_before, replica_after)
    sequential_inside["head_start_share"] = head_start_share(replica_before, replica_after)
    profiled = profiled_run(stack.edge, LOAD, profile_dir) if profile_dir else None
    row: dict[str, Any] = {
        "kind": "gpu_stack", "model": "glm4-9b-shaped", **shape,
        "replica_init_s": replica_init_s(), "replica_startup_s": stats.get("startup_s"),
        # the replica's own start, from its __init__ (cluster/engine.py start_s)
        "replica_start_s": stats.get("replica_start_s"),
        "weight_bytes": stats.get("weight_bytes"),
        "load_gb_s": load_gb_s(stats) if "weight_bytes" in stats else None,
        "stats_error": stats.get("error"), "join_deltas": stats.get("join_deltas"),
        "stream_interval": stats.get("stream_interval", 1),
        "piece_graph_tokens": stats.get("piece_graph_tokens", 0),
        # the engine replica's max_ongoing_requests (its stats; else as `tpserve up` ran
        # with this env and the default batch)
        "max_ongoing": stats.get("max_ongoing", max_ongoing()),
        "switch_interval_ms": switch_interval_ms(),  # (None: Python's 5 ms)
        "engine_process": engine_process_of(stats),
        # requests the router routes at once (None: Serve's cap; 0: Serve's own rule)
        "routing_tasks": routing_tasks(),
        # requests sent down the data connection ahead of Serve's call (cluster/datapath.py;
        # TPSERVE_HEAD_START=0: not, as before PERF.md v0.64)
        "head_start": head_start_on(),
        # Serve settings set otherwise than cluster/ray.env (device_stack.sh AB_ENV)
        "serve_env": deviations(),
        "chat": chat, "load": load, "load_repeat": repeat, "load_more": more,
        "load_repeat_inside": inside,
        "load_config": asdict(LoadConfig(**{**asdict(LOAD), "url": stack.edge})),
        "sequential": sequential, "sequential_config": asdict(SEQUENTIAL),
        "sequential_inside": sequential_inside,
        "load_profiled": profiled}
    if engine:
        want = engine["greedy_token_ids"]
        row["greedy_equal"] = chat["token_ids"] == want
        row["greedy_tokens"] = len(want)
        row["vs_engine"] = compare(
            [engine["load"], engine.get("load_repeat"), *engine.get("load_more", [])],
            [load, repeat, *more])
        if "sequential" in engine:
            row["vs_engine_sequential"] = compare([engine["sequential"]], [sequential])
        row["met"] = {"tokens_per_s_within_5pct": row["vs_engine"]["tokens_per_s_ratio"]
                      >= 0.95, "ttft_p50_within_5ms": row["vs_engine"]["ttft_p50_added_ms"]
                      <= 5.0}
    return row


# a replica's KV pool where replicas share a GPU (`--gpus-per-rank` under 1): 16 GiB holds
# the pinning conversations many times over, and two GLM-4-9B-shaped replicas (~19 GB of
# weights each) with it fit one H200 with room to spare
SHARED_KV_BYTES = 16 * 2**30


def shared_gpu_flags(gpus_per_rank: float) -> list[str]:
    """`tpserve up` flags for replicas that each take `gpus_per_rank` of a GPU (none at 1)."""
    if gpus_per_rank >= 1:
        return []
    return ["--gpus-per-rank", str(gpus_per_rank), "--kv-cache-memory", str(SHARED_KV_BYTES)]


def pinning_step(model: str, state_dir: str, replicas: int, device: str = "cuda",
                 gpus_per_rank: float = 1.0) -> dict[str, Any]:
    """Pinned against random routing, each on a stack of its own (see the module doc);
    `gpus_per_rank` under 1: the replicas share GPUs (on one H200: 0.5, two replicas)."""
    import subprocess

    from infra.load import PinningConfig, pinning_conversations, pinning_row
    from infra.stack import Running

    config = PinningConfig(replicas=replicas, model=Path(model).name)
    cli = [sys.executable, "-m", "infra.cli"]
    sides: dict[str, dict[str, Any]] = {}
    for routing in ("pinned", "random"):
        # a state directory each: Redis keeps its sessions there across `down`, and the
        # second side's conversations (the same session ids) must start empty
        side = f"{state_dir}-{routing}"
        subprocess.run([*cli, "up", "--model", model, "--tp", "1", "--replicas",
                        str(replicas), "--device", device, "--routing", routing, "--detach",
                        "--state-dir", side, "--timeout-s", "400",
                        *shared_gpu_flags(gpus_per_rank)], check=True)
        try:
            stack = Running.recorded(side)
            sides[routing] = pinning_conversations(config, stack.edge, stack.token, routing)
        finally:
            subprocess.run([*cli, "down", "--state-dir", side], check=False)
    return {**pinning_row(config, sides["pinned"], sides["random"]), "kind": "gpu_pinning",
            "stack": "gpu", "model": "glm4-9b-shaped", "tp": 1, "gpus_per_rank": gpus_per_rank}


def compare(alone: list[dict[str, Any] | None], stack: list[dict[str, Any]]
            ) -> dict[str, Any]:
    """The stack's runs against the engine's: the means over each side's runs of output
    tokens/s and of TTFT and ITL p50, and each side's range of tokens/s (how much one
    run's figure says: the engine alone's varied by up to 15 % between runs on the H200,
    PERF.md v0.30)."""
    def mean(runs: list[dict[str, Any] | None], key: str, sub: str | None = None) -> float:
        values = [r[key][sub] if sub else r[key] for r in runs if r]
        return round(sum(values) / len(values), 2)

    def spread(runs: list[dict[str, Any] | None]) -> list[float]:
        values = [r["output_tokens_per_s"] for r in runs if r]
        return [min(values), max(values)]

    engine_tps, stack_tps = mean(alone, "output_tokens_per_s"), mean(stack,
                                                                     "output_tokens_per_s")
    engine_ttft, stack_ttft = mean(alone, "ttft_ms", "p50"), mean(stack, "ttft_ms", "p50")
    return {"engine_output_tokens_per_s": engine_tps, "stack_output_tokens_per_s": stack_tps,
            "tokens_per_s_ratio": round(stack_tps / engine_tps, 3),
            "engine_ttft_p50_ms": engine_ttft, "stack_ttft_p50_ms": stack_ttft,
            "ttft_p50_added_ms": round(stack_ttft - engine_ttft, 2),
            "engine_itl_p50_ms": mean(alone, "itl_ms", "p50"),
            "stack_itl_p50_ms": mean(stack, "itl_ms", "p50"),
            "engine_tokens_per_s_range": spread(alone), "stack_tokens_per_s_range": spread(stack),
            "runs": [sum(1 for r in alone if r), len(stack)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.gpu_stack",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["checkpoint", "engine", "stack", "pinning"])
    parser.add_argument("model", help="the checkpoint's directory")
    parser.add_argument("--state-dir", help="stack: the state directory of `tpserve up`")
    parser.add_argument("--engine-row", help="stack: the engine step's JSON lines")
    parser.add_argument("--out", help="append the JSON line here")
    parser.add_argument("--light", action="store_true", help="stack: the start, the front "
                        "door and the prefix cache only")
    parser.add_argument("--replicas", type=int, default=2, help="pinning: tp=1 replicas")
    parser.add_argument("--device", default="cuda", help="pinning: the replicas' device")
    parser.add_argument("--gpus-per-rank", type=float, default=1.0,
                        help="pinning: each replica's share of a GPU (0.5: two on one GPU)")
    parser.add_argument("--profile-dir", help="stack: one more load run, with py-spy's "
                        "samples of the router, the engine replica and the client here")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="engine: an EngineConfig field, e.g. piece_graph_tokens=512")
    args = parser.parse_args(argv)
    if args.step in ("stack", "pinning"):
        from infra.results import driver_env

        driver_env()  # before Ray is imported
    if args.step == "checkpoint":
        row = make_checkpoint(args.model)
    elif args.step == "engine":
        row = engine_step(args.model, {k: json.loads(v) for k, v in
                                       (item.split("=", 1) for item in args.set)})
    elif args.step == "pinning":
        row = pinning_step(args.model, args.state_dir, args.replicas, args.device,
                           args.gpus_per_rank)
    else:
        row = stack_step(args.model, args.state_dir, args.engine_row, args.profile_dir,
                         args.light)
    # (environment() imports Ray, which the checkpoint step may run without)
    env = environment() if args.step != "checkpoint" else {}
    emit({**row, **env, "git_rev": os.environ.get("TPSERVE_REV")}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
