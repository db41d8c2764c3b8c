"""What the measurement scripts (infra/load.py, infra/overhead.py, infra/chaos.py,
infra/soak.py) share around their figures: the summary of a run's turns (percentiles,
errors, sessions moved), the environment of a result line (git revision, host, versions,
command), printing and appending it as a JSON line, the command line of a script driven by
a config dataclass, and the environment of a Ray driver connected to the local stack."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.client import Turn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "infra" / "results"


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


def _mean_ms(values: list[float]) -> float | None:
    return round(1e3 * sum(values) / len(values), 2) if values else None


def cycle_ms(records: list[Turn]) -> dict[str, float | None]:
    """Where a closed-loop client's time goes, means over the run's completed requests
    (ms): `request` (sent to its end: [DONE] read, or the engine's last item), of it
    `ttft`, `first_to_last` (first content chunk to the last) and `after_last` (the last
    content chunk to the end: the usage chunk, [DONE], what the server does before them);
    then `between`, a client's end of one request to its next request's start. A
    client's tok/s is its tokens over request + between, so these split a stack's tok/s
    gap to the engine alone (replicas/PERF.md v0.41)."""
    ok = [r for r in records if r.ok and r.token_times and r.ended]
    by_client: dict[int, list[Turn]] = {}
    for r in records:
        if r.client >= 0 and r.ended:
            by_client.setdefault(r.client, []).append(r)
    between = [b.started - a.ended for turns in by_client.values()
               for a, b in zip(turns, turns[1:], strict=False)]
    return {"request": _mean_ms([r.ended - r.started for r in ok]),
            "ttft": _mean_ms([r.token_times[0] - r.started for r in ok]),
            "first_to_last": _mean_ms([r.token_times[-1] - r.token_times[0] for r in ok]),
            "after_last": _mean_ms([r.ended - r.token_times[-1] for r in ok]),
            "between": _mean_ms(between)}


def summarize(records: list[Turn], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    return {
        "requests": len(records), "ok": len(ok),
        "refused": sum(not r.accepted and r.error != "hang" for r in records),
        "failed_accepted": sum(r.accepted and not r.ok for r in records),
        "hung": sum(r.error == "hang" for r in records),
        "retried": sum(r.retries > 0 for r in records),
        "ttft_ms": ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        # of it, the router's own (its Server-Timing header) and the rest of the way:
        # nginx, uvicorn, the stream's write, this client's read (PERF.md v0.66)
        **({"router_ttft_ms": ms([r.router_s for r in timed]),
            "outside_router_ttft_ms": ms([r.ttft_s - r.router_s for r in timed])}
           if (timed := [r for r in ok if r.ttft_s is not None and r.router_s is not None])
           else {}),
        "itl_ms": ms([gap for r in ok for gap in r.itl_s()]),
        "output_tokens_per_s": round(sum(r.completion_tokens for r in ok) / wall_s, 1)
        if wall_s > 0 else None,
        "sessions": len({r.session for r in records}),
        "sessions_moved": sessions_moved(records),
        "wall_s": round(wall_s, 1),
        "cycle_ms": cycle_ms(records),
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
