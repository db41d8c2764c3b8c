"""A measurement's output: each result is one JSON line, printed and appended to a file
(replicas/results/*.jsonl, from which the README's tables are made). No engine import:
replicas/structured_libs.py uses it in virtual environments that have torch and
transformers but not the engine's other dependencies."""

from __future__ import annotations

import json
import statistics
import threading
from collections import deque
from typing import Any


def emit(row: dict[str, Any], out: str | None) -> None:
    """Print `row` as one JSON line and, given `out`, append it there."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> dict[str, float]:
    """mean, p50, p90, p99 and max of `values` times `scale`, rounded to `digits` (the
    q-th percentile: the value at index int(q * n) of the sorted values)."""
    ordered = sorted(values)
    out = {"mean": statistics.mean(ordered)}
    out.update({name: ordered[min(len(ordered) - 1, int(len(ordered) * q))]
                for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))})
    out["max"] = ordered[-1]
    return {k: round(v * scale, digits) for k, v in out.items()}


class Recent:
    """The last `size` durations (seconds) of something a server does per request, for
    its stats: `summary()` is their count and spread in ms, and the count and sum of all
    so far (two summaries' difference: the mean over what came between them, `between`).
    Appends from any thread."""

    def __init__(self, size: int = 512) -> None:
        self._seconds: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._count, self._sum = 0, 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)
            self._count += 1
            self._sum += seconds

    def summary(self) -> dict[str, float]:
        """{"n": the last ones' count} and, when there are any, their mean/p50/p90/p99/
        max in ms; "count" and "sum_ms" of all so far."""
        with self._lock:
            seconds, count, total = list(self._seconds), self._count, self._sum
        return {"n": len(seconds), **(spread(seconds, 1e3, 2) if seconds else {}),
                "count": count, "sum_ms": round(total * 1e3, 3)}


def between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    """The mean (ms) of what each Recent summary in `after` recorded since `before` (two
    stats dicts holding summaries under the same keys), by their counts and sums; None
    for one that recorded nothing between them."""
    out: dict[str, float | None] = {}
    for key, summary in after.items():
        old = before.get(key)
        if not (isinstance(summary, dict) and "sum_ms" in summary and isinstance(old, dict)
                and "sum_ms" in old):
            continue
        count = summary["count"] - old["count"]
        out[key] = round((summary["sum_ms"] - old["sum_ms"]) / count, 3) if count else None
    return out
