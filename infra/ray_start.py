"""`ray start`, made again when Ray's own start timed out.

Ray 2.60's raylet gives its dashboard agent a fixed 15 s to write each port it listens on
to a file (its agent_register_timeout_ms does not apply there), then aborts ("Timed out
waiting for file .../metrics_agent_port_..." in raylet.out; given that port, it waits for
dashboard_agent_listen_port_..., which `ray start` cannot give it), and `ray start` fails
saying RAY_START_TIMED_OUT. On a busy 2-core machine the agent, a Python process importing
aiohttp, gRPC and OpenTelemetry, took 19-20 s (CI: twice in a row, while the test process
collected beside it); it takes 3-6 s otherwise. Such a start is stopped (`ray stop
--force`: what is left of it) and made again, up to RAY_START_ATTEMPTS in all.

`tpserve up` does this for its own `ray start --block` (infra.stack.start_ray_head);
`ray up`'s nodes do it through this module (infra/start_head.sh on the head, cluster.yaml's
worker_start_ray_commands on the workers):

    python -m infra.ray_start --head --port 6379 ...   # exactly `ray start`'s arguments
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RAY_START_TIMED_OUT = "The current node timed out during startup"
RAY_START_ATTEMPTS = 3


def ray_program() -> str:
    """The `ray` of this interpreter's environment (the project's .venv, also when it is
    not on PATH), else the first on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def starting_again(attempt: int, attempts: int = RAY_START_ATTEMPTS) -> str:
    """What a start made again after a timed-out one says (this module's and `tpserve
    up`'s)."""
    return (f"Ray's start timed out (its processes were slow to start: a busy machine?); "
            f"starting it again, attempt {attempt} of {attempts}")


def run_echoed(cmd: Sequence[str]) -> tuple[int, str]:
    """Run `cmd`, its output (stdout and stderr, merged) echoed to our stdout as it comes;
    its exit status and that output."""
    seen: list[str] = []
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            seen.append(line)
    return proc.returncode, "".join(seen)


def ray_start(args: Sequence[str], attempts: int = RAY_START_ATTEMPTS,
              ray: str | None = None) -> int:
    """`ray start ARGS`, made again (after `ray stop --force`) while it fails saying
    RAY_START_TIMED_OUT, up to `attempts` in all; the last start's exit status. Any other
    failure is not retried: its status comes back at once."""
    ray = ray or ray_program()
    for attempt in range(1, attempts + 1):
        code, output = run_echoed([ray, "start", *args])
        if code == 0 or RAY_START_TIMED_OUT not in output:
            return code
        if attempt == attempts:
            print(f"ray_start: Ray's start timed out {attempts} times (Ray's raylet waits 15 s "
                  "for its dashboard agent): start it again when the machine is less busy",
                  file=sys.stderr, flush=True)
            return code
        run_echoed([ray, "stop", "--force"])
        print(f"ray_start: {starting_again(attempt + 1, attempts)}", flush=True)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    return ray_start(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
