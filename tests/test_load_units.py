"""The pure parts of the load, chaos and soak scripts, with tiny fakes (no stack)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
from infra.chaos import Fault, attribute, judge_sessions  # noqa: E402
from infra.client import Turn  # noqa: E402
from infra.results import cycle_ms, percentile, sessions_moved, summarize  # noqa: E402
from infra.soak import growth  # noqa: E402


def turn(session: str, start: float, end: float, status: int = 200, replica: str = "a",
         error: str = "", done: bool = True, content: str = "") -> Turn:
    t = Turn(session, 0, start, content, status=status, replica=replica, error=error,
             done=done, ended=end)
    if status == 200 and not error:
        t.ttft_s, t.token_times, t.completion_tokens = 0.1, [start + 0.1, start + 0.2], 2
    return t


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_summary_counts_refused_failed_hung_and_moves() -> None:
    records = [turn("s1", 0, 1, replica="a"), turn("s1", 1, 2, replica="b"),
               turn("s2", 0, 1, status=503, error="HTTP 503"),
               turn("s3", 0, 1, error="error event: engine died"),
               turn("s4", 0, 61, status=0, error="hang", done=False)]
    row = summarize(records, 10.0)
    assert (row["ok"], row["refused"], row["failed_accepted"], row["hung"]) == (2, 1, 1, 1)
    assert sessions_moved(records) == 1 and row["sessions_moved"] == 1
    assert row["output_tokens_per_s"] == 0.4 and row["itl_ms"]["p50"] == 100.0


def test_the_routers_server_timing_splits_a_clients_ttft() -> None:
    """The router's `Server-Timing: router;dur=MS` (its own part of the time to first
    token) read by the client; the summary's TTFT outside the router is the rest."""
    from infra.client import router_seconds

    assert router_seconds("router;dur=12.5") == 0.0125
    assert router_seconds("db;dur=3, router;desc=x;dur=2") == 0.002
    assert router_seconds("") is None and router_seconds("router;dur=abc") is None
    records = [turn("a", 0, 1), turn("b", 0, 1), turn("c", 0, 1)]
    records[0].router_s, records[1].router_s = 0.04, 0.07  # (c's header missing)
    row = summarize(records, 10.0)
    assert row["router_ttft_ms"] == {"p50": 40.0, "p99": 70.0}
    assert row["outside_router_ttft_ms"] == {"p50": 30.0, "p99": 60.0}
    assert "outside_router_ttft_ms" not in summarize(records[2:], 10.0)
    from infra.report import _outside

    assert _outside(row) == ("; TTFT p50 in the router 40.0 ms, outside it (nginx, "
                             "uvicorn, the client) 30.0")
    assert _outside({}) == ""


def test_cycle_splits_a_client_s_time_between_and_inside_its_requests() -> None:
    # client 0: a request 0-1 s (tokens at 0.1, 0.2), the next from 1.5 to 2.5; client 1:
    # one request 0-2 s whose last chunk came at 0.2 (1.8 s after it), then a failed one
    records = [turn("a", 0, 1), turn("a", 1.5, 2.5), turn("b", 0, 2),
               turn("c", 2.25, 3, error="error event: engine died")]
    for record, client in zip(records, (0, 0, 1, 1), strict=True):
        record.client = client
    cycle = cycle_ms(records)
    assert cycle["request"] == round(1e3 * (1 + 1 + 2) / 3, 2)
    assert cycle["ttft"] == 100.0 and cycle["first_to_last"] == 100.0
    assert cycle["after_last"] == round(1e3 * (0.8 + 0.8 + 1.8) / 3, 2)
    assert cycle["between"] == 375.0  # (0.5 + 0.25) / 2: a failed request still ends a gap
    assert summarize(records, 10.0)["cycle_ms"] == cycle
    assert cycle_ms([]) == dict.fromkeys(cycle)  # nothing completed: no means


def test_failures_are_attributed_to_the_killed_replica_a_crash_or_nothing() -> None:
    kill = Fault("kill_rank", 10, 20, {"replica": "dead"})
    crash = Fault("router_kill", 30, 35)
    records = [turn("a", 9, 11, replica="dead", error="error event: gloo"),
               turn("b", 29, 31, replica="live", error="ClientPayloadError"),
               turn("c", 50, 51, replica="live", error="stream ended without [DONE]",
                    done=False)]
    blame = attribute(records, [kill, crash])
    assert blame["failed_on_killed_replica"] == 1
    assert blame["killed_streams_ended_with_error_event"] == 1
    assert blame["failed_in_router_crash"] == 1 and blame["failed_other"] == 1


def test_a_turn_missing_outside_the_redis_outage_is_a_lost_session() -> None:
    outage = Fault("redis", 10, 15)
    records = [turn("kept", 1, 2, content="one"), turn("kept", 12, 13, content="two"),
               turn("lost", 1, 2, content="one"), turn("lost", 30, 31, content="three"),
               turn("gone", 11, 12, content="x")]
    stored = {"kept": ["one"], "lost": ["one"], "gone": None}
    judged = judge_sessions(records, stored, [outage])
    assert judged["sessions_lost"] == 1 and judged["lost_examples"] == ["lost"]
    assert judged["turns_unrecorded_redis_down"] == 2 and judged["sessions_checked"] == 3


def test_soak_growth_from_warmup_to_the_median_of_the_last_samples() -> None:
    samples = [{"t_s": t, "rss_mib": {"engine": 100.0 + t / 10}} for t in (0, 60, 120, 180)]
    samples[-1]["rss_mib"]["engine"] = 500.0  # one transient spike is not growth
    assert growth(samples, 60) == {"engine": 6.0}


def test_overhead_row_judges_nginx_on_the_router_replica_and_its_table_cell() -> None:
    from infra.overhead import overhead_row
    from infra.report import _cell

    times = {"direct_handle": [0.010] * 3, "serve_router": [0.0150] * 3,
             "nginx_router": [0.0115, 0.0120, 0.0110], "router": [0.0112] * 3}
    row = overhead_row(times)
    assert row["added_p50_ms"] == 1.5 and row["met"]
    assert row["nginx_p50_ms"] == 0.3 and row["proxy_added_p50_ms"] == 5.0
    assert "nginx + router 11.5 ms (router alone 11.2 ms); added 1.5 ms" in _cell(row)[1]
    row = overhead_row({**times, "nginx_router": [0.0125] * 3})
    assert row["added_p50_ms"] == 2.5 and not row["met"]


def test_overhead_rows_from_before_direct_ingress_still_make_their_table_cell() -> None:
    from infra.report import _cell

    old = {"kind": "overhead", "p50_ms": {"direct_handle": 10.0, "serve_router": 15.0,
                                          "nginx_router": 15.5, "serve_healthz": 3.0},
           "added_p50_ms": 5.5, "nginx_p50_ms": 0.5, "serve_env": {}}
    assert "Serve + router 15.0 ms, nginx + router 15.5 ms; added 5.5 ms" in _cell(old)[1]


def test_cached_prefix_is_whole_blocks_of_the_common_prefix_leaving_one_token() -> None:
    from replicas.bench import cached_prefix

    previous = list(range(40))
    assert cached_prefix(previous, list(range(40)) + [7, 8], 16) == 32
    assert cached_prefix(previous, list(range(35)) + [99] * 10, 16) == 32
    assert cached_prefix(previous, list(range(15)) + [99] * 30, 16) == 0
    assert cached_prefix(previous, list(range(32)), 16) == 16  # one token left to compute
    assert cached_prefix([], [1, 2, 3], 16) == 0


def test_an_overhead_row_measured_without_the_stack_settings_says_so() -> None:
    from cluster.ray_env import ray_env
    from infra.overhead import overhead_row
    from infra.report import _cell

    times = {"direct_handle": [0.010], "serve_router": [0.015], "nginx_router": [0.011],
             "router": [0.0108]}
    row = overhead_row(times)
    row["serve_env"] = dict(ray_env())
    assert _cell(row)[0] == "router overhead: 1-token completion"
    row["serve_env"]["RAY_SERVE_USE_GRPC_BY_DEFAULT"] = "0"
    assert "RAY_SERVE_USE_GRPC_BY_DEFAULT=0" in _cell(row)[0]


def test_a_fault_not_recovered_says_what_the_stack_looked_like(tmp_path: Path) -> None:
    """The drill's TimeoutError carries the edge's /healthz answer, and each part it could
    not read says why (here: no Ray dashboard, no nginx.conf) instead of failing again."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    from infra.chaos import ChaosConfig, Drill
    from replicas.ranks import free_port

    class Degraded(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"status": "degraded", "redis": False}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Degraded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stack = SimpleNamespace(
            edge=f"http://127.0.0.1:{server.server_address[1]}", token="t",
            config=SimpleNamespace(ray_dashboard=f"http://127.0.0.1:{free_port()}",
                                   state_dir=str(tmp_path)))
        drill = Drill(stack, ChaosConfig(recover_timeout_s=0.3), [])
        with pytest.raises(TimeoutError) as raised:
            asyncio.run(drill.until("router back on Redis", drill.healthy))
    finally:
        server.shutdown()
    message = str(raised.value)
    assert message.startswith("router back on Redis: not recovered after 0 s; at the end: ")
    seen = json.loads(message.split("at the end: ", 1)[1])
    assert seen["healthz"] == [200, {"status": "degraded", "redis": False}]
    assert all(seen[k].startswith("unreadable: ") for k in ("engines", "routers",
                                                          "edge_upstreams"))


def test_a_gpu_stack_row_with_several_runs_shows_each_sides_range() -> None:
    """A GPU stack row whose comparison carries each side's tok/s range (gpu_stack.compare
    over four runs a side) says so in its cell; rows from before keep their text."""
    import json

    from infra.report import _cell

    root = Path(__file__).resolve().parent.parent
    rows = [json.loads(line) for line in (root / "infra" / "results" /
                                          "stack_gpu_h200.jsonl").read_text().splitlines()]
    row = next(r for r in reversed(rows) if r["kind"] == "gpu_stack" and "vs_engine" in r
               and "runs" not in r["vs_engine"])  # (a row from before the ranges)
    _, before, _ = _cell(row)
    assert "runs:" not in before
    row = {**row, "vs_engine": {**row["vs_engine"], "runs": [4, 4],
                                "engine_tokens_per_s_range": [7565.5, 8887.5],
                                "stack_tokens_per_s_range": [7020.2, 7482.6]}}
    _, result, _ = _cell(row)
    assert "(means of 4 and 4 runs: 7020-7483 and 7566-8888)" in result


def test_a_gpu_stack_row_with_the_way_in_measured_says_where_it_went() -> None:
    """A GPU stack row that measured Serve's routing and the event loops' lag (PERF.md
    v0.34) says so in its table cell; the rows before them make the same cell as before."""
    import json
    from pathlib import Path

    from infra.report import _cell

    rows = [json.loads(line) for line in
            Path("infra/results/stack_gpu_h200.jsonl").read_text().splitlines()]
    row = next(r for r in reversed(rows) if r["kind"] == "gpu_stack" and "vs_engine" in r
               and "routing_choose_mean_ms" not in r.get("load_repeat_inside", {}))
    before = _cell(row)[1]
    assert "way in" not in before
    row["load_repeat_inside"].update(
        routing_choose_mean_ms=4.2, routing_choices_per_call=1.0, router_loop_lag_mean_ms=3.1,
        replica_loop_lag_ms={"n": 2048, "mean": 0.9}, way_in_ms={"n": 512, "mean": 27.2},
        frame_age_mean_ms=1.4)
    assert _cell(row)[1] == before + (
        "; way in 27.2 ms mean, of it 4.2 ms to the choice of replica (1.0 choices a call); "
        "event-loop lag: router 3.1 ms, engine replica 0.9 ms; frames 1.4 ms old as the "
        "router read them")
    row["load_repeat_inside"].update(queue_probes_per_call=0.98, queue_probe_mean_ms=6.5)
    assert "(1.0 choices a call, 0.98 queue-length probes a call of 6.5 ms); " in _cell(row)[1]
    row["load_repeat_inside"].update(way_in_routing_ms={"n": 512, "mean": 15.0},
                                     way_in_transit_ms={"n": 512, "mean": 10.0},
                                     way_in_dispatch_ms={"n": 512, "mean": 1.2})
    assert ("; way in 27.2 ms mean (Serve's routing 15.0, gRPC 10.0, dispatch 1.2 ms), of "
            "it 4.2 ms to the choice") in _cell(row)[1]
    row["load_repeat_inside"].update(choice_mean_ms=3.3)
    assert "4.2 ms to the choice of replica and 3.3 in it (1.0 choices" in _cell(row)[1]
    cell = _cell(row)[1]
    row["load_repeat"] = {**row["load_repeat"], "cycle_ms": {
        "request": 1100.0, "ttft": 150.0, "first_to_last": 930.0, "after_last": 20.0,
        "between": 0.1}}
    assert _cell(row)[1] == cell + (
        "; a client's request 1100.0 ms mean: to the first token 150.0, to the last "
        "930.0, then to its end 20.0; 0.1 ms to its next")
    what = _cell(row)[0]
    row["serve_env"] = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
    assert _cell(row)[0] == what.replace(", data path", ", RAY_SERVE_RUN_ROUTER_IN_SEPARATE_"
                                         "LOOP=1, data path")


def test_a_cpu_stack_row_says_its_replicas_cap_and_where_the_way_in_went() -> None:
    """router_cpu --stack --state-dir rows carry `inside` (PERF.md v0.34): their cell names
    the engine replica's max_ongoing and where the router's TTFT went; older rows' cells
    are as before."""
    import json
    from pathlib import Path

    from infra.report import _cell

    rows = [json.loads(line) for line in
            Path("infra/results/router_cpu.jsonl").read_text().splitlines()
            if '"router_cpu_stack"' in line]
    old, new = rows[0], rows[-1]
    assert "inside" not in old and "way in" not in _cell(old)[1]
    what, figures, _ = _cell(new)
    assert f"an engine replica takes {new['inside']['max_ongoing']} requests at once" in what
    assert f"way in {new['inside']['way_in_ms']['mean']} ms mean" in figures
    # a row of the head start's A/B (cluster/datapath.py): each side says which it is
    on = {**new, "inside": {**new["inside"], "head_start": True,
                            "way_in_head_ms": {"n": 300, "mean": 1.25}}}
    off = {**new, "inside": {**new["inside"], "head_start": False}}
    assert "(300 head-started: 1.25 ms mean)" in _cell(on)[1]
    traced = {**on, "inside": {**on["inside"], **{
        f"way_in_{hop}_ms": {"n": 4, "mean": 2.0} for hop in ("routing", "transit",
                                                             "dispatch")}}}
    assert ("(300 head-started: 1.25 ms mean; 4 through Serve: Serve's routing 2.0, gRPC "
            "2.0, dispatch 2.0 ms)") in _cell(traced)[1]
    assert "no head start" not in _cell(on)[0] and "head-started" not in _cell(off)[1]
    assert "no head start (TPSERVE_HEAD_START=0)" in _cell(off)[0]


def test_a_chaos_row_says_what_stack_it_ran_on(tmp_path: Path) -> None:
    """chaos.stack_shape: the recorded stack's model, tp, device and GPU share (two
    replicas on one GPU, `--gpus-per-rank 0.5`); a stack recorded before the share existed
    took whole GPUs."""
    from infra.chaos import stack_shape
    from infra.stack import write_state

    write_state(tmp_path, {"pid": 1, "services": {},
                           "engine": {"model": "/m/glm4-9b", "tp": 1, "device": "cuda"},
                           "config": {"gpus_per_rank": 0.5}})
    assert stack_shape(str(tmp_path)) == {"stack": "recorded", "model": "glm4-9b", "tp": 1,
                                          "device": "cuda", "gpus_per_rank": 0.5}
    write_state(tmp_path, {"pid": 1, "services": {}, "engine": {"tp": 2}, "config": {}})
    assert stack_shape(str(tmp_path))["gpus_per_rank"] == 1.0
    assert stack_shape(None) == {"stack": "local", "model": "tiny", "tp": 2}


def test_a_stack_rows_first_chat_says_the_routers_share_where_recorded() -> None:
    """The front door's first chat in a stack row's cell: with the router's own TTFT of it
    and the chat after it where the row has them (dbb777f on), as before where not."""
    import json
    from pathlib import Path

    from infra.report import _cell

    rows = [json.loads(line) for line in
            Path("infra/results/stack_gpu_h200.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["kind"] == "gpu_stack_start")
    assert "router_ttft_ms" not in row["chat"]
    before = _cell(row)[1]
    row["chat"].update(router_ttft_ms=34.2, again={"ttft_ms": 14.9, "router_ttft_ms": 11.1})
    after = _cell(row)[1]
    split = " (the router's own 34.2 ms; a second chat 14.9 ms, the router's own 11.1)"
    assert after == before.replace(f"TTFT {row['chat']['ttft_ms']} ms",
                                   f"TTFT {row['chat']['ttft_ms']} ms{split}", 1)
    assert split in after


def test_a_gpu_stack_row_meets_its_targets_only_with_its_replica_running_in_time() -> None:
    """A stack row's `met` holds the load's two targets; its table verdict also needs the
    replica RUNNING within 30 s, the third target its cell names (v0.54's first engine
    process row met both load targets at 34.55 s)."""
    import json

    from infra.report import table

    root = Path(__file__).resolve().parent.parent
    rows = [json.loads(line) for line in (root / "infra" / "results" /
                                          "stack_gpu_h200.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["kind"] == "gpu_stack" and r.get("engine_process"))
    row = {**row, "met": {"tokens_per_s_within_5pct": True, "ttft_p50_within_5ms": True}}

    def verdict(init_s: float, tmp: Path) -> str:
        (tmp / "stack_gpu_h200.jsonl").write_text(json.dumps({**row, "replica_init_s": init_s}))
        return table(tmp).splitlines()[-1].split(" | ")[-2]

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        assert verdict(27.9, Path(tmp)) == "yes"
        assert verdict(34.6, Path(tmp)) == "**no**"


def test_a_gpu_stack_row_splits_one_clients_added_ttft_where_it_was_measured() -> None:
    """A GPU stack row with `sequential_inside` (infra/gpu_stack.py) says where one
    client's added TTFT went; rows from before it keep their cell."""
    import json

    from infra.report import _cell

    rows = [json.loads(line) for line in
            Path("infra/results/stack_gpu_h200.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["kind"] == "gpu_stack" and "vs_engine" in r
               and "sequential_inside" not in r)
    assert "one client" not in _cell(row)[1]
    row = {**row, "vs_engine_sequential": {"stack_ttft_p50_ms": 13.7, "engine_ttft_p50_ms": 8.2,
                                           "ttft_p50_added_ms": 5.5},
           "sequential_inside": {"router_ttft_mean_ms": 11.5, "replica_means_ms": {
               "way_in_ms": 2.4, "way_in_routing_ms": 0.7, "way_in_transit_ms": 1.3,
               "way_in_dispatch_ms": 0.4, "prepare_ms": 0.6, "ttft_ms": 8.1}}}
    assert _cell(row)[1].endswith(
        "; one client: TTFT p50 13.7 vs 8.2 ms (added 5.5), the router's own 11.5 ms mean: "
        "way in 2.4 (Serve's routing 0.7, gRPC 1.3, dispatch 0.4), preparation 0.6, the "
        "engine process's TTFT 8.1")
    row["sequential_inside"].update(head_start_share=0.98)  # (cluster/datapath.py)
    row["sequential_inside"]["replica_means_ms"]["way_in_head_ms"] = 0.3
    assert _cell(row)[1].endswith(
        "way in 2.4 (98 % head-started, their way in 0.3; the others': Serve's routing 0.7, "
        "gRPC 1.3, dispatch 0.4), preparation 0.6, the engine process's TTFT 8.1")
    row["sequential_inside"].update(head_start_share=1.0)  # (no others: no hops of theirs)
    assert _cell(row)[1].endswith(
        "way in 2.4 (100 % head-started, their way in 0.3), preparation 0.6, the engine "
        "process's TTFT 8.1")
    del row["sequential_inside"]["replica_means_ms"]  # a run whose replica was unreadable
    assert "one client" not in _cell(row)[1]


def test_the_head_start_share_is_counted_between_two_replica_stats() -> None:
    from infra.gpu_stack import head_start_share

    before = {"way_in_ms": {"count": 10}, "way_in_head_ms": {"count": 4}}
    after = {"way_in_ms": {"count": 30}, "way_in_head_ms": {"count": 19}}
    assert head_start_share(before, after) == 0.75
    assert head_start_share(before, before) is None  # (nothing between them)
    assert head_start_share({"error": "x"}, after) is None
