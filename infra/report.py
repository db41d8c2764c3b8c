"""The README's table of the stack's measurements, rendered from the result lines
(JSON) under infra/results/: one row per line, with what was measured, the figures, the
target, whether it was met and the git revision (`python -m infra.load --table`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infra.results import RESULTS

# ---- the README's table -------------------------------------------------------------------

TABLE_FILES = ("load_cpu.jsonl", "pinning_cpu.jsonl", "overhead_cpu.jsonl", "chaos_cpu.jsonl",
               "soak_cpu.jsonl", "router_cpu.jsonl", "stack_gpu_h200.jsonl")
# lines of a GPU run (infra/gpu_stack.py) whose figures its `gpu_stack` / `gpu_stack_start`
# line carries too: kept in the file, not rows of the table
DETAIL_KINDS = ("gpu_engine", "gpu_stack_up", "gpu_checkpoint")
# issue 19: a GPU replica RUNNING this soon after `up` asks for it, from the page cache
RUNNING_TARGET_S = 30.0


def _path(row: dict[str, Any]) -> str:
    """", data path P" for a row that says which (rows before the choice say nothing)."""
    return f", data path {row['data_path']}" if "data_path" in row else ""


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
    if kind in ("pinning", "gpu_pinning"):
        p, r = row["pinned"], row["random"]
        where = (" on GPUs" if kind == "gpu_pinning" else "") + _shared(row)
        return (f"pinning payoff{where} ({row['model']} model, {c['replicas']} replicas of "
                f"tp={row['tp']}, prompts up "
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
        rank0 = any(f.get("rank") == 0 for f in row.get("faults", []))
        return (f"chaos: {c['faults']} under {c['clients']} clients{_path(row)}"
                f"{_shared(row)}"
                + (" (tp=1 replicas: the killed rank is the replica's own process)"
                   if rank0 else ""),
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
        return (f"soak: {c['duration']:.0f} s, {c['clients']} clients{_path(row)}",
                f"RSS growth after {c['warmup']:.0f} s warm-up, max over router and engine "
                f"processes {row['max_growth_bounded_mib']} MiB; {row['requests']} requests, "
                f"{row['failed_accepted']} failed", f"<= {row['bound_mib']:.0f} MiB")
    if kind == "router_cpu":
        return (f"router CPU per streamed token, in-process (its ASGI app, the wire both ways, "
                f"{row['tokens_per_request']}-token streams)",
                f"{row['cpu_us_per_token']} us", "—")
    if kind == "router_cpu_stack":
        c, us = row["load_config"], row["cpu_us_per_token"]
        inside = row.get("inside", {})
        return (f"CPU per streamed token in the CPU stack (tiny model, one tp=1 replica, "
                f"{c['clients']} clients x {c['max_tokens']} tokens, stream_interval "
                f"{row['stream_interval']}{_path(row)}"
                + (f", an engine replica takes {inside['max_ongoing']} requests at once"
                   if inside.get("max_ongoing") else "")
                + _routing_tasks(inside.get("routing_tasks"))
                + _head_start(inside.get("head_start")) + _serve_env(row) + ")",
                f"router {us['router']} us, engine replica {us['engine']}, nginx "
                f"{us['nginx']}, client {us['client']}; {row['tok_s']} tok/s, TTFT p50 "
                f"{row['ttft_ms']['p50']} ms" + _way_in(inside) + _cycle(row.get("cycle_ms")),
                "—")
    if kind in ("gpu_stack", "gpu_stack_start"):
        what = (f"stack on one {row.get('gpu', 'H200')}: {row['model']}, {row['replicas']} "
                f"replica tp={row['tp']}, kernel caches {row.get('caches', 'not recorded')}"
                + (", a late reader's deltas not joined (TPSERVE_STREAM_JOIN=0)"
                   if row.get("join_deltas") is False else "")
                + (f", {row['stream_interval']} tokens a message"
                   if row.get("stream_interval", 1) > 1 else "")
                + (f", steps admitting prompts (up to {row['piece_graph_tokens']} tokens) "
                   "in CUDA-graph pieces" if row.get("piece_graph_tokens") else "")
                # said whenever recorded: the default was 64 (the batch) until cc93632,
                # twice the batch since
                + (f", an engine replica takes {row['max_ongoing']} requests at once"
                   if row.get("max_ongoing") else "")
                + (f", the engine replica's GIL switch interval {row['switch_interval_ms']} ms"
                   if row.get("switch_interval_ms") else "")
                + ({True: ", the engine in a process of its own",
                    False: ", the engine in the replica's process"}.get(
                        row.get("engine_process"), ""))
                + _routing_tasks(row.get("routing_tasks"))
                + _head_start(row.get("head_start"))
                + (f", {row['router_replicas']} router replicas"
                   if row.get("router_replicas", 1) != 1 else "")
                + _serve_env(row) + _path(row))
        start = (f"replica RUNNING in {row['replica_init_s']} s (GEMV tuning "
                 f"{row['replica_startup_s']['gemv_tuning']} s), weights "
                 f"{row['load_gb_s']} GB/s; first chat's TTFT {row['chat']['ttft_ms']} ms"
                 + _chat_split(row["chat"]))
        if kind == "gpu_stack_start":
            p = row["prefix"]
            return (what, f"{start}; turn-2 TTFT p50 {p['turn2_ttft_ms']['p50']} ms (~1,100 "
                    f"tokens, history cached) vs {p['cold_ttft_ms']['p50']} ms uncached",
                    f"RUNNING <= {RUNNING_TARGET_S:.0f} s from the page cache: "
                    + ("met" if row["replica_init_s"] <= RUNNING_TARGET_S else "**missed**"))
        v, c = row["vs_engine"], row["load_config"]
        runs = (f" (means of {v['runs'][1]} and {v['runs'][0]} runs: "
                f"{_span(v['stack_tokens_per_s_range'])} and "
                f"{_span(v['engine_tokens_per_s_range'])})"
                if "stack_tokens_per_s_range" in v else "")
        return (what, f"{start}; greedy tokens through nginx equal the engine's: "
                f"{'yes' if row['greedy_equal'] else '**no**'}; {c['clients']} streaming "
                f"clients x {c['max_tokens']} tokens: {v['stack_output_tokens_per_s']} tok/s "
                f"vs the engine alone {v['engine_output_tokens_per_s']}{runs} (ratio "
                f"{v['tokens_per_s_ratio']}), TTFT p50 {v['stack_ttft_p50_ms']} vs "
                f"{v['engine_ttft_p50_ms']} ms (added {v['ttft_p50_added_ms']})"
                + _way_in(row.get("load_repeat_inside", {}))
                + _cycle((row.get("load_repeat") or {}).get("cycle_ms"))
                + _outside(row.get("load_repeat") or {})
                + _one_client(row),
                "tok/s within 5 %, TTFT p50 within 5 ms; RUNNING <= 30 s")
    raise ValueError(f"unknown result kind {kind!r}")


def _outside(run: dict[str, Any]) -> str:
    """A load run's TTFT split by the router's Server-Timing header (PERF.md v0.66), in
    rows that have it: the router's own part and the rest (nginx, uvicorn, the client)."""
    router, outside = run.get("router_ttft_ms"), run.get("outside_router_ttft_ms")
    if not router or not outside:
        return ""
    return (f"; TTFT p50 in the router {router['p50']} ms, outside it (nginx, uvicorn, "
            f"the client) {outside['p50']}")


def _one_client(row: dict[str, Any]) -> str:
    """Where one client's added TTFT goes, in rows that split it (`sequential_inside`):
    the router's own TTFT (means over that run), and inside it the way in, the replica's
    preparation and the engine process's TTFT; the rest is HTTP outside the router."""
    inside, v = row.get("sequential_inside"), row.get("vs_engine_sequential")
    if not inside or not v or "replica_means_ms" not in inside:
        return ""
    m = inside["replica_means_ms"]
    share = inside.get("head_start_share")
    hops = (f"Serve's routing {m.get('way_in_routing_ms')}, gRPC "
            f"{m.get('way_in_transit_ms')}, dispatch {m.get('way_in_dispatch_ms')}")
    if share:  # (the traced hops are those of the requests not head-started)
        others = f"; the others': {hops}" if share < 1 else ""
        hops = (f"{round(share * 100)} % head-started, their way in "
                f"{m.get('way_in_head_ms')}{others}")
    return (f"; one client: TTFT p50 {v['stack_ttft_p50_ms']} vs {v['engine_ttft_p50_ms']} "
            f"ms (added {v['ttft_p50_added_ms']}), the router's own "
            f"{inside['router_ttft_mean_ms']} ms mean: way in {m['way_in_ms']} ({hops}), "
            f"preparation {m['prepare_ms']}, the engine process's TTFT {m['ttft_ms']}")


def _shared(row: dict[str, Any]) -> str:
    """A row whose tp=1 replicas shared GPUs (`tpserve up --gpus-per-rank`)."""
    share = row.get("gpus_per_rank", 1.0)
    return f", replicas sharing GPUs ({share} of one each)" if share < 1 else ""


def _serve_env(row: dict[str, Any]) -> str:
    """A stack row's Serve settings set otherwise than cluster/ray.env (`serve_env`)."""
    return "".join(f", {k}={v}" for k, v in row.get("serve_env", {}).items())


def _routing_tasks(count: int | None) -> str:
    """A stack row's TPSERVE_ROUTING_TASKS, when it was set (cluster/pinning.py)."""
    if count == 0:
        return ", Serve's own count of routing tasks (2 a replica)"
    return f", {count} routing tasks" if count else ""


def _head_start(on: bool | None) -> str:
    """A stack row run without the head start (cluster/datapath.py), when it says so."""
    return ", no head start (TPSERVE_HEAD_START=0)" if on is False else ""


def _way_in(inside: dict[str, Any]) -> str:
    """Where a request's way into the engine replica went, in rows that measured it
    (PERF.md v0.34): Serve's routing up to our choice of replica, and each process's
    event-loop lag (means)."""
    if "routing_choose_mean_ms" not in inside:
        return ""
    lag = (inside.get("replica_loop_lag_ms") or {}).get("mean")
    hops = [(inside.get(f"way_in_{hop}_ms") or {}).get("mean")
            for hop in ("routing", "transit", "dispatch")]
    head = inside.get("way_in_head_ms") or {}
    split = (f"Serve's routing {hops[0]}, gRPC {hops[1]}, dispatch {hops[2]} ms"
             if None not in hops else "")
    if head.get("n"):  # (the hops are those of the requests that went through Serve)
        others = (inside.get("way_in_routing_ms") or {}).get("n")
        split = (f"{head['n']} head-started: {head.get('mean')} ms mean"
                 + (f"; {others} through Serve: {split}" if split else ""))
    return (f"; way in {(inside.get('way_in_ms') or {}).get('mean')} ms mean"
            + (f" ({split})" if split else "")
            + ", of it "
            f"{inside['routing_choose_mean_ms']} ms to the choice of replica"
            + (f" and {inside['choice_mean_ms']} in it" if "choice_mean_ms" in inside
               else "")
            + " "
            f"({inside['routing_choices_per_call']} choices a call"
            + (f", {inside['queue_probes_per_call']} queue-length probes a call of "
               f"{inside['queue_probe_mean_ms']} ms" if "queue_probes_per_call" in inside
               else "")
            + "); event-loop lag: "
            f"router {inside['router_loop_lag_mean_ms']} ms, engine replica {lag} ms"
            + (f"; frames {inside['frame_age_mean_ms']} ms old as the router read them"
               if "frame_age_mean_ms" in inside else ""))


def _cycle(cycle: dict[str, float | None] | None) -> str:
    """A closed-loop client's request, split (infra/results.py cycle_ms; PERF.md v0.41),
    in rows that measured it."""
    if not cycle or cycle.get("request") is None:
        return ""
    return (f"; a client's request {cycle['request']} ms mean: to the first token "
            f"{cycle['ttft']}, to the last {cycle['first_to_last']}, then to its end "
            f"{cycle['after_last']}; {cycle['between']} ms to its next")


def _span(values: list[float]) -> str:
    return f"{values[0]:.0f}-{values[1]:.0f}"


def _met(met: bool | dict[str, bool]) -> bool:
    """A line's `met`: one verdict, or one per target (all must hold)."""
    return all(met.values()) if isinstance(met, dict) else bool(met)


def _running_in_time(row: dict[str, Any]) -> bool:
    """A stack row's other target: its replica RUNNING within RUNNING_TARGET_S (its `met`
    holds only the load's two)."""
    if row["kind"] != "gpu_stack" or row.get("replica_init_s") is None:
        return True
    return row["replica_init_s"] <= RUNNING_TARGET_S


def _chat_split(chat: dict[str, Any]) -> str:
    """The router's own share of the front door's first chat and the chat after it, where
    recorded (rows from dbb777f on; before it, the first chat's TTFT also held the openai
    client's first import of its chat resources)."""
    if chat.get("router_ttft_ms") is None:
        return ""
    again = chat.get("again") or {}
    second = (f"a second chat {again['ttft_ms']} ms, the router's own "
              f"{again.get('router_ttft_ms')}" if "ttft_ms" in again
              else f"a second chat failed: {again.get('error')}")
    return f" (the router's own {chat['router_ttft_ms']} ms; {second})"


def table(results: str | Path = RESULTS) -> str:
    """A markdown table of the results files (JSON lines) under `results`, for the README."""
    out = ["| measurement | result | target | met | rev |", "|---|---|---|---|---|"]
    for name in TABLE_FILES:
        path = Path(results) / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if line.strip() and (row := json.loads(line))["kind"] not in DETAIL_KINDS:
                what, figures, target = _cell(row)
                met = "—" if "met" not in row else ("yes" if _met(row["met"])
                                                    and _running_in_time(row) else "**no**")
                out.append(f"| {what} | {figures} | {target} | {met} | {row['git_rev']} |")
    return "\n".join(out)
