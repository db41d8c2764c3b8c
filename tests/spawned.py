"""Run a function on new rank processes and collect what each reports (the TP tests'
harness: tests/test_parallel.py, tests/test_shm.py)."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import pytest

from replicas.ranks import free_port, rank_context

# what a rank reports when its group's port was taken between `free_port` and its bind
# (another process's connection can take a just-freed ephemeral port)
PORT_TAKEN = "EADDRINUSE"


class _PortTaken(Exception):
    pass


def run_spawned(target: Callable[..., None], args: tuple[Any, ...], world: int, expect: int,
                timeout_s: float, join_s: float, attempts: int = 3
                ) -> tuple[dict[int, Any], list[int | None]]:
    """Start `world` processes `target(rank, port, *args, out)`, each putting
    (rank, results, traceback or None) on `out`; take `expect` reports, failing the test on
    a silent timeout or a rank's error. Returns the results by rank and the exit codes
    after waiting join_s for each process (None: still running, then killed). A group
    whose port was taken before rank 0 bound it starts again on a new port, up to
    `attempts` times in all."""
    for _ in range(attempts - 1):
        try:
            return _run_once(target, args, world, expect, timeout_s, join_s, retry_port=True)
        except _PortTaken:
            continue
    return _run_once(target, args, world, expect, timeout_s, join_s, retry_port=False)


def _run_once(target: Callable[..., None], args: tuple[Any, ...], world: int, expect: int,
              timeout_s: float, join_s: float, retry_port: bool
              ) -> tuple[dict[int, Any], list[int | None]]:
    # forked from the fork server the engine's ranks use: clean processes that need not
    # import torch again, each
    ctx = rank_context()
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, out), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        for _ in range(expect):
            try:
                rank, results, error = out.get(timeout=timeout_s)
            except queue.Empty:
                pytest.fail(f"ranks did not report within {timeout_s}s "
                            f"(exit codes {[p.exitcode for p in procs]})")
            if error is not None and retry_port and PORT_TAKEN in error:
                raise _PortTaken(error)
            if error is not None:
                pytest.fail(f"rank {rank} failed:\n{error}")
            got[rank] = results
        for p in procs:
            p.join(timeout=join_s)
        return got, [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        out.close()
