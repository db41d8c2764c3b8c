"""infra/gpu_stack.py's logic on CPU: the engine-alone clients (the same messages as
infra/client.py's clients), the engine's start-up stats, the comparison and the replica's
init time read from Serve's log. The GPU runs themselves go through the device tool."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from infra import gpu_stack
from infra.client import Turn, user_message
from replicas import Engine, EngineConfig


def summary(tps: float, ttft: float, itl: float) -> dict:
    return {"output_tokens_per_s": tps, "ttft_ms": {"p50": ttft}, "itl_ms": {"p50": itl}}


def test_compare_means_each_side() -> None:
    got = gpu_stack.compare([summary(100, 10, 2), summary(80, 20, 4), None],
                            [summary(90, 21, 3)])
    assert got["engine_output_tokens_per_s"] == 90
    assert got["tokens_per_s_ratio"] == 1.0
    assert got["ttft_p50_added_ms"] == 6.0
    assert got["engine_itl_p50_ms"] == 3.0 and got["runs"] == [2, 1]
    assert got["engine_tokens_per_s_range"] == [80, 100]
    assert got["stack_tokens_per_s_range"] == [90, 90]


def test_a_stack_compares_with_the_engine_run_with_its_replicas_settings() -> None:
    """The stack with piece graphs against the engine alone with them, the default
    against the default, whichever ran last (rows written before engine_set existed
    count as the default)."""
    rows = [{"kind": "gpu_engine", "n": 0},
            {"kind": "gpu_engine", "n": 1, "engine_set": {}},
            {"kind": "gpu_engine", "n": 2, "engine_set": {"piece_graph_tokens": 512}},
            {"kind": "gpu_stack_up"}]
    assert gpu_stack.engine_reference(rows, {"piece_graph_tokens": 0})["n"] == 1
    assert gpu_stack.engine_reference(rows, {})["n"] == 1
    assert gpu_stack.engine_reference(rows, {"piece_graph_tokens": 512})["n"] == 2
    assert gpu_stack.engine_reference(rows[:2], {"piece_graph_tokens": 512}) == {}
    assert gpu_stack.engine_reference(rows[:1], {})["n"] == 0
    # a row that recorded the value in effect (a default of 512 set nothing) matches by it
    rows.append({"kind": "gpu_engine", "n": 3, "engine_set": {},
                 "in_effect": {"piece_graph_tokens": 512}})
    assert gpu_stack.engine_reference(rows, {"piece_graph_tokens": 512})["n"] == 3
    assert gpu_stack.engine_reference(rows, {"piece_graph_tokens": 0})["n"] == 1


def test_replica_init_s_from_serve_log(tmp_path: Path) -> None:
    assert gpu_stack.replica_init_s(str(tmp_path)) is None
    (tmp_path / "replica_tpserve_Engine_ab12.log").write_text(
        "INFO 2026-12-01 08:24:55,887 tpserve_Engine ab12 -- Started initializing replica.\n"
        "INFO 2026-12-01 08:25:00,000 tpserve_Engine ab12 -- some line\n"
        "INFO 2026-12-01 08:25:10,634 tpserve_Engine ab12 -- Finished initializing replica.\n")
    assert gpu_stack.replica_init_s(str(tmp_path)) == 14.75


def test_engine_clients_send_the_load_clients_messages() -> None:
    config = replace(gpu_stack.LOAD, clients=3, max_requests=7, max_tokens=4)
    with Engine(EngineConfig(tp=1, device="cpu")) as engine:
        stats = engine.stats()
        records: list[Turn] = []
        asyncio.run(gpu_stack.engine_clients(engine, config, records))
    assert stats["startup_s"]["load"] >= 0 and stats["weight_bytes"] > 0
    assert len(records) == 7 and all(r.ok and r.completion_tokens == 4 for r in records)
    # infra/client.py's `client` draws a session name, then the message, per turn
    sent = []
    for index in range(3):
        rng = random.Random(config.seed * 1000 + index)
        for _ in range(3):
            rng.getrandbits(32)
            sent.append(user_message(rng, config.user_words))
    assert {r.content for r in records} <= set(sent)


def test_cpu_seconds_count_this_process_and_not_a_gone_one() -> None:
    import os

    pids = {"client": [os.getpid()], "gone": [2**22 + 1]}  # above Linux's pid_max
    before = gpu_stack.cpu_seconds(pids)
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = gpu_stack.cpu_seconds(pids)
    assert set(after) == {"client"} and after["client"] - before["client"] >= 0.2


def test_pinning_step_brings_up_a_stack_per_routing_in_its_own_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpu_stack pinning`: pinned, then random, each `tpserve up` (tp=1, the replicas and
    device asked for) in a state directory of its own (Redis keeps a stack's sessions
    across `down`: in a shared one the random side's sessions, the same ids, began with
    the pinned side's history: prompts past the context, seen on CPU), and `down` after
    each, also when its conversations fail."""
    import subprocess
    from types import SimpleNamespace

    import infra.load
    import infra.stack

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd[3:]))
    monkeypatch.setattr(infra.stack.Running, "recorded", staticmethod(
        lambda state: SimpleNamespace(edge=f"edge:{state}", token="t")))
    seen = []

    def conversations(config, edge, token, routing):
        seen.append((edge, routing, config.replicas))
        if routing == "random":
            raise RuntimeError("conversations failed")
        return {"ttft_turn3plus_ms": {"p50": 1.0}, "max_prompt_tokens": 1200}

    monkeypatch.setattr(infra.load, "pinning_conversations", conversations)
    with pytest.raises(RuntimeError, match="conversations failed"):
        gpu_stack.pinning_step("/m", "/s", 2, "cpu")
    ups = [c for c in calls if c[0] == "up"]
    downs = [c for c in calls if c[0] == "down"]
    assert [c[c.index("--state-dir") + 1] for c in ups] == ["/s-pinned", "/s-random"]
    assert [c[c.index("--routing") + 1] for c in ups] == ["pinned", "random"]
    assert all(c[c.index("--tp") + 1] == "1" and c[c.index("--replicas") + 1] == "2"
               and c[c.index("--device") + 1] == "cpu" for c in ups)
    assert [c[-1] for c in downs] == ["/s-pinned", "/s-random"]
    assert seen == [("edge:/s-pinned", "pinned", 2), ("edge:/s-random", "random", 2)]
    assert not any("--gpus-per-rank" in c for c in ups)
    calls.clear()
    with pytest.raises(RuntimeError, match="conversations failed"):
        gpu_stack.pinning_step("/m", "/s", 2, "cuda", gpus_per_rank=0.5)  # one GPU, shared
    ups = [c for c in calls if c[0] == "up"]
    assert all(c[c.index("--gpus-per-rank") + 1] == "0.5"
               and int(c[c.index("--kv-cache-memory") + 1]) == gpu_stack.SHARED_KV_BYTES
               for c in ups) and len(ups) == 2


def test_router_times_sum_every_label_of_the_histograms(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """The router's histograms read from /metrics: the sums and counts over every label
    (buckets and other metrics left out), and the means between two readings, with the
    choices of replicas per engine call."""
    import io
    import urllib.request

    from infra.gpu_stack import means, router_times

    text = ('# HELP tpserve_time_to_first_token_seconds time to first token\n'
            'tpserve_time_to_first_token_seconds_bucket{le="0.1",route="chat"} 3.0\n'
            'tpserve_time_to_first_token_seconds_sum{route="chat"} 0.25\n'
            'tpserve_time_to_first_token_seconds_count{route="chat"} 5.0\n'
            'tpserve_time_to_first_token_seconds_sum{route="completions"} 0.5\n'
            'tpserve_time_to_first_token_seconds_count{route="completions"} 2.0\n'
            'tpserve_engine_first_item_seconds_sum 0.07\n'
            'tpserve_engine_first_item_seconds_count 7.0\n'
            'tpserve_request_latency_seconds_sum{route="chat"} 9.0\n'
            'tpserve_engine_routing_seconds_bucket{le="0.01"} 8.0\n'
            'tpserve_engine_routing_seconds_sum 0.04\n'
            'tpserve_engine_routing_seconds_count 14.0\n'
            'tpserve_engine_choice_seconds_sum 0.028\n'
            'tpserve_engine_choice_seconds_count 14.0\n'
            'tpserve_engine_queue_probe_seconds_sum 0.03\n'
            'tpserve_engine_queue_probe_seconds_count 6.0\n'
            'tpserve_loop_lag_seconds_sum 0.3\n'
            'tpserve_loop_lag_seconds_count 100.0\n'
            'tpserve_history_append_seconds_sum 0.012\n'
            'tpserve_history_append_seconds_count 4.0\n'
            'tpserve_data_path_frame_age_seconds_sum 0.5\n'
            'tpserve_data_path_frame_age_seconds_count 1000.0\n')
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=0: io.BytesIO(text.encode()))
    times = router_times("http://127.0.0.1:1")
    assert times == {"router_ttft": (0.75, 7.0), "engine_first_item": (0.07, 7.0),
                     "routing_choose": (0.04, 14.0), "choice": (0.028, 14.0),
                     "queue_probe": (0.03, 6.0),
                     "router_loop_lag": (0.3, 100.0), "history_append": (0.012, 4.0),
                     "frame_age": (0.5, 1000.0)}
    zero = dict.fromkeys(times, (0.0, 0.0))
    assert means(zero, times) == {"router_ttft_mean_ms": 107.14,
                                  "engine_first_item_mean_ms": 10.0,
                                  "routing_choose_mean_ms": 2.86,
                                  "choice_mean_ms": 2.0,
                                  "queue_probe_mean_ms": 5.0,
                                  "router_loop_lag_mean_ms": 3.0,
                                  "history_append_mean_ms": 3.0,
                                  "frame_age_mean_ms": 0.5,
                                  "routing_choices_per_call": 2.0,
                                  "queue_probes_per_call": 0.857}


def test_stack_pids_find_the_engine_process_before_its_fork_server() -> None:
    """The CPU use and py-spy samples of an engine replica's engine process (v0.54): it
    comes before its fork server among the processes of a fork server's command line (on
    the whole machine: in CI the stack tier's replicas are there too)."""
    from infra.gpu_stack import stack_pids
    from infra.procs import parent_pid
    from replicas import EngineConfig
    from replicas.engineproc import EngineProcess

    engine = EngineProcess(EngineConfig(model=None))
    try:
        group = stack_pids()["engine_process"]
        server = parent_pid(engine.pid)
        assert server in group and group.index(engine.pid) < group.index(server), group
    finally:
        engine.shutdown()


def test_stack_step_means_the_replicas_hops_over_each_run(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """stack_step (stand-ins for the stack and its measures): the load repeat's and the
    one-client run's replica means come from the stats' counts and sums before and after
    each run alone (replicas/jsonlines.py `between`), beside the router's means."""
    from types import SimpleNamespace

    from infra import stack as stack_mod

    running = SimpleNamespace(edge="http://127.0.0.1:1", token="t", config=SimpleNamespace(
        replicas=1, router_replicas=1, data_path="direct"))
    monkeypatch.setattr(stack_mod.Running, "recorded", classmethod(lambda cls, d: running))
    monkeypatch.setattr(stack_mod, "read_state", lambda d: {"engine": {"tp": 1}})
    served = iter(range(100))

    def stats(state_dir: str) -> dict:  # each reading: 10 more requests of 2 ms way in
        n = next(served)
        return {"way_in_ms": {"n": 10, "count": 10 * n, "sum_ms": 20.0 * n},
                "prepare_ms": {"n": 0, "count": 0, "sum_ms": 0.0}, "ttft_ms": {"n": 1}}

    monkeypatch.setattr(gpu_stack, "replica_stats", stats)
    monkeypatch.setattr(gpu_stack, "streaming_chat", lambda *a: {
        "token_ids": [1], "ttft_ms": 1.0, "total_ms": 2.0, "router_ttft_ms": 0.5})
    run = {"output_tokens_per_s": 10.0, "ttft_ms": {"p50": 5.0}, "itl_ms": {"p50": 1.0}}
    monkeypatch.setattr(gpu_stack, "stack_run", lambda *a: dict(run))
    monkeypatch.setattr(gpu_stack, "profiled_run", lambda *a: dict(run))
    monkeypatch.setattr(gpu_stack, "router_times", lambda *a: {
        "router_ttft": (0.0, 0.0), "engine_first_item": (0.0, 0.0),
        "routing_choose": (0.0, 0.0), "queue_probe": (0.0, 0.0)})
    monkeypatch.setattr(gpu_stack, "replica_init_s", lambda: 1.0)
    row = gpu_stack.stack_step("model", "state", "", None)
    assert row["load_repeat_inside"]["replica_means_ms"] == {"way_in_ms": 2.0,
                                                             "prepare_ms": None}
    assert row["sequential_inside"]["replica_means_ms"] == {"way_in_ms": 2.0,
                                                            "prepare_ms": None}
    assert "router_ttft_mean_ms" in row["sequential_inside"] and "vs_engine" not in row


def test_recent_counts_and_sums_beyond_its_window() -> None:
    """A Recent summary's "n" is its window's; "count" and "sum_ms" are every value's,
    so `between` two summaries is the mean of what came between, however many."""
    from replicas.jsonlines import Recent, between

    recent = Recent(size=4)
    for v in (0.001, 0.003):
        recent.add(v)
    before = {"x": recent.summary(), "other": 3}
    for _ in range(10):
        recent.add(0.010)
    after = {"x": recent.summary(), "other": 4, "new": {"count": 1, "sum_ms": 1.0}}
    assert after["x"]["n"] == 4 and after["x"]["count"] == 12
    assert after["x"]["sum_ms"] == 104.0
    assert between(before, after) == {"x": 10.0}
    assert between(after, after) == {"x": None, "new": None}
