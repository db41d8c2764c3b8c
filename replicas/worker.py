"""One rank of a TP group: its model shard, its KV pool, and the step it runs.

Rank 0 drives: it decides each step and sends it as a `StepBatch` to the other ranks,
which loop in `Worker.serve_forever` running whatever they receive. The message travels
as one int64 tensor over a gloo group (also on GPU, so that a step's plan never waits on
the GPU queue), with `encode` / `decode` as its only format.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from replicas import kernels
from replicas.config import DTYPES as config_dtypes
from replicas.config import (
    ConfigError,
    EngineConfig,
    ModelSpec,
    TooFewGPUs,
    hf_config_from_json,
    rope_parameters,
)
from replicas.fp8 import (
    FP8,
    check_scales,
    checkpoint_fp8,
    prepare_model,
    quantize_head,
    quantize_model,
)
from replicas.graphs import DecodeGraphs
from replicas.kernels import fp8mm
from replicas.kv_cache import allocate_kv_cache, block_bytes, kv_heads_per_rank
from replicas.loader import load_weights, random_init
from replicas.model import CausalLM, ForwardBatch, attention_mask, feed_tokens
from replicas.parallel import Comm, tune_gemv
from replicas.pieces import StepPieces
from replicas.shm import ShmAllReduce, ShmChannel
from replicas.step_inputs import pad_tables, split_step, step_size, write_step
from replicas.symm import ONE_SHOT_MAX_BYTES, OneShotAllReduce

log = logging.getLogger(__name__)
DTYPES = {name: getattr(torch, name) for name in config_dtypes}  # (replicas/config.py's)

# the commands of a step message: run a step; stop; nothing (rank 0's heartbeat while
# idle, so that a rank's wait never reaches the group's timeout); replay the batch-1
# decode graph `logits_indices[0]` times on every rank (bench.graph_step_ms at tp > 1)
# STEP_FP32: a step run again with float32 communication (its 16-bit payload overflowed);
# CLEAR: zero the KV slots a step wrote (its results are thrown away)
STEP, SHUTDOWN, PING, REPLAY, STEP_FP32, CLEAR = 0, 1, 2, 3, 4, 5
CPU_KV_CACHE_BYTES = 256 * 2**20  # default KV budget per rank on CPU
# the longest wait for the TP peers at start (joining, loading), whatever dist_timeout_s
START_TIMEOUT_S = 600.0
# the store key under which rank 0 shares the model's config (Worker._hf_config)
HF_CONFIG_KEY = "hf_config"
# the longest wait for NCCL's abort at shutdown (it returns in well under a second)
ABORT_TIMEOUT_S = 3.0
# a step whose longest chunk is this long, all prompts from position 0, attends with
# PyTorch's flash attention (2.4x the paged kernel at 8192 tokens on an H200)
FLASH_MIN_TOKENS = 512


@dataclass(frozen=True)
class StepBatch:
    """What every rank needs to run one step (rank 0 keeps the rest: sampling, text)."""

    input_ids: tuple[int, ...]  # [T] tokens of all scheduled sequences, concatenated
    positions: tuple[int, ...]  # [T]
    query_lens: tuple[int, ...]  # [B] tokens of each sequence in this step
    block_tables: tuple[tuple[int, ...], ...]  # [B] blocks of each sequence
    logits_indices: tuple[int, ...]  # [N] tokens whose next-token logits are wanted
    command: int = STEP

    def encode(self) -> torch.Tensor:
        """Flat int64: [command, T, B, max_blocks, N, ids, positions, query_lens,
        block tables padded with -1 to max_blocks, logits_indices]. Built with numpy:
        from Python ints `torch.tensor` took 6.6 ms for a 256-sequence decode step on
        the 2-core VM, each step, on rank 0's critical path at tp > 1."""
        width = max((len(t) for t in self.block_tables), default=0)
        head = (self.command, len(self.input_ids), len(self.query_lens), width,
                len(self.logits_indices))
        parts = [np.array(p, dtype=np.int64) for p in (
            head, self.input_ids, self.positions, self.query_lens)]
        parts += [pad_tables(self.block_tables, width, -1).ravel(),
                  np.array(self.logits_indices, dtype=np.int64)]
        return torch.from_numpy(np.concatenate(parts))

    @staticmethod
    def decode(flat: torch.Tensor) -> StepBatch:
        v = flat.numpy()
        command, t, b, width, n = v[:5].tolist()
        at = 5
        ids, at = tuple(v[at : at + t].tolist()), at + t
        positions, at = tuple(v[at : at + t].tolist()), at + t
        query_lens, at = tuple(v[at : at + b].tolist()), at + b
        rows = v[at : at + b * width].reshape(b, width)
        at += b * width
        lens = (rows >= 0).sum(axis=1).tolist()  # tables are padded at their ends
        tables = tuple(tuple(row[:k]) for row, k in zip(rows.tolist(), lens, strict=True))
        return StepBatch(ids, positions, query_lens, tables, tuple(v[at : at + n].tolist()),
                         command)


SHUTDOWN_BATCH = StepBatch((), (), (), (), (), SHUTDOWN)
PING_BATCH = StepBatch((), (), (), (), (), PING)


def replay_batch(times: int) -> StepBatch:
    """The message that has every rank replay its batch-1 decode graph `times` times."""
    return StepBatch((), (), (), (), (times,), REPLAY)


def resolve_dtype(config: EngineConfig, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU; on GPU the checkpoint's 16-bit dtype, else bfloat16."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(spec.torch_dtype, torch.bfloat16) if spec.torch_dtype != "float32" else (
        torch.bfloat16)


def filler_step(block: int, block_size: int, *rows: tuple[int, int]) -> StepBatch:
    """A step of token 0s whose every sequence lives in `block` (its table that block
    repeated): one row per (tokens, first position), each wanting its last token's
    logits. For the steps run at start (measuring the activation peak, the warm-up)."""
    spans = [range(start, start + n) for n, start in rows]
    lens = tuple(len(span) for span in spans)
    return StepBatch(tuple([0] * sum(lens)), tuple(itertools.chain(*spans)), lens,
                     tuple((block,) * -(-span.stop // block_size) for span in spans),
                     tuple(end - 1 for end in itertools.accumulate(lens)))


class Worker:
    """The model shard and KV pool of one rank, and the step loop."""

    def __init__(self, config: EngineConfig, model_dir: str, rank: int, init_method: str | None,
                 peers_alive: Callable[[], bool] | None = None,
                 store: dist.TCPStore | None = None) -> None:
        """`store`: rank 0's store already listening at `init_method` (`open_store`)."""
        self.config, self.rank, self.world_size = config, rank, config.tp
        # seconds each start-up phase took on this rank (`peer_startup` has the others');
        # "process" is the time from this process's start to here (imports, mostly)
        self.startup_s: dict[str, float] = {"process": process_age_s()}
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            self.startup_s[name] = round(now - mark, 3)
            mark = now

        self.device = self._pick_device(config)
        workspace = fp8mm.settle_cublaslt_workspace(config.quantization, self.device)
        if workspace is not None and rank == 0:
            log.info("W8A8: cuBLASLt workspace %s KiB (CUBLASLT_WORKSPACE_SIZE)", workspace)
        self.control: dist.ProcessGroup | None = None
        self.channel: ShmChannel | None = None  # step messages through shared memory
        if self.world_size > 1:
            assert init_method is not None, "tp > 1 needs an init_method tcp://host:port"
            if store is None:
                host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
                store = open_store(host, int(port), rank, config)
            self._store, self._peers_alive = store, peers_alive or (lambda: True)
        hf_config = self._hf_config(model_dir, store)
        self.spec = ModelSpec.from_hf(hf_config)
        self.spec.check_tp(self.world_size)
        self.dtype = resolve_dtype(config, self.spec, self.device)
        # the KV cache's entries: the model's dtype, FP8 (e4m3, scale 1: the attention
        # kernels widen them as they read, and saturate them at +-448 as they write), or
        # int8 with a scale per (token, KV head) (replicas/kv_cache.py)
        self.kv_dtype = {"fp8": FP8, "int8": torch.int8}.get(config.kv_cache_dtype, self.dtype)
        self.comm = Comm(rank, self.world_size, DTYPES[config.wire_dtype(self.dtype)],
                         overlap_chunk=config.overlap_chunk_tokens).to(self.device)
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        # each rank builds and loads its shard before the group forms (no collective is
        # needed for it), so rank 0 loads while the other rank processes still start up
        with torch.device(self.device):
            model = CausalLM(hf_config, self.spec, self.comm, max(self.max_model_len, 1))
        for p in model.parameters():  # rotary tables stay float32, like transformers'
            p.data = p.data.to(self.dtype)
        # fp8.fp8_linear's w8a8: 0 weight-only, 1 a scale per token, n a scale per run
        w8a8 = (config.w8a8_group or 1) if config.quantization == "fp8-w8a8" else 0
        stored_fp8 = config.load_format != "random" and checkpoint_fp8(hf_config)
        if stored_fp8:  # loaded as it is (replicas/fp8.py)
            if config.keep_16bit:
                raise ConfigError(f"keep_16bit={config.keep_16bit!r}: this checkpoint's "
                                  "weights are stored in FP8; only a 16-bit checkpoint can "
                                  "keep projections 16-bit")
            if config.quantization == "none" and rank == 0:
                log.info("the checkpoint's weights are FP8: they run as quantization='fp8'")
            prepare_model(model, w8a8, config.weight_only_projections())
        if config.load_format == "random":
            random_init(model, config.seed + rank)
        else:
            load_weights(model, model_dir, show_progress=rank == 0)
        if stored_fp8:
            check_scales(model)
        elif config.quantization != "none":
            quantize_model(model, w8a8, config.weight_only_projections(),
                           config.kept_16bit_projections())
        if candidates := config.lm_head_candidates(fp8_weights=stored_fp8):
            quantize_head(model.lm_head, candidates)
        self.model = model.eval()
        # this rank's weight bytes: with startup_s["load"], the load's throughput
        # (an FP8 LM head's 16-bit rows too, unless they are the embedding's)
        held = [*model.parameters()]
        if model.lm_head.weight16 is not None and not self.spec.tie_word_embeddings:
            held.append(model.lm_head.weight16)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in held)
        phase("load")
        if store is not None:
            self._join_group(store)
            phase("join")
            if self.device.type == "cuda" and config.one_shot_all_reduce:
                self.comm.one_shot = OneShotAllReduce.create(
                    self.comm.group, self.world_size, self.device, ONE_SHOT_MAX_BYTES, store,
                    rank, sites=2 * self.spec.num_layers, row_bytes=self.spec.hidden_size * 4)
                self.comm.fold_reduce = config.fold_all_reduce
            if self.device.type == "cpu" and config.shm_all_reduce:
                # the largest all-reduce: a whole step's hidden states, in float32 at most
                self.comm.shm = ShmAllReduce.connect(
                    store, rank, self.world_size,
                    config.max_num_batched_tokens * self.spec.hidden_size * 4, self.control,
                    config.dist_timeout_s)
        self.gemv_report: dict[str, dict[str, Any]] = {}
        self.activation_peak = 0  # bytes a largest step allocates (GPU, measured)
        self.free_at_sizing = 0  # free GPU bytes when the pool was sized (after the above)
        if (config.gemv_kernels and self.device.type == "cuda" and kernels.enabled(self.device)
                and self.dtype != torch.float32):
            self.gemv_report = tune_gemv(self.model)
            torch.cuda.empty_cache()  # the timing copies' memory goes to the KV pool
            if store is not None:
                self._agree_gemv(store)
        phase("gemv_tuning")
        # PyTorch's fused attention on a GPU takes 16-bit grouped heads only (no float32)
        self._flash = self.device.type == "cpu" or self.dtype != torch.float32
        self.num_blocks = self._agree_min(self._count_blocks())
        # one block more than the scheduler hands out: the scratch block of padded rows
        self.kv = allocate_kv_cache(self.spec, self.world_size, self.num_blocks + 1,
                                    config.block_size, self.kv_dtype, self.device)
        phase("kv_pool")
        self.overflow_retries = 0
        self._drained = False  # set by `close` once this GPU's queue is known empty
        self.graphs: DecodeGraphs | None = None
        self.pieces: StepPieces | None = None  # steps that are not plain decode, in pieces
        self.greedy: torch.Tensor | None = None  # the last step's argmax, if its graph made it
        if self.device.type == "cuda" and config.cuda_graphs:
            self.graphs = DecodeGraphs(
                lambda fb: self.model(fb, self.kv), set(self.spec.sliding_windows),
                config.max_num_seqs, -(-self.max_model_len // config.block_size),
                config.block_size, self.num_blocks, self._kv_heads(), self.device)
            phase("cuda_graphs")
        if piece_tokens := config.resolved_piece_graph_tokens():
            with torch.inference_mode():  # (as steps run: its buffers are written in them)
                self.pieces = StepPieces(
                    self.model, self.kv, min(piece_tokens, config.max_num_batched_tokens),
                    self.num_blocks * config.block_size, self.device,
                    capture=self.device.type == "cuda" and config.cuda_graphs)
            phase("piece_graphs")
        if (kernels.enabled(self.device) and self.max_model_len >= 8
                and config.max_num_batched_tokens >= 8 and warms_up(self.device)):
            self._warm_up()
            phase("warm_up")
        if self.world_size > 1:
            self._store.set(f"startup/{rank}", json.dumps(self.startup_s))

    def peer_startup(self) -> dict[int, dict[str, float]]:
        """Rank 0: the start-up phases of the other ranks. Each reports them at the end
        of its start, which may come a moment after rank 0's: wait up to 10 s for them,
        then give those reported."""
        if self.world_size == 1:
            return {}
        keys = [f"startup/{r}" for r in range(1, self.world_size)]
        try:
            self._store.wait(keys, timedelta(seconds=10))
        except RuntimeError:  # (DistStoreError) a rank has not reported: the others
            pass
        return {r: json.loads(self._store.get(k)) for r, k in enumerate(keys, start=1)
                if self._store.check([k])}

    def _pick_device(self, config: EngineConfig) -> torch.device:
        if config.resolved_device() == "cuda":
            if config.tp > torch.cuda.device_count():
                raise TooFewGPUs(config.tp, torch.cuda.device_count())
            local = int(os.environ.get("LOCAL_RANK", self.rank)) % torch.cuda.device_count()
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        # share the cores between the ranks instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tp))
        return torch.device("cpu")

    def _hf_config(self, model_dir: str, store: dist.Store | None) -> Any:
        """The model's transformers config. Rank 0 reads it with transformers and puts
        all of its values (defaults applied) in the store; the other ranks read those, so
        their processes never import transformers (~2.5 s of CPU each: the Ray rank
        actors import no tokenizer either). A rope type other than the default needs
        transformers' own frequency function and its config class: those ranks read the
        config as rank 0 did."""
        if store is None or self.rank == 0:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_dir)
            if store is not None:
                store.set(HF_CONFIG_KEY, hf_config.to_json_string(use_diff=False))
            return hf_config
        view = hf_config_from_json(store.get(HF_CONFIG_KEY).decode())
        if rope_parameters(view)["rope_type"] == "default":
            return view
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir)

    def _join_group(self, store: dist.Store) -> None:
        """Form the process group once every rank has its shard loaded; rank 0 gives up
        as soon as a peer process dies instead of waiting out the timeout."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.config.dist_timeout_s)
        self._store_barrier("joined")
        # NCCL's communicator made now (device_id), not at the first collective
        dist.init_process_group(backend, store=store, rank=self.rank,
                                world_size=self.world_size, timeout=timeout,
                                device_id=self.device if backend == "nccl" else None)
        self.control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" \
            else dist.group.WORLD
        if self.config.shm_step_messages:
            self.channel = ShmChannel.connect(store, self.rank, self.world_size,
                                              8 * self._longest_message(), self.control)

    def _agree_gemv(self, store: dist.Store) -> None:
        """Every rank takes rank 0's GEMV picks: each rank timed its own, and two ranks
        may pick differently where configs time alike. Then every rank runs the same
        kernels, and a folded all-reduce (which needs the GEMVs on both sides of it on
        every rank) is folded on all ranks or on none."""
        layers = [m for m in self.model.modules() if hasattr(m, "gemv_kind")]
        if self.rank == 0:
            store.set("gemv_picks", json.dumps([m.gemv for m in layers]))
            return
        picks = json.loads(store.get("gemv_picks"))
        assert len(picks) == len(layers), "ranks built different models"
        for m, pick in zip(layers, picks, strict=True):
            m.gemv = tuple(pick) if pick is not None else None

    def _longest_message(self) -> int:
        """Words of the longest step message (StepBatch.encode): every token's id and
        position and a logits row, every sequence's query length and full block table."""
        cfg = self.config
        tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        width = -(-self.max_model_len // cfg.block_size)
        return 5 + 3 * tokens + cfg.max_num_seqs * (1 + width)

    def _store_barrier(self, name: str) -> None:
        """Wait until every rank has reached `name`, on the TCP store rather than in a
        collective: ranks may reach it seconds apart (a rank process imports torch and
        loads its shard on a busy host), longer than a short dist_timeout_s. Rank 0
        gives up as soon as a peer process dies."""
        self._store.set(f"{name}/{self.rank}", "1")
        keys = [f"{name}/{r}" for r in range(self.world_size)]
        deadline = time.monotonic() + max(self.config.dist_timeout_s, START_TIMEOUT_S)
        while not self._store.check(keys):
            if not self._peers_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"rank {self.rank}: TP peers did not reach {name!r}")
            time.sleep(0.05)

    def _count_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = block_bytes(self.spec, self.world_size, cfg.block_size, self.kv_dtype)
        budget = cfg.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            self.activation_peak = self._activation_peak()
            self.free_at_sizing, _ = torch.cuda.mem_get_info(self.device)
            budget = int(self.free_at_sizing * cfg.gpu_memory_utilization) - self.activation_peak
        elif budget is None:
            # enough for every batch slot at full length (and the scratch block), within
            # the CPU default
            wanted = (cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size) + 1
                      ) * per_block
            budget = min(CPU_KV_CACHE_BYTES, wanted)
        return max(1, budget // per_block - 1)  # one block of the budget is the scratch

    def _activation_peak(self) -> int:
        """Bytes the largest steps allocate beyond what is held before them, measured by
        running them on a one-block cache: a max_num_batched_tokens prompt (one logits
        row) and a max_num_seqs decode step (a logits row each). Every rank runs the
        same steps, so their collectives pair up."""
        cfg, bs = self.config, self.config.block_size
        kv = allocate_kv_cache(self.spec, self.world_size, 1, bs, self.kv_dtype, self.device)
        n, b = min(cfg.max_num_batched_tokens, self.max_model_len), cfg.max_num_seqs
        prompt, decode = filler_step(0, bs, (n, 0)), filler_step(0, bs, *[(1, 0)] * b)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            for batch in (prompt, decode):
                self.model(self.forward_batch(batch), kv)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del kv
        torch.cuda.empty_cache()
        return peak

    def _warm_up(self) -> None:
        """Run the kinds of step that serving meets first, on the scratch block, so that
        the Triton kernels they launch (each compiled at its first launch: ~0.2-1.5 s on
        an H200 host) are compiled before the first request, not in its time to first
        token: a prompt; a chunk over cached keys beside a decode row (a prefix-cache
        hit's shape, and a second request's first step); a decode step. Each takes the
        path a served step of its shape takes (pieces, eager, the decode graphs). Every
        rank runs them in the same order, so their collectives pair up."""
        scratch, bs, longest = self.num_blocks, self.config.block_size, self.max_model_len
        budget = self.config.max_num_batched_tokens  # (a step's tokens, as the scheduler's)
        prompt = min(24, longest // 2, budget)
        chunk = min(16, longest - prompt, budget - 1)

        def step(*rows: tuple[int, int]) -> StepBatch:
            return filler_step(scratch, bs, *rows)

        decode = [(1, i) for i in range(min(3, self.config.max_num_seqs))]
        # the decode step's ids as placeholders for tokens sampled on the device, as a
        # step launched before the host has read the last one's has them (feed_tokens)
        fed = dataclasses.replace(step(*decode), input_ids=tuple(
            -(j + 1) for j in range(len(decode))))
        feed = torch.zeros(len(decode), dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            for batch in (step((prompt, 0)), step((chunk, prompt), *decode[:1]), fed):
                self.execute(batch, feed if batch is fed else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.pieces is not None:
            self.pieces.steps = 0  # (steps served in pieces: the warm-up's are not)

    def _agree_min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # ---- the step ----

    def send(self, batch: StepBatch) -> None:
        """Rank 0: hand the step to the other ranks (through shared memory where the
        ranks share a host, else two gloo broadcasts)."""
        if self.world_size == 1:
            return
        flat = batch.encode()
        if self.channel is not None:
            if not self.channel.fits(flat):
                raise RuntimeError(f"step message of {flat.numel()} words exceeds the "
                                   f"channel's {self.channel.capacity} bytes")
            self.channel.send(flat)
            return
        dist.broadcast(torch.tensor([flat.numel()], dtype=torch.int64), 0, group=self.control)
        dist.broadcast(flat, 0, group=self.control)

    def receive(self) -> StepBatch:
        if self.channel is not None:
            return StepBatch.decode(self.channel.receive())
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.control)
        flat = torch.empty(int(size.item()), dtype=torch.int64)
        dist.broadcast(flat, 0, group=self.control)
        return StepBatch.decode(flat)

    @torch.inference_mode()
    def execute(self, batch: StepBatch, feed: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; next-token logits [N, vocab] float32 (on every rank).

        An input id -(j + 1) is a token the step before sampled on the device, not yet
        read by the host: `feed[j]` (rank 0 at tp=1 only, see Engine._step).
        A STEP_FP32 batch runs eagerly with float32 communication: rank 0 sends one when
        a step's 16-bit all-reduce overflowed (`overflow_flag`, `rerun_float32`).
        A graphed step also leaves the logits' argmax in `self.greedy` (else None).
        """
        profile_dir = os.environ.get("TPSERVE_STEP_PROFILE")  # read now: ranks fork
        if profile_dir and len(batch.input_ids) > 1:
            return self._profiled(profile_dir, batch, feed)
        entered = time.time()
        self.comm.reset_overflow()
        self.greedy = None
        feed = self._share_feed(batch, feed)
        float32 = batch.command == STEP_FP32  # eager: the graphs hold 16-bit reduces
        if self.graphs is not None and not float32 and self._is_decode(batch):
            logits, self.greedy = self.graphs.replay(list(batch.input_ids),
                                                     list(batch.positions),
                                                     list(batch.block_tables), feed)
        elif self.pieces is not None and not float32 and self.pieces.fits(
                len(batch.input_ids)) and max(batch.query_lens) > 1:
            # (one token a sequence: the eager step's fused decode attention)
            logits = self.pieces.run(self.forward_batch(batch, feed))
        else:
            self.comm.force_float32 = float32
            try:
                logits = self.model(self.forward_batch(batch, feed), self.kv)
            finally:
                self.comm.force_float32 = False
        trace = os.environ.get("TPSERVE_STEP_TRACE")  # read now: ranks fork from a server
        if trace:
            self._trace_step(trace, batch, entered)
        return logits

    def _trace_step(self, trace: str, batch: StepBatch, entered: float) -> None:
        """With TPSERVE_STEP_TRACE=DIR: one JSON line a step in DIR/rank<r>.jsonl, the
        wall clock (shared by the ranks of a host) at the step's entry and once its
        kernels are launched, and its size: which rank's host sets a step's pace."""
        row = {"rank": self.rank, "tokens": len(batch.input_ids), "seqs": len(batch.query_lens),
               "entered": round(entered, 6), "launched": round(time.time(), 6)}
        with open(os.path.join(trace, f"rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def overflow_flag(self) -> torch.Tensor | None:
        """The last step's overflow flag (on the device: reading it waits for the step),
        or None where no payload can overflow: only float16 payloads at tp > 1 can."""
        if self.world_size > 1 and self.comm.dtype == torch.float16:
            return self.comm.overflow
        return None

    def rerun_float32(self, batch: StepBatch, feed: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Rank 0: run `batch` again on every rank with float32 communication (its 16-bit
        all-reduce overflowed); the step is idempotent (it rewrites the same KV slots)."""
        self.overflow_retries += 1
        log.warning("16-bit all-reduce overflowed; step re-run with float32 communication")
        again = dataclasses.replace(batch, command=STEP_FP32)
        self.send(again)
        return self.execute(again, feed)

    def clear(self, batch: StepBatch) -> None:
        """Rank 0: on every rank, zero the KV slots that `batch` wrote: its results are
        thrown away (it ran on tokens of an overflowed step), and attention reads masked
        slots too, so they must stay finite."""
        cleared = dataclasses.replace(batch, command=CLEAR)
        self.send(cleared)
        self._clear_slots(cleared)

    def _clear_slots(self, batch: StepBatch) -> None:
        # the step's KV slots, computed as the step computed them (write_step)
        t, b = len(batch.input_ids), len(batch.query_lens)
        width = max((len(table) for table in batch.block_tables), default=0)
        host = split_step(np.empty(step_size(t, b, width), dtype=np.int64), t, b, width)
        write_step(host, batch.input_ids, batch.positions, batch.block_tables,
                   self.config.block_size, pad_block=0, query_lens=batch.query_lens)
        index = torch.from_numpy(host.slots.copy()).to(self.device)
        for layer in self.kv:  # (an int8 cache's scales too)
            for x in layer:
                x.view(-1, *x.shape[2:]).index_fill_(0, index, 0)

    def _profiled(self, profile_dir: str, batch: StepBatch, feed: torch.Tensor | None
                  ) -> torch.Tensor:
        """With TPSERVE_STEP_PROFILE=DIR: a step of more than one token runs under
        PyTorch's profiler (host and device), and its table of host time by op (CUDA
        runtime calls included: launches, copies, waits) goes to DIR/rank<r>.txt."""
        from torch.profiler import ProfilerActivity, profile

        os.environ.pop("TPSERVE_STEP_PROFILE")
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                logits = self.execute(batch, feed)
                launched = time.perf_counter() - start
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                done = time.perf_counter() - start
        finally:
            os.environ["TPSERVE_STEP_PROFILE"] = profile_dir
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        with open(os.path.join(profile_dir, f"rank{self.rank}.txt"), "a") as f:
            f.write(f"== rank {self.rank}: {len(batch.input_ids)} tokens, launched in "
                    f"{launched * 1e3:.1f} ms, done in {done * 1e3:.1f} ms\n{table}\n")
        return logits

    def _share_feed(self, batch: StepBatch, feed: torch.Tensor | None) -> torch.Tensor | None:
        """tp > 1 with asynchronous scheduling: the step's placeholder ids -(j + 1) stand
        for tokens rank 0 sampled on its device and has not read yet; rank 0 broadcasts
        the first n of them (n: the largest j + 1 in the step) to the other ranks on the
        device, in stream order before the step (no host sync on any rank)."""
        if self.world_size == 1:
            return feed
        n = -min(batch.input_ids, default=0)
        if n <= 0:
            return feed
        if self.rank == 0:
            assert feed is not None and feed.numel() >= n, "placeholders without their tokens"
            shared = feed[:n].contiguous()
        else:
            shared = torch.empty(n, dtype=torch.int64, device=self.device)
        dist.broadcast(shared, 0, group=self.comm.group)
        return shared

    def _is_decode(self, batch: StepBatch) -> bool:
        """Every sequence adds one token and wants its logits: the graphed case."""
        assert self.graphs is not None
        n = len(batch.query_lens)
        return (len(batch.input_ids) == n and len(batch.logits_indices) == n
                and self.graphs.fits(n))

    def forward_batch(self, batch: StepBatch, feed: torch.Tensor | None = None) -> ForwardBatch:
        dev, bs = self.device, self.config.block_size

        def put(t: torch.Tensor) -> torch.Tensor:  # no wait for the device's queue
            return t.to(dev, non_blocking=True)

        num_tokens, num_seqs = len(batch.input_ids), len(batch.query_lens)
        width = max(len(t) for t in batch.block_tables)
        # ids, positions, slots and block tables (0-padded), written as the graphs write
        # theirs; each goes to the device as its own tensor
        flat = np.empty(step_size(num_tokens, num_seqs, width), dtype=np.int64)
        host = split_step(flat, num_tokens, num_seqs, width)
        token_seq = torch.from_numpy(write_step(
            host, batch.input_ids, batch.positions, batch.block_tables, bs, pad_block=0,
            query_lens=batch.query_lens))  # [T]
        ids, positions, slots, tables = (torch.from_numpy(a) for a in host)
        lens = torch.tensor(batch.query_lens, dtype=torch.int64)
        starts = torch.cumsum(lens, 0) - lens
        token_off = torch.arange(num_tokens) - starts[token_seq]
        query_pos = torch.zeros(num_seqs, int(lens.max()), dtype=torch.int64)
        query_pos[token_seq, token_off] = positions
        query_pos = put(query_pos)
        max_q = int(lens.max())
        fast = kernels.enabled(dev)  # Triton attention: bounds per sequence, no masks
        windows = set() if fast else set(self.spec.sliding_windows)
        input_ids = put(ids)
        if feed is not None:
            feed_tokens(input_ids, feed)
        return ForwardBatch(
            input_ids=input_ids,
            positions=put(positions), slot_mapping=put(slots), block_tables=put(tables),
            token_seq=put(token_seq), token_off=put(token_off), query_pos=query_pos,
            logits_indices=put(torch.tensor(batch.logits_indices, dtype=torch.int64)),
            every_row=batch.logits_indices == tuple(range(len(batch.input_ids))),
            masks={w: self._cpu_additive(attention_mask(query_pos, width * bs, w))
                   for w in windows},
            cu_q=put(torch.cat((starts, lens.sum().view(1))).to(torch.int32)) if fast else None,
            max_q=max_q,
            splits=kernels.decode_splits(num_seqs, self._kv_heads(), width * bs)
            if max_q == 1 else 1,
            fresh=self._fresh_spans(batch) if fast and self._flash and max_q >= FLASH_MIN_TOKENS
            else None,
        )

    def _cpu_additive(self, mask: torch.Tensor) -> torch.Tensor:
        """On CPU, a bool mask as the 0 / -inf float mask SDPA would make of it in every
        layer (the same values; made once a step instead of once a layer)."""
        if self.device.type != "cpu":
            return mask
        return torch.zeros(mask.shape, dtype=self.dtype).masked_fill_(~mask, float("-inf"))

    @staticmethod
    def _fresh_spans(batch: StepBatch) -> tuple[tuple[int, int], ...] | None:
        """Token spans of the sequences, if every one is a whole prompt from position 0."""
        spans, start = [], 0
        for n in batch.query_lens:
            if batch.positions[start] != 0:
                return None
            spans.append((start, start + n))
            start += n
        return tuple(spans)

    def _kv_heads(self) -> int:
        return kv_heads_per_rank(self.spec, self.world_size)

    def serve_forever(self) -> None:
        """Ranks 1..tp-1: run steps until rank 0 says shut down."""
        while True:
            batch = self.receive()
            if batch.command == SHUTDOWN:
                break
            if batch.command == PING:
                continue
            if batch.command == REPLAY:
                self.replay_graph(batch.logits_indices[0])
                continue
            if batch.command == CLEAR:
                self._clear_slots(batch)
                continue
            self.execute(batch)
        self.close()

    def replay_graph(self, times: int) -> None:
        """Replay the batch-1 decode graph `times` times (every rank at once: at tp > 1
        the graph holds collectives)."""
        assert self.graphs is not None, "replay_graph needs cuda_graphs"
        graph = self.graphs.graphs[1][0]
        for _ in range(times):
            graph.replay()

    def close(self, peer_dead: bool = False) -> None:
        """Leave the TP group without waiting on the peers; idempotent. On GPUs the
        decode graphs are dropped first (at tp=2 on H200s, tearing NCCL down while
        graphs held its kernels hung for good), then the NCCL communicators are aborted
        rather than destroyed (a destroy waits for every rank; an abort also frees a
        rank stuck in a collective with a dead peer). `peer_dead`: a peer died, this
        rank's GPU queue may never drain; nothing here waits for it."""
        if self.world_size == 1 or not dist.is_initialized():
            return
        if self.device.type != "cuda":
            dist.destroy_process_group()
            return
        if not peer_dead:
            torch.cuda.synchronize(self.device)
            self._drained = True
            if self.graphs is not None:
                for graph, _, _ in self.graphs.graphs.values():
                    graph.reset()
                self.graphs = None
            if self.pieces is not None:
                self.pieces.reset()
                self.pieces = None
        abort = threading.Thread(target=dist.distributed_c10d._abort_process_group,
                                 name="tpserve-nccl-abort", daemon=True)
        abort.start()
        abort.join(timeout=ABORT_TIMEOUT_S)
        if abort.is_alive():
            log.warning("rank %d: NCCL abort still running after %.0f s; left behind",
                        self.rank, ABORT_TIMEOUT_S)

    def release(self) -> None:
        """Drop the model, KV pool, graphs and shared buffers, and hand their memory
        back (after `close`). Idempotent."""
        self.graphs = self.pieces = None
        self.greedy = None
        for name in ("model", "kv"):
            if hasattr(self, name):
                delattr(self, name)
        self.comm.one_shot = self.comm.shm = self.channel = None
        gc.unfreeze()  # (see freeze_heap) so that the collection below reaches them
        gc.collect()  # reference cycles through the modules hold tensors too
        if self.device.type == "cuda":
            # cuBLAS keeps a workspace (32 MiB on Hopper) for each stream it ran on, in
            # the caching allocator, for the life of the process: this engine's side
            # streams left ~66 MiB a cycle allocated at tp=2 (seen on 2xH200)
            # (only with this GPU's queue drained: no peers, or `close` synchronized)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None and (self.world_size == 1 or self._drained):
                torch.cuda.synchronize(self.device)
                clear()
            torch.cuda.empty_cache()


def warms_up(device: torch.device) -> bool:
    """Whether start-up runs `Worker._warm_up` (where the Triton kernels run): on GPUs,
    where it compiles them before the first request. Triton's interpreter on a CPU
    compiles nothing, so there it runs only with TPSERVE_WARM_UP=1 (the tests of the
    warm-up itself): each engine of the interpreter's tests spent about as long in it as
    in the steps the test runs."""
    return device.type == "cuda" or os.environ.get("TPSERVE_WARM_UP") == "1"


def open_store(host: str, port: int, rank: int, config: EngineConfig) -> dist.TCPStore:
    """A replica's own TCP store, opened first thing on each rank: rank 0 serves it (on
    `port`; 0: a port the kernel picks, then `store.port`), the others connect to it (and
    may do so as soon as they start: they wait for it)."""
    return dist.TCPStore(host, port, config.tp, is_master=rank == 0,
                         timeout=timedelta(seconds=max(config.dist_timeout_s, START_TIMEOUT_S)),
                         wait_for_workers=False)


def freeze_heap() -> None:
    """Once started: what is alive now (the modules imported, the model, the caches)
    leaves the garbage collector's generations, so that the full collections a serving
    process runs every few hundred steps scan only what it allocated since. Measured on
    the CPU test engine at 256 sequences: ~10 us more per delivered token over a run
    with one full collection (~160 ms in one step, every stream stalled by it) than
    without. `Worker.release` undoes it, and so does the process's exit (else native
    extensions report what is still frozen then as leaked: nanobind prints hundreds of
    lines for Triton's types when a script ends without `Engine.shutdown()`)."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # (once, however many engines this process starts)
    atexit.register(gc.unfreeze)


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return round(max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK")), 3)


def dump_stacks_when_asked() -> None:
    """TPSERVE_STACK_DUMP_S=N: every N seconds, print every thread's stack to stderr
    (finding where a rank waits, on a machine without a debugger)."""
    every = float(os.environ.get("TPSERVE_STACK_DUMP_S", "0"))
    if every > 0:
        import faulthandler

        faulthandler.dump_traceback_later(every, repeat=True)


def rank_main(config: EngineConfig, model_dir: str, rank: int, init_method: str) -> None:
    """Entry point of a rank process (multiprocessing here, a Ray actor in cluster/)."""
    logging.basicConfig(level=logging.WARNING)
    dump_stacks_when_asked()
    worker = Worker(config, model_dir, rank, init_method)
    freeze_heap()
    worker.serve_forever()
    worker.release()
