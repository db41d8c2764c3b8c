"""How late an event loop runs what it was asked to run: its lag, sampled all the time.

A task sleeps `period_s` over and over; each wake-up later than asked is lag: callbacks
ahead of it in the loop's turn, or the thread waiting for the GIL (an engine replica's
loop shares it with the engine's driver thread). A request that comes in meets about
this wait before its first line runs, and a frame that goes out the same after it is
queued (issue 19's way in and way back). No threads; a sample is one timer wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

PERIOD_S = 0.01  # between samples: ~100 wake-ups a second


class LoopLag:
    """Samples the lag of the loop it is started on into `record` (seconds)."""

    def __init__(self, record: Callable[[float], None], period_s: float = PERIOD_S) -> None:
        self.record, self.period_s = record, period_s
        self._task: asyncio.Task[None] | None = None

    def ensure_started(self) -> None:
        """Start sampling the running loop (once; again after that loop closed). Call
        from a coroutine or callback on the loop."""
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._sample(),
                                                                name="tpserve-loop-lag")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                asked = loop.time() + self.period_s
                await asyncio.sleep(self.period_s)
                self.record(max(0.0, loop.time() - asked))
