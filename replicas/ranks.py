"""Ranks 1..tp-1 of an engine: how one is started, watched and stopped.

A rank runs `worker.rank_main` until rank 0 sends the shutdown message. `spawn_rank`
starts it as a local process; cluster/ launches Ray actors through the same
`RankLauncher` signature. Each engine rendezvouses on its own port (`free_port`).
`Ranks` holds one engine's ranks: whether all are alive, which died, a watcher thread
that reports a death, and a kill bounded in time. What a death means (failing the
requests, aborting the group) is the engine's.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from replicas.config import EngineConfig

log = logging.getLogger(__name__)

# how long ranks told to stop may take to leave before they are killed: one leaves in
# ~0.5 s on an idle 2-core host, but a loaded 2-core CI machine once took over 3 s
TOLD_EXIT_S = 15.0


class RankHandle(Protocol):
    """A running rank 1..tp-1 (a process here, a Ray actor in cluster/)."""

    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def kill(self) -> None: ...


# (config, model_dir, rank, init_method) -> a started rank that runs worker.rank_main
RankLauncher = Callable[[EngineConfig, str, int, str], RankHandle]


def thread_lock_for_tqdm() -> None:
    """tqdm (the weights' progress bar) makes a multiprocessing lock on first use, a
    semaphore this process's os._exit would leave for the resource tracker to report
    ("leaked semaphore objects") at the caller's exit: a thread lock serves one process."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _rank_process(config: EngineConfig, model_dir: str, rank: int, init_method: str,
                  environ: dict[str, str] | None = None) -> None:
    """A started rank: the worker loop, then out at once. The interpreter's own exit
    would finalize NCCL and CUDA state again, which can wait on peers. `environ`: the
    engine's environment when it started the rank (the fork server's is older)."""
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    thread_lock_for_tqdm()
    code = 0
    try:
        from replicas.worker import rank_main  # (torch: not where the engine's caller is)

        rank_main(config, model_dir, rank, init_method)
    except BaseException:  # noqa: BLE001 - reported, then the exit code says it
        log.exception("rank %d failed", rank)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def rank_context() -> mp.context.ForkServerContext:
    """multiprocessing's fork server, which imports the worker once (torch, Triton; not
    transformers: rank 0 shares the model's config): a process forked from it is clean
    (the server is started as a new interpreter and touches no CUDA, so CUDA and threads
    start clean, as with spawn) and starts without importing them again (about 2 s of CPU
    a rank on a small host)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["replicas.worker"])
    return ctx


def spawn_rank(config: EngineConfig, model_dir: str, rank: int, init_method: str) -> RankHandle:
    """Start a rank as a local process from `rank_context`'s fork server. The rank gets
    this process's current environment, as a spawned one would."""
    proc = rank_context().Process(
        target=_rank_process, args=(config, model_dir, rank, init_method, dict(os.environ)),
        daemon=True, name=f"tpserve-rank{rank}",
    )
    proc.start()
    return proc


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    return free_ports(["port"])["port"]


# Where free_ports picks: a server of ours binds its port seconds after the pick (the
# stack's Redis and nginx start after Ray), and a port the kernel picks (bind to 0) comes
# from its ephemeral range, where every outgoing connection of those seconds takes one
# too: CI saw Redis's port taken so. So the picks come from above Ray's worker ports
# (10002-19999 by default) and below Serve's direct-ingress ports (30000-31000) and the
# kernel's ephemeral range (from 32768 by default); the kernel picks where that range
# starts lower or this range is full.
PICK_RANGE = (20000, 30000)
PICK_TRIES = 64


def _pick_range() -> tuple[int, int] | None:
    """PICK_RANGE, cut below the kernel's ephemeral ports; None if too little is left."""
    low, high = PICK_RANGE
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass  # (not Linux: the kernel's own range is unknown, PICK_RANGE stands)
    return (low, high) if high - low >= 1000 else None


def free_ports(names: Iterable[str]) -> dict[str, int]:
    """A distinct loopback port for each of `names`, free a moment ago, outside the
    kernel's ephemeral range where it can (PICK_RANGE). Each is held open until all are
    picked: ports picked one after another (each closed before the next) can repeat, and
    two servers of one stack then fight over one port."""
    span = _pick_range()
    with contextlib.ExitStack() as held:
        ports = {}
        for name in names:
            s = held.enter_context(socket.socket())
            ports[name] = _bind_free(s, span)
        return ports


def _bind_free(s: socket.socket, span: tuple[int, int] | None) -> int:
    """Bind `s` on loopback to a random free port of `span` (PICK_TRIES tries), else to
    one the kernel picks; the port."""
    if span is not None:
        for _ in range(PICK_TRIES):
            port = random.randrange(*span)
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Ranks:
    """The running ranks 1..tp-1 of one engine (none at tp=1)."""

    def __init__(self, config: EngineConfig, model_dir: str, init_method: str,
                 launch: RankLauncher) -> None:
        self.handles = [launch(config, model_dir, r, init_method) for r in range(1, config.tp)]

    def all_alive(self) -> bool:
        return all(h.is_alive() for h in self.handles)

    def dead(self) -> list[int]:
        """The ranks (numbered from 1) that are no longer running."""
        return [r for r, h in enumerate(self.handles, start=1) if not h.is_alive()]

    def watch(self, serving: Callable[[], bool], on_death: Callable[[list[int]], None]) -> None:
        """tp > 1: a daemon thread checks the ranks every 0.25 s while `serving()` and, at
        the first death it sees, calls `on_death(dead ranks)` once and ends. It never
        waits on a rank, so a death is reported even while rank 0 is blocked in a
        collective with the dead rank (which may never return)."""
        if self.handles:
            threading.Thread(target=self._watch, args=(serving, on_death),
                             name="tpserve-rank-watch", daemon=True).start()

    def _watch(self, serving: Callable[[], bool],
               on_death: Callable[[list[int]], None]) -> None:
        while serving():
            dead = self.dead()
            if dead:
                on_death(dead)
                return
            time.sleep(0.25)

    def kill(self, grace_s: float = 3.0) -> None:
        """Give the ranks `grace_s` in all to leave, then kill each one still running
        (logged). Ranks told to stop get `TOLD_EXIT_S`."""
        deadline = time.monotonic() + grace_s
        for r, h in enumerate(self.handles, start=1):
            h.join(timeout=max(0.0, deadline - time.monotonic()))
            if h.is_alive():
                log.warning("rank %d still running %.0f s after shutdown began; killed",
                            r, grace_s)
                h.kill()
                h.join(timeout=5)
