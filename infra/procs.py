"""A local stack's processes, read from /proc (no procps: a fresh Debian has no `ps` or
`pgrep`). Every Ray process of a `tpserve up` stack carries the stack's admin token in its
environment (infra/stack.py's stack_env; Ray hands its environment down to raylet,
gcs_server and every worker), so `stack_processes` finds that stack's Ray and no other."""

from __future__ import annotations

import os
from pathlib import Path

ADMIN_TOKEN_ENV = "TPSERVE_ADMIN_TOKEN"
# the servers of a stack that listen, each on its own port (`tpserve up --<name>-port`)
STACK_PORTS = ("nginx", "serve", "dashboard", "ray", "redis")


def processes(environ: bytes | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of every live, non-zombie process but this one; with `environ`,
    only those whose environment holds that NAME=value entry."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            if environ is not None and environ not in (
                    proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append((int(proc.name), args.strip()))
    return found


def cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system, seconds) a live process has used; None once it is
    gone or not ours to read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    """A live process's parent; None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def stack_processes(token: str) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes of the stack whose admin token this is:
    its Ray (raylet, gcs_server, the dashboard, every `ray::` worker). (Redis and nginx,
    started by a Ray actor with an environment of their own, are not among them.)"""
    return processes(f"{ADMIN_TOKEN_ENV}={token}".encode())
