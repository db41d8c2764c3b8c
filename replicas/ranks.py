"""Ranks 1..tp-1 of an engine: how one is started and what the engine holds of it.

A rank runs `worker.rank_main` until rank 0 sends the shutdown message. `spawn_rank`
starts it as a local process; cluster/ launches Ray actors through the same
`RankLauncher` signature. Each engine rendezvouses on its own port (`free_port`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Callable
from typing import Protocol

from replicas.config import EngineConfig
from replicas.worker import rank_main

log = logging.getLogger(__name__)


class RankHandle(Protocol):
    """A running rank 1..tp-1 (a process here, a Ray actor in cluster/)."""

    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...
    def kill(self) -> None: ...


# (config, model_dir, rank, init_method) -> a started rank that runs worker.rank_main
RankLauncher = Callable[[EngineConfig, str, int, str], RankHandle]


def _rank_process(config: EngineConfig, model_dir: str, rank: int, init_method: str) -> None:
    """A spawned rank: the worker loop, then out at once. The interpreter's own exit
    would finalize NCCL and CUDA state again, which can wait on peers."""
    code = 0
    try:
        rank_main(config, model_dir, rank, init_method)
    except BaseException:  # noqa: BLE001 - reported, then the exit code says it
        log.exception("rank %d failed", rank)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def spawn_rank(config: EngineConfig, model_dir: str, rank: int, init_method: str) -> RankHandle:
    """Start a rank as a local process (spawned: CUDA and threads start clean)."""
    proc = mp.get_context("spawn").Process(
        target=_rank_process, args=(config, model_dir, rank, init_method), daemon=True,
        name=f"tpserve-rank{rank}",
    )
    proc.start()
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
