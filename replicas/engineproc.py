"""An Engine in a process of its own: `EngineProcess`, for a caller whose own process is
busy with something else (an engine replica's event loop: Serve's calls, the direct data
path's frames), so that the engine's driver thread and that caller do not share a GIL.

The caller's process keeps the tokenizer (chat templates, prompts, logprobs' texts) and
the same async API as `Engine` for what a replica uses: `add_request`, `abort`,
`check_structured`, `stats`, `healthy`, `shutdown`, `tokenizer`, `spec`, `config`. The
child runs the Engine (rank 0 and its driver) and speaks over one pipe:

- caller -> child: ("add", id, token ids, params), ("abort", id), ("call", n, method,
  args), ("shutdown", n), ("reply", n, ok, value) (to the child's rank calls);
- child -> caller: ("deltas", [(id, delta or exception)]) once a step, ("reply", n, ok,
  value), ("ready", info) or ("failed", exception) once, ("launch", n, config, model
  dir, rank, init method) and ("rank", n, rank, op, arg) (below).

At tp > 1 with a `launch` (a Ray replica's rank actors, whose handles live in the
caller's process) the child's ranks are started and watched through the caller: each
RankHandle call is a ("rank", ...) message. Without one, the child starts its ranks as
local processes (`spawn_rank`).

A child whose caller goes away (the pipe closes: the replica killed) shuts its engine
down and exits; a caller whose child goes away fails every stream with EngineDeadError
and reports itself unhealthy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import multiprocessing.util
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing
from multiprocessing.connection import Connection
from typing import Any

from replicas.config import (
    ConfigError,
    EngineConfig,
    ModelSpec,
    SamplingParams,
    StructuredSpec,
    check_model_dir,
)
from replicas.errors import EngineDeadError, RequestError
from replicas.jsonlines import Recent
from replicas.outputs import DeltaPost, TokenDelta, join_deltas, streamed
from replicas.ranks import RankHandle, RankLauncher, thread_lock_for_tqdm

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0  # a GLM-4-9B-sized start is ~20-60 s; tuning caches can add
CALL_TIMEOUT_S = 60.0  # stats, healthy, check_structured (a grammar's first compile ~1 s)
HEALTH_TIMEOUT_S = 10.0  # a child that cannot answer this fast is reported unhealthy
SHUTDOWN_TIMEOUT_S = 90.0  # the Engine's own shutdown is bounded (~30 s + rank kills)
CALLS = ("stats", "healthy", "check_structured")  # the Engine methods a caller may call


def engine_context() -> mp.context.ForkServerContext:
    """A fork server that has imported the engine (torch, transformers): an engine child
    forked from it starts clean (no CUDA, no threads: the server is a new interpreter)
    without importing them again, and without re-running the caller's main module (a
    Ray worker's), which a spawned child would."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["replicas.engine"])
    return ctx


def start_fork_server() -> None:
    """Start `engine_context`'s fork server now, if it is not running: it imports the
    engine (seconds) while the caller goes on with its own start (its imports, its
    tokenizer); an EngineProcess made later forks from it. (An engine replica calls this
    first thing: PERF.md v0.54 measured 14 s more to RUNNING with the imports in turn.)"""
    from multiprocessing import forkserver

    engine_context()
    forkserver.ensure_running()


def portable(error: BaseException) -> BaseException:
    """`error` as it can cross the pipe and keep its meaning: the engine's refusals
    (RequestError, ConfigError: a client's 400) and EngineDeadError as they are, anything
    else as an EngineDeadError naming it (a 503, as it was)."""
    if isinstance(error, RequestError | ConfigError | EngineDeadError) and error.args:
        return type(error)(str(error))
    return EngineDeadError(f"{type(error).__name__}: {error}")


class _Pipe:
    """One end of the pipe: sends from any thread (one lock), and calls answered by
    ("reply", n, ok, value) messages that the end's reader passes to `answer`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, Future[Any]] = {}
        self.closed = False

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)

    def call(self, kind: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Send (kind, n, *args) and wait for its reply; raises what the other end raised,
        or EngineDeadError when the pipe closes or no reply comes in `timeout`."""
        n = next(self._ids)
        future: Future[Any] = Future()
        self._waiting[n] = future
        try:
            if self.closed:
                raise EngineDeadError("the engine process is gone")
            try:
                self.send((kind, n, *args))
            except OSError as e:
                raise EngineDeadError(f"the engine process is gone: {e}") from None
            try:
                return future.result(timeout)
            except TimeoutError:
                raise EngineDeadError(f"no answer to {kind!r} in {timeout} s") from None
        finally:
            self._waiting.pop(n, None)

    def answer(self, n: int, ok: bool, value: Any) -> None:
        future = self._waiting.pop(n, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def reply(self, n: int, work: Callable[[], Any]) -> None:
        """Run `work` and send its result (or its portable exception) as reply n."""
        try:
            message: tuple[Any, ...] = ("reply", n, True, work())
        except BaseException as e:  # noqa: BLE001 - it belongs to the caller
            message = ("reply", n, False, portable(e))
        try:
            self.send(message)
        except OSError:
            pass  # the other end is gone: nobody waits

    def close(self) -> None:
        """The pipe is gone: every call waiting fails."""
        self.closed = True
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_exception(EngineDeadError("the engine process is gone"))


# ---- the child ----


class _Outbox:
    """The child's DeltaPost destination: what `DeltaPost.send` hands a "loop" once a step
    goes down the pipe as one message (each item: (request id, delta or exception))."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def is_closed(self) -> bool:
        return self.pipe.closed

    def call_soon_threadsafe(self, _put: Any, items: list[tuple[str, Any]]) -> None:
        message = [(rid, portable(item) if isinstance(item, BaseException) else item)
                   for rid, item in items]
        try:
            self.pipe.send(("deltas", message))
        except OSError:
            self.pipe.closed = True  # the caller is gone; the reader shuts down


class _PipeSink:
    """A child's request: its deltas go out with the step's others."""

    def __init__(self, request_id: str, outbox: _Outbox, post: DeltaPost) -> None:
        self.request_id, self.outbox, self.post = request_id, outbox, post

    def push(self, delta: TokenDelta | BaseException) -> bool:
        if self.outbox.is_closed():
            return False
        self.post.add(self.outbox, self.request_id, delta)  # type: ignore[arg-type]
        return True

    def fail(self, error: BaseException) -> None:
        self.push(error)
        self.post.send()


class _RelayedRank:
    """A RankHandle in the child for a rank the caller launched (its Ray actor). Asked
    from the pipe's reader thread (a request's admission checks the engine's health),
    it answers what it last heard: that thread cannot wait for a reply it alone reads;
    the engine's rank watcher asks every 0.25 s, from its own thread."""

    def __init__(self, pipe: _Pipe, rank: int, reader: threading.Thread) -> None:
        self.pipe, self.rank, self.reader = pipe, rank, reader
        self.alive = True

    def is_alive(self) -> bool:
        if threading.current_thread() is self.reader:
            return self.alive and not self.pipe.closed
        try:
            self.alive = bool(self.pipe.call("rank", self.rank, "is_alive", None))
        except Exception:  # noqa: BLE001 - the caller is gone: so is the rank's owner
            self.alive = False
        return self.alive

    def join(self, timeout: float | None = None) -> None:
        wait = CALL_TIMEOUT_S if timeout is None else timeout + CALL_TIMEOUT_S
        try:
            self.pipe.call("rank", self.rank, "join", timeout, timeout=wait)
        except Exception:  # noqa: BLE001 - (as is_alive)
            pass

    def kill(self) -> None:
        try:
            self.pipe.call("rank", self.rank, "kill", None)
        except Exception:  # noqa: BLE001 - (as is_alive)
            pass


def _child_main(config: EngineConfig, conn: Connection, relay: bool,
                environ: dict[str, str]) -> None:
    """The engine process: its Engine, a reader thread for the caller's messages, and
    out at once when it is over (as a rank: the interpreter's own exit would finalize
    NCCL and CUDA state again)."""
    os.environ.clear()
    os.environ.update(environ)  # (the fork server's environment is older)
    thread_lock_for_tqdm()
    from replicas.engine import Engine
    from replicas.ranks import spawn_rank

    pipe = _Pipe(conn)
    done = threading.Event()
    engine: list[Engine] = []
    calls = ThreadPoolExecutor(4, thread_name_prefix="tpserve-engine-call")

    def launch(config: EngineConfig, model_dir: str, rank: int, init_method: str
               ) -> RankHandle:
        pipe.call("launch", config, model_dir, rank, init_method, timeout=START_TIMEOUT_S)
        return _RelayedRank(pipe, rank, reader)

    def shutdown(n: int) -> None:
        # (its own thread: stopping the ranks asks the caller, whose replies the reader
        # reads)
        pipe.reply(n, lambda: engine[0].shutdown() if engine else None)
        done.set()

    def read() -> None:
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "reply":
                    pipe.answer(*message[1:])
                elif kind == "add":
                    _, rid, ids, params = message
                    e = engine[0]
                    sink = _PipeSink(rid, outbox, e.post)
                    try:
                        e.submit(ids, params, rid, sink)
                    except Exception as error:  # noqa: BLE001 - the request's, not ours
                        sink.fail(error)
                elif kind == "abort":
                    engine[0].abort(message[1])
                elif kind == "call":
                    _, n, method, args = message
                    if method not in CALLS:
                        raise ValueError(f"not an engine call: {method!r}")
                    work = lambda m=method, a=args: getattr(engine[0], m)(*a)  # noqa: E731
                    if method == "healthy":  # at once: never behind grammar compiles in
                        pipe.reply(n, work)  # the pool (Serve asks every 0.5 s)
                    else:
                        calls.submit(pipe.reply, n, work)
                elif kind == "shutdown":
                    threading.Thread(target=shutdown, args=(message[1],),
                                     name="tpserve-engine-shutdown", daemon=True).start()
        except (EOFError, OSError):  # the caller is gone
            pass
        except Exception:  # noqa: BLE001 - a message it cannot take: this engine is over
            log.exception("the engine process's pipe failed")
        pipe.close()
        if engine:
            engine[0].shutdown()
        done.set()

    outbox = _Outbox(pipe)
    reader = threading.Thread(target=read, name="tpserve-engine-pipe", daemon=True)
    reader.start()
    code = 0
    try:
        engine.append(Engine(config, launch=launch if relay else spawn_rank))
        e = engine[0]
        pipe.send(("ready", {"max_model_len": e.max_model_len, "pid": os.getpid(),
                             "spec": e.spec}))
        done.wait()
    except BaseException as error:  # noqa: BLE001 - the caller raises it
        log.exception("the engine process failed")
        code = 1
        try:
            pipe.send(("failed", portable(error)))
        except OSError:
            pass
    finally:
        logging.shutdown()
        os._exit(code)


# ---- the caller ----


class EngineProcess:
    """An Engine run in a child process (see the module). Always call `shutdown()`."""

    def __init__(self, config: EngineConfig, launch: RankLauncher | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, started_at: float | None = None
                 ) -> None:
        # where the start went (`start_s`), seconds from `started_at` (a time.monotonic()
        # reading; default: here): a caller that passes its own start gets phases on its
        # clock, each rounded once (the replica's stats: replica_start_s)
        begun = time.monotonic() if started_at is None else started_at
        self.start_s: dict[str, float] = {}
        from replicas.tokenizer import Tokenizer

        self.config = config
        model_dir = self.model_dir = config.resolved_model_dir()
        # fail early, here: the architecture and tp from config.json, read without
        # transformers' model configs (they import torch, ~5 s of CPU before the child
        # could start); the child's engine reads the whole config and sends its spec
        check_model_dir(model_dir, config.tp)
        self.start_s["model_config"] = round(time.monotonic() - begun, 3)
        self.join_deltas = join_deltas()
        self._launch = launch
        self._ranks: dict[int, RankHandle] = {}
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._post = DeltaPost()
        self._dead: BaseException | None = None
        self._closed = False
        self._ready: Future[dict[str, Any]] = Future()
        self._ids = itertools.count()
        self._reader: threading.Thread | None = None
        self._relay = ThreadPoolExecutor(4, thread_name_prefix="tpserve-rank-relay")
        self.first_token = Recent()  # add_request to its first delta, as here
        conn, child = mp.Pipe()
        self._pipe = _Pipe(conn)
        start_fork_server()
        self._proc = engine_context().Process(
            target=_child_main, args=(config, child, launch is not None, dict(os.environ)),
            name="tpserve-engine", daemon=False)  # (its own ranks may be processes)
        # (start returns once the fork server, maybe still importing, has forked the
        # child: the tokenizer loads meanwhile)

        def start() -> None:
            self._proc.start()
            self.start_s["forked"] = round(time.monotonic() - begun, 3)

        starting = threading.Thread(target=start, name="tpserve-engine-start", daemon=True)
        starting.start()
        # before multiprocessing's exit joins its children: the child leaves when told
        self._finalizer = multiprocessing.util.Finalize(self, self.shutdown, exitpriority=10)
        try:
            self.tokenizer = Tokenizer(model_dir)  # while the child starts
            self.tokenizer.warm()
            self.start_s["tokenizer"] = round(time.monotonic() - begun, 3)
            starting.join()
            child.close()
            if self._proc.pid is None:
                raise EngineDeadError("the engine process could not be started")
            self._reader = threading.Thread(target=self._read, name="tpserve-engine-pipe",
                                            daemon=True)
            self._reader.start()
            info = self._ready.result(start_timeout_s)
            self.start_s["ready"] = round(time.monotonic() - begun, 3)
        except TimeoutError:
            self.shutdown()
            raise EngineDeadError(f"the engine process did not start in {start_timeout_s} s"
                                  ) from None
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = info["max_model_len"]
        self.pid = info["pid"]
        self.spec: ModelSpec = info["spec"]

    # ---- the API a replica uses ----

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                          request_id: str | None = None) -> AsyncIterator[TokenDelta]:
        """As Engine.add_request: the deltas, the last with its finish_reason; RequestError
        before anything if the child refuses the request; leaving early aborts it."""
        start = time.perf_counter()
        if not self._serving():
            raise EngineDeadError(f"engine is not serving: {self._dead or 'shut down'}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if rid in self._streams:
            raise RequestError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        try:
            self._send(("add", rid, ids, params or SamplingParams()))
            async with aclosing(streamed(
                    queue, self.join_deltas, self.config.stream_interval,
                    lambda: self.first_token.add(time.perf_counter() - start),
                    lambda: self.abort(rid))) as deltas:
                async for item in deltas:
                    yield item
        finally:
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        try:
            self._send(("abort", request_id))
        except Exception:  # noqa: BLE001 - a gone child has nothing left to abort
            pass

    def check_structured(self, spec: StructuredSpec) -> None:
        """Compile `spec`'s grammar in the child (RequestError if it is refused); blocks."""
        self._pipe.call("call", "check_structured", (spec,))

    def stats(self) -> dict[str, Any]:
        """The child's Engine.stats(), with the first token's time as seen here."""
        stats = self._pipe.call("call", "stats", ())
        return {**stats, "ttft_ms": self.first_token.summary(), "engine_process": self.pid}

    def healthy(self) -> bool:
        if not self._serving() or not self._proc.is_alive():
            return False
        try:
            return bool(self._pipe.call("call", "healthy", (), timeout=HEALTH_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - no answer: not healthy
            return False

    def shutdown(self) -> None:
        """Stop the child's engine (its ranks, its GPU memory) and the child; idempotent,
        bounded in time: a child that does not leave is killed."""
        if self._closed:
            return
        self._closed = True
        reading = self._reader is not None
        if reading and self._proc.is_alive() and not self._pipe.closed:
            try:
                self._pipe.call("shutdown", timeout=SHUTDOWN_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - it is killed below
                log.warning("the engine process did not shut down when told; killing it")
        if self._proc.pid is not None:  # (started)
            self._proc.join(timeout=10 if reading else 0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=10)
        self._pipe.conn.close()
        self._fail_streams(EngineDeadError("engine shut down"))
        for handle in self._ranks.values():  # (the child's shutdown stopped them)
            handle.kill()
        self._finalizer.cancel()  # (it holds this object)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- the pipe ----

    def _serving(self) -> bool:
        return self._dead is None and not self._closed

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._pipe.send(message)
        except OSError as e:
            raise EngineDeadError(f"the engine process is gone: {e}") from None

    def _read(self) -> None:
        """The reader thread: deltas to their streams' loops (once a message, per loop),
        replies to their calls, the child's rank calls to the launcher's handles."""
        conn, streams, post = self._pipe.conn, self._streams, self._post
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "deltas":
                    for rid, item in message[1]:
                        target = streams.get(rid)
                        if target is None:
                            continue
                        post.add(target[0], target[1], item)
                        if isinstance(item, BaseException) or item.finish_reason is not None:
                            streams.pop(rid, None)
                    post.send()
                elif kind == "reply":
                    self._pipe.answer(*message[1:])
                elif kind in ("launch", "rank"):
                    self._relay.submit(self._pipe.reply, message[1],
                                       lambda m=message: self._rank_call(m))
                elif kind == "ready":
                    self._ready.set_result(message[1])
                elif kind == "failed":
                    self._dead = message[1]
                    self._ready.set_exception(message[1])
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message it cannot take: the child is lost
            log.exception("reading the engine process's pipe failed; stopping it")
            self._proc.kill()
        self._relay.shutdown(wait=False)
        code = self._proc.exitcode if not self._proc.is_alive() else None
        error = EngineDeadError(f"the engine process exited (code {code})")
        if self._dead is None:
            self._dead = error
        self._pipe.close()
        if not self._ready.done():
            self._ready.set_exception(error)
        self._fail_streams(error if not self._closed else EngineDeadError("engine shut down"))

    def _rank_call(self, message: tuple[Any, ...]) -> Any:
        """The child's ("launch", n, config, model_dir, rank, init_method) or ("rank", n,
        rank, op, arg), on the launcher's handles here."""
        if message[0] == "launch":
            _, _, config, model_dir, rank, init_method = message
            assert self._launch is not None
            self._ranks[rank] = self._launch(config, model_dir, rank, init_method)
            return None
        _, _, rank, op, arg = message
        handle = self._ranks[rank]
        if op == "is_alive":
            return handle.is_alive()
        if op == "join":
            return handle.join(arg)
        return handle.kill()

    def _fail_streams(self, error: BaseException) -> None:
        streams = list(self._streams.items())
        for rid, (loop, queue) in streams:
            self._streams.pop(rid, None)
            self._post.add(loop, queue, error)
        self._post.send()
