"""The engine of one replica: requests in, tokens out.

`Engine` runs rank 0 in the calling process and starts ranks 1..tp-1 as processes. A
driver thread owns the scheduler: it takes new requests and aborts from an inbox, runs
steps while there is work, samples, detokenizes and hands each request its deltas.
`generate` (blocking) and `add_request` (async iterator) both go through that thread.

Bad requests are refused in the caller's thread with `RequestError` before they reach
the scheduler, so they never disturb other requests. A failure inside a step (a rank
died, a collective timed out) fails every request in flight with `EngineDeadError`; the
engine then refuses new work, and `healthy()` says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from contextlib import aclosing
from typing import Any

import torch
from transformers import AutoConfig

from replicas.config import ConfigError, EngineConfig, ModelSpec, SamplingParams, StructuredSpec
from replicas.errors import EngineDeadError, RequestError
from replicas.jsonlines import Recent
from replicas.kv_cache import BlockManager
from replicas.outputs import (
    AsyncSink,
    Completion,
    DeltaPost,
    Sink,
    SyncSink,
    TokenDelta,
    TopLogprobs,
    join_deltas,
    streamed,
)
from replicas.ranks import TOLD_EXIT_S, RankLauncher, Ranks, spawn_rank
from replicas.sampler import choose_tokens, token_logprobs
from replicas.scheduler import Scheduled, Scheduler, Sequence
from replicas.structured import Constraint, Grammars
from replicas.tokenizer import IncrementalDecoder, Tokenizer
from replicas.worker import (
    PING_BATCH,
    SHUTDOWN_BATCH,
    StepBatch,
    Worker,
    freeze_heap,
    open_store,
    replay_batch,
)

log = logging.getLogger(__name__)

SLOW_SHUTDOWN_S = 5.0  # a shutdown longer than this logs where its time went


class _Phases:
    """Wall time of a sequence of phases, for a log line that says where a slow one went."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.spent: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.spent.append((name, now - self.last))
        self.last = now

    def report_if_slow(self, what: str, limit_s: float) -> None:
        total = self.last - self.start
        if total > limit_s:
            log.warning("%s took %.1f s (%s)", what, total,
                        ", ".join(f"{n} {s:.1f} s" for n, s in self.spent))

Prompt = str | list[int]


class _Request:
    """Rank 0's state of one request beyond the scheduler's: sampling, text, delivery."""

    def __init__(self, seq: Sequence, decoder: IncrementalDecoder, generator: torch.Generator,
                 sink: Any) -> None:
        self.seq, self.decoder, self.generator, self.sink = seq, decoder, generator, sink
        self.text = ""  # all text so far; `sent` chars of it were delivered
        self.sent = 0
        self.score_rows: list[torch.Tensor] = []
        # prompt_logprobs: per prefilled chunk, on their way to the host (see _to_host):
        # [the log-probability of each next prompt token [m], and with top_logprobs the
        # top values and ids [m, k]], and the event to wait for
        self.prompt_parts: list[tuple[list[torch.Tensor | None],
                                      torch.cuda.Event | None]] = []
        # penalties: how often each token was generated so far (counted as tokens land)
        self.counts: dict[int, int] = {}
        self.hold = max((len(s) for s in seq.params.stop), default=1) - 1
        self.constraint: Constraint | None = None  # structured output's matcher

    def restart(self) -> None:
        """The sequence is computed from its start again (after a preemption): what was
        gathered per prompt position is gathered again."""
        self.score_rows.clear()
        self.prompt_parts.clear()

    def prompt_logprobs(self) -> tuple[list[float | None], list[TopLogprobs | None] | None]:
        """The gathered prompt log-probabilities, on the host: one per prompt token (the
        first None), and the top ones per position if asked for (waits for the steps
        that computed them)."""
        chosen: list[float | None] = [None]
        tops: list[TopLogprobs | None] | None = [None] if self.seq.params.top_logprobs else None
        for (values, top_values, top_ids), ready in self.prompt_parts:
            if ready is not None:
                ready.synchronize()
            assert values is not None
            chosen += values.tolist()
            if tops is not None:
                assert top_values is not None and top_ids is not None
                tops += _pairs(top_ids.tolist(), top_values.tolist())
        self.prompt_parts = []
        return chosen, tops


def _to_host(tensors: list[torch.Tensor | None]
             ) -> tuple[list[torch.Tensor | None], torch.cuda.Event | None]:
    """CUDA tensors copied into pinned host memory behind the work queued so far, and the
    event to wait for before reading them (waiting for that work only, not for steps
    queued after it); CPU tensors as they are, and no event."""
    if not any(t is not None and t.is_cuda for t in tensors):
        return tensors, None
    host: list[torch.Tensor | None] = []
    for t in tensors:
        if t is not None:
            t = torch.empty_like(t, device="cpu").pin_memory().copy_(t, non_blocking=True)
        host.append(t)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _pairs(ids: list[list[int]], values: list[list[float]]) -> list[TopLogprobs]:
    """Rows of top ids and values as rows of (id, log-probability) pairs."""
    return [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]


# the top log-probabilities of a step's sampled rows, on the device: (values [N, k],
# token ids [N, k]), k the largest top_logprobs among them
TopRows = tuple[torch.Tensor, torch.Tensor]


class _Flight:
    """A step's sampled tokens on their way to the host: the next step may already be
    running on them (its input ids say -(j + 1) for row j of `tokens`). With a float16
    all-reduce at tp > 1 the step's overflow flag travels with them, and `step` keeps
    what running the step again needs: (its message, its feed, the rows it sampled)."""

    def __init__(self, entries: list[tuple[_Request, int]], tokens: torch.Tensor,
                 logprobs: torch.Tensor | None, overflow: torch.Tensor | None = None,
                 step: tuple[StepBatch, torch.Tensor | None, list[int]] | None = None,
                 top: TopRows | None = None) -> None:
        self.entries = entries  # (request, the token's index among its outputs, from 1)
        self.tokens = tokens  # [N] int64 on the device
        self.step = step
        self._overflow = None if overflow is None else overflow.clone()  # this step's
        self._send_to_host(logprobs, top)

    def _send_to_host(self, logprobs: torch.Tensor | None, top: TopRows | None) -> None:
        self._host, self._ready = _to_host(
            [self.tokens, logprobs, self._overflow, *(top or (None, None))])

    def overflowed(self) -> bool:
        """Whether the step's 16-bit all-reduce overflowed (waits for the step)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[2] is not None and bool(self._host[2])

    def retake(self, tokens: torch.Tensor, logprobs: torch.Tensor | None,
               top: TopRows | None) -> None:
        """The step's tokens sampled again (after its re-run): in place, so that a next
        step launched on them and run again reads these."""
        self.tokens.copy_(tokens)
        self._overflow = None
        self._send_to_host(logprobs, top)

    def read(self) -> tuple[list[int], list[float], list[TopLogprobs | None]]:
        """The tokens, their log-probabilities (0 where none was asked for) and each
        one's top log-probabilities (None where none were asked for); waits for the
        step that sampled them."""
        if self._ready is not None:
            self._ready.synchronize()
        tokens, logprobs, _, top_values, top_ids = self._host
        assert tokens is not None
        n = len(self.entries)
        tops: list[TopLogprobs | None] = [None] * n
        if top_values is not None and top_ids is not None:
            pairs = _pairs(top_ids.tolist(), top_values.tolist())
            for row, (req, _) in enumerate(self.entries):
                if req.seq.params.logprobs and req.seq.params.top_logprobs:
                    tops[row] = pairs[row][: req.seq.params.top_logprobs]
        return tokens.tolist(), [0.0] * n if logprobs is None else logprobs.tolist(), tops


class Engine:
    """One TP group serving requests. Always call `shutdown()` (or use `with`)."""

    def __init__(self, config: EngineConfig, init_method: str | None = None,
                 launch: RankLauncher = spawn_rank) -> None:
        self.config = config
        self.join_deltas = join_deltas()
        model_dir = self.model_dir = config.resolved_model_dir()
        ModelSpec.from_hf(AutoConfig.from_pretrained(model_dir)).check_tp(config.tp)  # fail early
        # each replica rendezvouses on its own port, so replicas on one node never collide:
        # rank 0's store listens before the ranks start, on a port the kernel picks (a port
        # found free and bound later could be taken in between: seen under load, when the
        # host's outgoing connections took ephemeral ports as fast as they were freed)
        store = None
        if init_method is None and config.tp > 1:
            store = open_store("127.0.0.1", 0, 0, config)
            init_method = f"tcp://127.0.0.1:{store.port}"
        self._ranks = Ranks(config, model_dir, init_method or "", launch)
        try:
            self.tokenizer = Tokenizer(model_dir)  # while the rank processes start
            self.tokenizer.warm()
            self.worker = Worker(config, model_dir, 0, init_method,
                                 peers_alive=self._ranks.all_alive, store=store)
        except BaseException:
            self._ranks.kill()
            raise
        self.spec = self.worker.spec
        self.max_model_len = self.worker.max_model_len
        if self.max_model_len > self.spec.max_position_embeddings:
            self._abandon()
            raise ConfigError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={self.spec.max_position_embeddings}"
            )
        capacity = self.worker.num_blocks * config.block_size
        if capacity < self.max_model_len:
            self._abandon()
            raise ConfigError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len="
                f"{self.max_model_len}: raise kv_cache_memory / num_kv_blocks or lower "
                "max_model_len"
            )
        self.blocks = BlockManager(self.worker.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self._eos = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._device = self.worker.device
        self._default_gen = torch.Generator(self._device).manual_seed(config.seed)
        self._requests: dict[str, _Request] = {}
        self._inbox: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._dead: BaseException | None = None
        self._closed = False
        self._ids = itertools.count()
        self._steps = 0
        self._tokens_out = 0  # tokens generated since start
        self._device_wait_s = 0.0  # time the driver waited for sampled tokens (see _land)
        self._grammars: Grammars | None = None  # made by the first structured request
        self._grammars_lock = threading.Lock()
        self.mask_fill_s = 0.0  # time spent filling structured outputs' token masks
        # add_request to its first delta, the last requests' (stats' ttft_ms)
        self.first_token = Recent()
        # the last step's tokens, still on the device (see _step)
        self._flight: _Flight | None = None
        # at tp > 1 the other ranks get the placeholders' tokens by a broadcast on the
        # device (Worker._share_feed): on GPUs that costs far less than the host round
        # trip it saves; on CPU (gloo) it costs about what it saves, so CPU TP steps
        # read each step's tokens first
        self._ahead = config.async_scheduling and (config.tp == 1
                                                   or self.worker.device.type == "cuda")
        # tokens read back but not yet detokenized and delivered: done while the GPU runs
        # the next step (see _step): (request, token, logprob, its top logprobs, is a stop
        # token, index)
        self._pending: list[tuple[_Request, int, float, TopLogprobs | None, bool, int]] = []
        self.post = DeltaPost()  # the consumers' deltas, sent once a step (see submit)
        # tp > 1: while idle the driver sends a heartbeat this often, so that a rank
        # waiting for the next step never reaches the group's timeout
        self._heartbeat_s = config.dist_timeout_s / 4
        self._thread = threading.Thread(target=self._drive, name="tpserve-driver", daemon=True)
        freeze_heap()
        self._thread.start()
        self._ranks.watch(lambda: not self._closed and self._dead is None, self._rank_died)

    # ---- public API ----

    def generate(self, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams]
                 | None = None) -> list[Completion]:
        """Run `prompts` to completion, batched together; results in prompt order.

        Raises RequestError (nothing is run) if any prompt or parameter is invalid.
        """
        plist = self._params_list(params, len(prompts))
        seqs = [self._make_sequence(p, sp, None) for p, sp in zip(prompts, plist, strict=True)]
        sinks = [SyncSink() for _ in seqs]
        self._submit([("add", (s, k)) for s, k in zip(seqs, sinks, strict=True)])
        out = []
        for seq, sink in zip(seqs, sinks, strict=True):
            sink.done.wait()
            if sink.error is not None:
                raise sink.error
            out.append(self._completion(seq, sink.deltas))
        return out

    async def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[TokenDelta]:
        """Stream a request's deltas; the last one has `finish_reason` set. After the
        first, each delta holds at least `config.stream_interval` tokens (or ends it).

        Leaving the iteration early (break, cancel, client gone) aborts the request.
        Raises RequestError before yielding anything if the request is invalid.
        """
        start = time.perf_counter()
        sink = AsyncSink(asyncio.get_running_loop(), self.post)
        rid = self.submit(prompt, params or SamplingParams(), request_id, sink)
        async with aclosing(streamed(
                sink.queue, self.join_deltas, self.config.stream_interval,
                lambda: self.first_token.add(time.perf_counter() - start),
                lambda: self.abort(rid))) as deltas:
            async for item in deltas:
                yield item

    def submit(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
               sink: Sink) -> str:
        """Start a request whose deltas the driver thread pushes into `sink` (through
        `post` for an AsyncSink, sent once a step); its request id. Raises RequestError
        (nothing is started) if the request is invalid, EngineDeadError if the engine
        no longer serves."""
        seq = self._make_sequence(prompt, params, request_id)
        self._submit([("add", (seq, sink))])
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks return to the pool at the next step boundary."""
        self._submit([("abort", request_id)], check=False)

    def score(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits at every prompt position: [len(prompt), vocab] float32, CPU."""
        seq = self._make_sequence(prompt, SamplingParams(max_tokens=1), None, score=True)
        sink = SyncSink()
        self._submit([("add", (seq, sink))])
        sink.done.wait()
        if sink.error is not None:
            raise sink.error
        return sink.result

    def stats(self) -> dict[str, Any]:
        return {
            "num_kv_blocks": self.blocks.num_blocks,
            "free_kv_blocks": self.blocks.num_free(),
            "prefix_cache_hit_blocks": self.blocks.hit_blocks,
            "preemptions": self.scheduler.preemptions,
            "comm_overflow_retries": self.worker.overflow_retries,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "steps": self._steps,
            "tokens_out": self._tokens_out,
            # waiting for the device's tokens: ~ all of a step when the GPU is the
            # bottleneck, ~0 when the host is (then the GPU idles between steps)
            "device_wait_s": round(self._device_wait_s, 6),
            "tp": self.config.tp,
            "healthy": self.healthy(),
            # rank 0's start-up phases (seconds) and weight bytes: load GB/s is
            # weight_bytes / startup_s["load"]
            "startup_s": dict(self.worker.startup_s),
            "join_deltas": self.join_deltas,
            "stream_interval": self.config.stream_interval,
            # steps that admit prompts, up to this many tokens, in pieces (replicas/pieces.py)
            "piece_graph_tokens": self.config.resolved_piece_graph_tokens(),
            "piece_steps": self.worker.pieces.steps if self.worker.pieces is not None else 0,
            "piece_graph_bytes": (self.worker.pieces.memory_bytes
                                  if self.worker.pieces is not None else 0),
            "weight_bytes": self.worker.weight_bytes,
            # streamed requests' time to first token inside the engine (add_request to
            # its first delta), over the last 512: against a client's TTFT, what the
            # way to the engine and back costs
            "ttft_ms": self.first_token.summary(),
            # of it, the wait for the step that first computes a request, for a slot or
            # the step's token budget (every request, streamed or not, over the last 512)
            "admit_wait_ms": self.scheduler.admit_wait.summary(),
        }

    def healthy(self) -> bool:
        return self._dead is None and not self._closed and self._ranks.all_alive()

    def shutdown(self) -> None:
        """Stop the driver and every rank process, and hand rank 0's GPU memory back;
        idempotent. Bounded in time: ranks that do not leave within seconds are killed."""
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        phases = _Phases()
        # a healthy driver leaves between steps; one stuck in a step with a dead rank
        # may never return, and is left behind (a daemon thread)
        self._thread.join(timeout=30 if self._dead is None else 2)
        phases.mark("driver")
        self._fail_all(EngineDeadError("engine shut down"))
        told = False
        if self._dead is None and not self._thread.is_alive() and self._ranks.all_alive():
            try:
                self.worker.send(SHUTDOWN_BATCH)
                told = True
            except Exception:  # a rank already gone: fall through to killing
                log.warning("could not tell the ranks to stop; killing them")
        self.worker.close(peer_dead=self._dead is not None or self._thread.is_alive())
        phases.mark("group")
        self._ranks.kill(TOLD_EXIT_S if told else 3.0)
        phases.mark("ranks")
        if not self._thread.is_alive():  # else the stuck driver still holds the model
            self.worker.release()
            if self._grammars is not None:  # its fill threads (the driver's alone)
                self._grammars.close()
        phases.mark("memory")
        phases.report_if_slow("engine shutdown", SLOW_SHUTDOWN_S)

    def replay_graph_ms(self, times: int = 50) -> float:
        """GPU time of one batch-1 decode graph replay, every rank replaying together
        (at tp > 1 the graph holds collectives). Only while no request runs."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with self._cond:  # the driver sends its heartbeat under this lock
            if self._ranks.handles:
                self.worker.send(replay_batch(times + 1))
            self.worker.replay_graph(1)
            start.record()
            self.worker.replay_graph(times)
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end) / times

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- requests ----

    def _params_list(self, params: Any, n: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * n
        if len(params) != n:
            raise RequestError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)

    def _make_sequence(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
                       score: bool = False) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be a SamplingParams")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty; send at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.spec.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.spec.vocab_size})")
        if params.max_tokens is None:  # up to the context's end
            if len(ids) >= self.max_model_len:
                raise RequestError(
                    f"prompt ({len(ids)} tokens) leaves no room for a token in "
                    f"max_model_len={self.max_model_len}; shorten the prompt")
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        total = len(ids) + (0 if score else params.max_tokens)
        if total > self.max_model_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds max_model_len={self.max_model_len}; shorten the prompt or lower "
                "max_tokens"
            )
        bad = [t for t in params.logit_bias if t >= self.spec.vocab_size]
        if bad:
            raise RequestError(f"logit_bias names token id {bad[0]}, outside the vocabulary "
                               f"[0, {self.spec.vocab_size})")
        if params.structured is not None and not score:
            self.check_structured(params.structured)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        return Sequence(rid, ids, len(ids), params, score=score)

    def check_structured(self, spec: StructuredSpec) -> None:
        """Compile `spec`'s grammar now (RequestError if the library refuses it). The
        first one of an engine also wraps the tokenizer (~1 s at a 150k vocabulary): an
        async caller runs this in a thread first, so its event loop is not held that
        long; add_request then finds the grammar compiled."""
        try:
            self._structured().check(spec)
        except ConfigError as e:
            raise RequestError(str(e)) from None

    def _structured(self) -> Grammars:
        """The engine's grammars, made on first use (wrapping the tokenizer costs ~1 s at
        a 150k vocabulary: only engines that serve structured outputs pay it)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer.hf, self.spec.vocab_size,
                                          sorted(self._eos), self._device.type == "cuda")
            return self._grammars

    def _submit(self, items: list[tuple[str, Any]], check: bool = True) -> None:
        with self._cond:
            if check and not self.healthy():
                reason = self._dead or ("shut down" if self._closed else "a rank process died")
                raise EngineDeadError(f"engine is not serving: {reason}")
            self._inbox.extend(items)
            self._cond.notify_all()

    def _completion(self, seq: Sequence, deltas: list[TokenDelta]) -> Completion:
        c = Completion(seq.request_id, seq.token_ids[: seq.num_prompt])
        for d in deltas:
            c.token_ids += d.token_ids
            c.text += d.text
            if d.logprobs is not None:
                c.logprobs = (c.logprobs or []) + d.logprobs
            if d.top_logprobs is not None:
                c.top_logprobs = (c.top_logprobs or []) + d.top_logprobs
            if d.prompt_logprobs is not None:
                c.prompt_logprobs = d.prompt_logprobs
                c.prompt_top_logprobs = d.prompt_top_logprobs
            c.finish_reason = d.finish_reason or c.finish_reason
        return c

    # ---- the driver thread ----

    def _drive(self) -> None:
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while not self._inbox and not self.scheduler.has_work() and not self._closed:
                    left = idle_since + self._heartbeat_s - time.monotonic()
                    if self._ranks.handles and left <= 0:
                        break
                    self._cond.wait(timeout=left if self._ranks.handles else None)
                if self._closed or self._dead is not None:
                    return
                inbox, self._inbox = self._inbox, []
                idle = not inbox and not self.scheduler.has_work()
                if idle and not self._heartbeat():  # under the lock: replay_graph_ms sends
                    return
            if idle:
                continue
            for kind, item in inbox:
                self._take(kind, item)
            self.post.send()  # aborts' last deltas
            if not self.scheduler.has_work():
                continue
            try:
                self._step()
                if not self.scheduler.has_work():  # no next step to overlap with
                    self._land()
                    self._deliver()
            except Exception as e:  # noqa: BLE001 - every request must hear of it
                log.exception("engine step failed")
                self._die(e)
                return

    def _heartbeat(self) -> bool:
        """Idle at tp > 1: a step message that runs nothing; False (the engine is dead)
        if a rank cannot be reached."""
        try:
            self.worker.send(PING_BATCH)
        except Exception as e:  # noqa: BLE001 - a rank is gone
            self._die(e)
            return False
        return True

    def _die(self, error: BaseException) -> None:
        """The engine cannot step any more: every request in flight fails."""
        with self._cond:
            if self._dead is None:
                self._dead = error
        self._fail_all(EngineDeadError(f"engine step failed: {error!r}"))

    def _rank_died(self, dead: list[int]) -> None:
        """The rank watcher saw `dead` gone: every request fails within its poll, even
        while rank 0 is blocked in a collective with them (which may never return); the
        group is then aborted so that NCCL's waits end. During shutdown the ranks are
        meant to leave."""
        if self._closed:
            return
        log.error("TP rank(s) %s died; failing every request", dead)
        self._die(RuntimeError(f"TP rank {dead[0]} died"))
        if self._device.type == "cuda":  # NCCL waits on a dead peer for minutes
            self.worker.close(peer_dead=True)

    def _take(self, kind: str, item: Any) -> None:
        if kind == "abort":
            req = self._requests.pop(item, None)
            if req is not None:
                self.scheduler.finish(req.seq)
                req.sink.push(TokenDelta(item, [], "", None, "abort"))
            return
        seq, sink = item
        if seq.request_id in self._requests:
            sink.fail(RequestError(f"request id {seq.request_id!r} is already in use"))
            return
        seed = seq.params.seed
        gen = (torch.Generator(self._device).manual_seed(seed) if seed is not None
               else self._default_gen)
        req = _Request(seq, IncrementalDecoder(self.tokenizer), gen, sink)
        if seq.params.structured is not None and not seq.score:
            req.constraint = self._structured().constraint(seq.params.structured)
        self._requests[seq.request_id] = req
        self.scheduler.add(seq)

    def _step(self) -> None:
        """One step: launch it, then (while the GPU runs it) read the previous step's
        tokens, detokenize and deliver them, then sample this step on the device.

        At tp=1 the next step is launched before this one's tokens are read: each
        sampled sequence grows by a placeholder, -(j + 1) for row j of the sampled
        tokens, which the worker takes from the device, and `_land` writes the real
        token in later. A sequence ended by a stop token or a stop string only found
        then may be in the step just launched: its row is dropped.
        """
        plan = self.scheduler.schedule()
        if not plan:
            raise RuntimeError("scheduler has work but scheduled nothing")
        batch, rows = self._batch(plan)
        self.worker.send(batch)
        feed = self._flight.tokens if self._flight else None
        logits = self.worker.execute(batch, feed)
        if self._land(batch):  # the step before overflowed and was run again: so is this
            logits = self.worker.rerun_float32(batch, feed)  # one, on the corrected tokens
        self._deliver()
        self._steps += 1
        live = [(item, r) for item, r in zip(plan, rows, strict=True)
                if item.seq.request_id in self._requests]
        sampled: list[tuple[_Request, int]] = []  # (request, its row of the logits)
        scored: list[tuple[_Request, int, int]] = []  # (request, its rows)
        prompts: list[tuple[_Request, int, int, int]] = []  # (request, row, position, n)
        for item, (start, end) in live:
            seq = item.seq
            req = self._requests[seq.request_id]
            if seq.wants_every_logit:  # a row per token: scoring, or prompt logprobs
                if seq.num_computed == 0:  # (re)started after preemption
                    req.restart()
                if seq.score:
                    scored.append((req, start, end))
                else:
                    prompts.append((req, start, seq.num_computed, item.num_tokens))
            if not seq.score and item.samples:  # (its last row)
                sampled.append((req, end - 1))
            self.scheduler.advance(item)
        overflow = self.worker.overflow_flag()
        # a float16 all-reduce's overflow is read with the step's sampled tokens (`_land`);
        # read now (a wait) when rows per position are used at once or nothing is sampled
        if overflow is not None and (scored or prompts or not sampled) and bool(overflow):
            logits = self.worker.rerun_float32(batch, feed)
        for req, start, pos, n in prompts:
            self._gather_prompt_logprobs(req, logits, start, pos, n)
        for req, start, end in scored:
            req.score_rows.append(logits[start:end].cpu())
            if req.seq.num_computed == len(req.seq.token_ids):
                self._finish_score(req)
        if sampled:
            reqs = [r for r, _ in sampled]
            at = [row for _, row in sampled]
            tokens, logprobs, top = self._sample(logits, reqs, at, self.worker.greedy)
            self._flight = _Flight([(r, self._accept(r, -(j + 1))) for j, r in enumerate(reqs)],
                                   tokens, logprobs, overflow, (batch, feed, at), top)
            if not self._ahead:
                self._land()
                if self._device.type == "cpu":
                    # the step ran synchronously: no device work to hide the text behind,
                    # so waiting for the next step would only delay these tokens by it
                    # (measured: +18 ms on every first token of the CPU load model)
                    self._deliver()

    def _sample(self, logits: torch.Tensor, reqs: list[_Request], at: list[int],
                greedy: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, TopRows | None]:
        """Sample row at[i] of the logits for reqs[i], on the device: tokens, their
        log-probabilities if asked for, the top log-probabilities if asked for.

        Structured requests' rows are chosen among the tokens their grammar allows: the
        masks are filled on the host here, while the device still runs the step's
        forward (launched before), and applied behind it; a graph's argmax is then not
        used. Every earlier token of theirs is on the host by now: `_land` read the
        step before (its matchers took those tokens) before this step is sampled."""
        # a decode step samples every row in order: no gather of the logits then (and its
        # graph may have taken their argmax already: choose_tokens drops it for rows
        # whose logits a penalty or bias changes)
        in_order = at == list(range(len(at)))
        picked = logits[: len(at)] if in_order else logits[
            torch.tensor(at).to(logits.device, non_blocking=True)]
        rows = [i for i, r in enumerate(reqs) if r.constraint is not None]
        choose = None
        if rows:
            grammars = self._structured()
            start = time.perf_counter()
            bitmask = grammars.fill([reqs[i].constraint for i in rows])
            self.mask_fill_s += time.perf_counter() - start
            choose = grammars.apply(picked, rows, bitmask)
        params = [r.seq.params for r in reqs]
        tokens = choose_tokens(
            picked, params, [r.generator for r in reqs],
            argmax=greedy[: len(at)] if in_order and greedy is not None else None,
            counts=[r.counts for r in reqs], choose=choose)
        if not any(p.logprobs for p in params):
            return tokens, None, None
        # one log-softmax for the chosen tokens' log-probabilities and the top ones
        top = max(p.top_logprobs for p in params if p.logprobs)
        logprobs, values, ids = token_logprobs(picked, tokens, top)  # [N], [N, top] each
        return tokens, logprobs, None if values is None or ids is None else (values, ids)

    def _gather_prompt_logprobs(self, req: _Request, logits: torch.Tensor, row: int,
                                pos: int, n: int) -> None:
        """Logits rows row.. are the request's positions pos..pos+n-1: each of them but
        the prompt's last predicts the next prompt token. Its log-probability (and the
        top ones) are gathered on the device and copied to the host behind the step; they
        go out with the request's first token."""
        seq = req.seq
        m = min(n, seq.num_prompt - 1 - pos)
        if m <= 0:
            return
        targets = torch.tensor(seq.token_ids[pos + 1 : pos + 1 + m])
        req.prompt_parts.append(_to_host(list(token_logprobs(
            logits[row : row + m], targets.to(logits.device, non_blocking=True),
            seq.params.top_logprobs))))

    def _batch(self, plan: list[Scheduled]) -> tuple[StepBatch, list[tuple[int, int]]]:
        """The step message, and per scheduled item the rows of the logits it owns."""
        ids: list[int] = []
        positions: list[int] = []
        logits_at: list[int] = []
        rows = []
        for item in plan:
            seq, start = item.seq, item.seq.num_computed
            first = len(logits_at)
            if seq.wants_every_logit:
                logits_at.extend(range(len(ids), len(ids) + item.num_tokens))
            elif item.samples:
                logits_at.append(len(ids) + item.num_tokens - 1)
            rows.append((first, len(logits_at)))
            ids += seq.token_ids[start : start + item.num_tokens]
            positions += range(start, start + item.num_tokens)
        batch = StepBatch(tuple(ids), tuple(positions), tuple(i.num_tokens for i in plan),
                          tuple(tuple(i.seq.block_table) for i in plan), tuple(logits_at))
        return batch, rows

    def _accept(self, req: _Request, placeholder: int) -> int:
        """A token was sampled (its value still on the device): the sequence grows by a
        placeholder (the next step needs its length) and, if max_tokens is reached,
        leaves the scheduler. Returns the token's index among the outputs (from 1)."""
        seq = req.seq
        seq.token_ids.append(placeholder)
        self._tokens_out += 1
        index = len(seq.token_ids) - seq.num_prompt
        if index >= seq.params.max_tokens:
            self.scheduler.finish(seq)
        return index

    def _land(self, launched: StepBatch | None = None) -> bool:
        """Read the last sampled step's tokens: each takes its placeholder's place; a
        stop token ends its sequence (and drops a placeholder launched after it).
        Text and delivery wait for `_deliver`. A step whose float16 all-reduce overflowed
        is run again in float32 and sampled again first; then True: `launched`, a step
        run on its tokens since, must run again too (its KV slots are zeroed first)."""
        flight, self._flight = self._flight, None
        if flight is None:
            return False
        start = time.perf_counter()
        redone = flight.overflowed()
        if redone:  # its float16 all-reduce overflowed: run it again, sample again
            assert flight.step is not None
            if launched is not None:
                self.worker.clear(launched)
            batch, feed, at = flight.step
            logits = self.worker.rerun_float32(batch, feed)
            flight.retake(*self._sample(logits, [r for r, _ in flight.entries], at, None))
        tokens, logprobs, tops = flight.read()
        self._device_wait_s += time.perf_counter() - start
        for (req, index), token, logprob, top in zip(flight.entries, tokens, logprobs, tops,
                                                     strict=True):
            seq, params = req.seq, req.seq.params
            at = seq.num_prompt + index - 1
            seq.token_ids[at] = token
            if params.presence_penalty or params.frequency_penalty:  # before its next token
                req.counts[token] = req.counts.get(token, 0) + 1
            stop_token = token in params.stop_token_ids or (
                token in self._eos and not params.ignore_eos)
            # a structured request also ends once its grammar is over ("stop" in _emit)
            over = req.constraint is not None and req.constraint.advance(token)
            if stop_token or over:
                self.scheduler.finish(seq)
                self._tokens_out -= len(seq.token_ids) - at - 1
                del seq.token_ids[at + 1:]
            self._pending.append((req, token, logprob, top, stop_token, index))
        return redone

    def _deliver(self) -> None:
        """Detokenize the read tokens, check stop strings, hand out the deltas."""
        pending, self._pending = self._pending, []
        requests = self._requests
        for req, token, logprob, top, stop_token, index in pending:
            if requests.get(req.seq.request_id) is req:  # not aborted or ended
                self._emit(req, token, logprob, top, stop_token, index)
        self.post.send()

    def _emit(self, req: _Request, token: int, logprob: float, top: TopLogprobs | None,
              stop_token: bool, index: int) -> None:
        seq, params = req.seq, req.seq.params
        finish = None
        if stop_token:
            finish = "stop"
        else:
            req.text += req.decoder.push(token)
            if params.stop and (cut := _find_stop(req.text, params.stop, req.sent)) is not None:
                req.text, finish = req.text[:cut], "stop"
        if finish is None and req.constraint is not None and req.constraint.over:
            finish = "stop"
        if finish is None and index >= params.max_tokens:
            finish = "length"
        upto = len(req.text) if finish else max(req.sent, len(req.text) - req.hold)
        delta = TokenDelta(seq.request_id, [token], req.text[req.sent : upto],
                           [logprob] if params.logprobs else None, finish,
                           [top] if top is not None else None)
        if params.prompt_logprobs and index == 1:
            delta.prompt_logprobs, delta.prompt_top_logprobs = req.prompt_logprobs()
        req.sent = upto
        listening = req.sink.push(delta)
        if finish or not listening:
            self.scheduler.finish(seq)
            del self._requests[seq.request_id]

    def _finish_score(self, req: _Request) -> None:
        self.scheduler.finish(req.seq)
        del self._requests[req.seq.request_id]
        req.sink.result = torch.cat(req.score_rows)
        req.sink.push(TokenDelta(req.seq.request_id, [], "", None, "length"))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            pending = [item for kind, item in self._inbox if kind == "add"]
            self._inbox = []
        for _seq, sink in pending:
            sink.fail(error)
        for req in list(self._requests.values()):
            req.sink.fail(error)
        self._requests.clear()

    def _abandon(self) -> None:
        self.worker.send(SHUTDOWN_BATCH)
        self.worker.close()
        self._ranks.kill(TOLD_EXIT_S)


def _find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Index where the earliest stop string starts in the not-yet-final tail, if any."""
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
