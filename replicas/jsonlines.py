"""A measurement's output: each result is one JSON line, printed and appended to a file
(replicas/results/*.jsonl, from which the README's tables are made). No engine import:
replicas/structured_libs.py uses it in virtual environments that have torch and
transformers but not the engine's other dependencies."""

from __future__ import annotations

import json
import statistics
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
    its stats: `summary()` is their count and spread in ms. Appends from any thread."""

    def __init__(self, size: int = 512) -> None:
        self._seconds: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._seconds.append(seconds)

    def summary(self) -> dict[str, float]:
        """{"n": count} and, when there are any, mean/p50/p90/p99/max in ms."""
        seconds = list(self._seconds)
        return {"n": len(seconds), **(spread(seconds, 1e3, 2) if seconds else {})}
