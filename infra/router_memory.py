"""A router process's cost: `python -m infra.router_memory [--tree DIR | --state-dir DIR]`.

By default runs, `--runs` times, a fresh Python that imports `router.app` and builds its
FastAPI app (as a router replica does before its first request), from the source tree DIR
(this checkout by default; an exported older commit to compare). Prints and appends one
JSON line: the median resident memory (VmRSS) and import time, and which of torch,
transformers and Ray the import loaded.

With `--state-dir` (a running `tpserve up` stack's state dir), measures the stack's own
Serve replica processes instead: each one's VmRSS and whether torch's library is mapped
into it, found by the stack's admin token in their environment (so no other stack's or
Ray's processes). A router replica imports more than `router.app` (Ray, Serve,
cluster.app), and this is what it holds while it serves.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infra.procs import stack_processes

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "ray")
# the app as a router replica builds it: make_api(Router(...)) here, a module-level `api`
# in trees where the Serve ingress class defined the routes
PROBE = f"""
HEAVY = {HEAVY!r}
import json, sys, time
start = time.perf_counter()
import router.app as app
api = app.make_api(app.Router(engine=None)) if hasattr(app, "make_api") else app.api
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({{"seconds": seconds,
                   "rss_kib": int(status["VmRSS"].split()[0]),
                   "loaded": sorted(m for m in HEAVY if m in sys.modules)}}))
"""


def probe(tree: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tree, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    return json.loads(out.splitlines()[-1])


def git_rev(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def measure(tree: Path, runs: int, rev: str | None) -> dict[str, Any]:
    samples = [probe(tree) for _ in range(runs)]
    return {"kind": "router_memory", "runs": runs,
            "rss_mib_p50": round(statistics.median(s["rss_kib"] for s in samples) / 1024, 1),
            "import_s_p50": round(statistics.median(s["seconds"] for s in samples), 3),
            "loaded": samples[0]["loaded"], "git_rev": rev or git_rev(tree),
            "host": {"cpu": platform.machine(), "python": platform.python_version()},
            "command": " ".join(["python -m infra.router_memory", *sys.argv[1:]]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def serve_processes(token: str) -> list[dict[str, Any]]:
    """The Serve replica and rank actor processes of the stack whose admin token this is
    (infra/procs.py): their role (the process title Ray gives them), VmRSS and whether
    libtorch is mapped."""
    found = []
    for pid, args in stack_processes(token):
        if not args.startswith(("ray::ServeReplica", "ray::RankActor")):
            continue
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status")
                          .read_text().splitlines() if ":" in line)
            torch = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # gone meanwhile
            continue
        found.append({"role": args.removeprefix("ray::").split()[0],
                      "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
                      "torch_mapped": torch})
    return sorted(found, key=lambda p: p["role"])


def measure_stack(state_dir: Path, rev: str | None) -> dict[str, Any]:
    processes = serve_processes((state_dir / "admin_token").read_text().strip())
    routers = [p for p in processes if "Router" in p["role"]]
    if not routers:
        raise SystemExit(f"no router replica of the stack in {state_dir} is running")
    return {"kind": "router_replica_memory",
            "rss_mib": max(p["rss_mib"] for p in routers),
            "torch_mapped": any(p["torch_mapped"] for p in routers),
            "processes": processes, "git_rev": rev or git_rev(REPO),
            "host": {"cpu": platform.machine(), "python": platform.python_version()},
            "command": "python -m infra.router_memory --state-dir STATE",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.router_memory")
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree to import from")
    parser.add_argument("--rev", help="the tree's commit, when it is not a git checkout")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--state-dir", type=Path,
                        help="measure this running stack's replica processes instead")
    parser.add_argument("--out", default=str(REPO / "infra" / "results" /
                                             "router_memory_cpu.jsonl"))
    args = parser.parse_args(argv)
    row = (measure_stack(args.state_dir, args.rev) if args.state_dir
           else measure(args.tree, args.runs, args.rev))
    print(json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
