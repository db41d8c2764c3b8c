"""A measurement's output: each result is one JSON line, printed and appended to a file
(replicas/results/*.jsonl, from which the README's tables are made). No engine import:
replicas/structured_libs.py uses it in virtual environments that have torch and
transformers but not the engine's other dependencies."""

from __future__ import annotations

import json
from typing import Any


def emit(row: dict[str, Any], out: str | None) -> None:
    """Print `row` as one JSON line and, given `out`, append it there."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
