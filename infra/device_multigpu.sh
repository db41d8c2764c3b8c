#!/usr/bin/env bash
# The multi-GPU run on the device machine (nvidia-h200-x2, or -x4 for issue 21: there the
# probes and the suite add tp=4, and the suite's rows go to multigpu_4xh200.jsonl; TPS
# overrides the suite's sizes, e.g. TPS=2): what the machine has, then
# (each step on when its bound is not 0) the decode probes, the multigpu GPU tests and
# `replicas.bench --suite multigpu`; logs and JSON lines under $OUT (or ./out). NVLink
# multicast stays off (NCCL, PyTorch symmetric memory, NVSHMEM). By default the suite
# alone (it needs most of one 10-minute call); the tests in a call of their own:
#   bash infra/device_multigpu.sh                          # the suite, bounded at 570 s
#   TEST_S=300 BENCH_S=0 TEST_K="folded or overflow" bash infra/device_multigpu.sh
#   PROBE_S=240 BENCH_S=0 bash infra/device_multigpu.sh    # decode at tp=1 and tp=2
#   PROBE_SET='quantization="fp8";kv_cache_dtype="int8"' ...  # the probes with EngineConfig
#                                         # fields set (';' between them): issue 20 at tp=2
#   HOST_S=200 BENCH_S=0 bash infra/device_multigpu.sh     # rank 0's host per step, 256 reqs
#   PIECES_S=150 BENCH_S=0 bash infra/device_multigpu.sh   # the admitting step without and
#                                         # with pieces at each tp (PERF v0.44, v0.48)
# Each step is bounded (timeout -s KILL: a rank stuck in a GPU collective ignores
# SIGTERM); TPSERVE_STACK_DUMP_S=N prints every thread's stack every N seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi topo -m | head -4
python3 -c 'import torch, transformers, triton
print("torch", torch.__version__, "transformers", transformers.__version__,
      "triton", triton.__version__, "gpus", torch.cuda.device_count())
print("one_shot_all_reduce_copy_out:", hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"))'
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 4 ]; then sizes="1 2 4"; else sizes="1 2"; fi
tps=${TPS:-$(echo ${sizes#1 } | tr ' ' ',')}  # the suite's tp sizes: "2" or "2,4"
if [ "$gpus" -ge 4 ]; then suite_out=multigpu_4xh200.jsonl; else suite_out=multigpu_2xh200.jsonl; fi
if [ "${PROBE_S:-0}" != 0 ]; then  # the headline first: decode at tp=1, 2 (and 4)
  sets=()
  IFS=';' read -ra fields <<< "${PROBE_SET:-}"
  for field in "${fields[@]}"; do sets+=(--set "$field"); done
  for tp in $sizes; do
    timeout -s KILL "${PROBE_S}" python3 -m replicas.multigpu --probe glm4-9b --tp "$tp" \
      "${sets[@]}" 2>&1 | grep '^{' | tee -a "$out/probe.jsonl"
  done
fi
if [ "${HOST_S:-0}" != 0 ]; then  # where rank 0's host time goes at 256 requests
  for tp in 1 2; do
    timeout -s KILL "${HOST_S}" python3 -m replicas.multigpu --host --probe glm4-9b --tp "$tp" \
      2>&1 | grep '^{' | tee -a "$out/host.jsonl"
  done
fi
if [ "${PIECES_S:-0}" != 0 ]; then  # a step admitting 9 x 40 tokens, eager and in pieces,
  for tp in $sizes; do               # at each tp (pieces are on by default at tp=1 only)
    for n in 0 512; do
      timeout -s KILL "${PIECES_S}" python3 -m replicas.multigpu --prefill-host --probe glm4-9b \
        --tp "$tp" --set piece_graph_tokens=$n 2>&1 | grep '^{' | tee -a "$out/prefill_host.jsonl"
    done
  done
fi
if [ "${TEST_S:-0}" != 0 ]; then
  timeout -s KILL "${TEST_S}" python3 -m pytest -q -m multigpu tests/test_multigpu.py \
    --timeout 150 -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} 2>&1 | tee "$out/tests.log"
fi
if [ "${BENCH_S:-570}" != 0 ]; then
  timeout -s KILL "${BENCH_S:-570}" python3 -m replicas.bench --suite multigpu --tp "$tps" \
    --out "$out/$suite_out" 2>&1 | tee "$out/bench.log"
fi
