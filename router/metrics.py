"""The router's Prometheus metrics (`GET /metrics`). prometheus_client keeps them in its
process-wide registry, which is what a scrape of this process reads."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("tpserve_requests_total", "HTTP generation requests",
                   ["route", "status"])
LATENCY = Histogram("tpserve_request_seconds", "whole request latency", ["route"],
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
FIRST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)  # s to a first token
TTFT = Histogram("tpserve_time_to_first_token_seconds", "time to first token", ["route"],
                 buckets=FIRST_BUCKETS)
# of that time, from handing the request to the engine deployment's handle to its first
# item back: Serve's request routing (the session pin), the way to the replica and back,
# and the replica (its own share is the engine replica's stats' replica_ttft_ms)
ENGINE_FIRST = Histogram("tpserve_engine_first_item_seconds", "engine handle call to its "
                         "first item", buckets=FIRST_BUCKETS)
TOKENS = Counter("tpserve_tokens_total", "tokens", ["kind"])  # prompt | completion
REPLICA_LOAD = Gauge("tpserve_replica_in_flight", "requests in flight per replica",
                     ["replica"])
LIVE_SESSIONS = Gauge("tpserve_live_sessions", "sessions stored in Redis")
PINS_MOVED = Counter("tpserve_pins_moved_total", "sessions re-pinned because their "
                     "replica was gone")
DEGRADED = Gauge("tpserve_redis_degraded", "1 while Redis is unreachable (hash-only pinning)")
# s of a wait of ms: a loop's lag, a frame's age
WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
# the router process's event loop: how late its timers run (router/looplag.py)
LOOP_LAG = Histogram("tpserve_loop_lag_seconds", "the router's event loop lag",
                     buckets=WAIT_BUCKETS)
# an engine request in Serve's request router (cluster/pinning.py): from the handle call to
# each choice of replicas (a request chosen more than once found no replica with room, and
# Serve backed off in between)
ROUTING = Histogram("tpserve_engine_routing_seconds", "engine handle call to a choice of "
                    "replicas", buckets=FIRST_BUCKETS)
# a chat turn's history written to Redis (router/app.py _finish), which the client's
# stream waits for before its last event: a session's next turn with
# `"session": {"append": true}` reads it
HISTORY_APPEND = Histogram("tpserve_history_append_seconds", "a chat turn's history "
                           "written to Redis before the stream's end", buckets=WAIT_BUCKETS)
# our choice of replicas itself (cluster/pinning.py choose_replicas): a new session's
# waits for its Redis claim
CHOICE = Histogram("tpserve_engine_choice_seconds", "the request router's choice of "
                   "replicas, start to end", buckets=WAIT_BUCKETS)
# Serve's probe of a chosen replica's queue length before it sends (cluster/pinning.py):
# Serve probes a replica its cache counts as full (max_ongoing_requests requests sent and
# not yet completed) or has no count for, and the request waits for the answer
QUEUE_PROBE = Histogram("tpserve_engine_queue_probe_seconds", "Serve's probe of replicas' "
                        "queue lengths before a send", buckets=WAIT_BUCKETS)
# the direct data path (cluster/datapath.py): a frame's age as the router reads it, from
# the engine replica's write (wall clocks; one host's, or as far apart as the hosts' are)
FRAME_AGE = Histogram("tpserve_data_path_frame_age_seconds", "engine replica's write of a "
                      "frame to the router's read of it", buckets=WAIT_BUCKETS)
# requests sent down a replica's data connection as soon as it was chosen, ahead of
# Serve's call (cluster/datapath.py, the head start)
HEAD_STARTS = Counter("tpserve_engine_head_starts_total", "engine requests head-started "
                      "on their replica's data connection")
