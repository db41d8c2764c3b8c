#!/usr/bin/env bash
# The one-GPU engine runs on the device machine (nvidia-h200), each step bounded and on
# when its bound is not 0; logs and JSON lines under $OUT (or ./out), the JSON lines also
# appended to replicas/results/ (they come back with $OUT; copy them here). NVLink
# multicast stays off. Carry ".stack/engine" (`bash infra/device_stack.sh prepare-engine`
# here): the structured outputs' grammar library and what it imports, which the image
# lacks; this installs it first. Each bound is per step; a call has 600 s in all.
#   STRUCT_S=250 bash infra/device_engine.sh     # issue 18: tests, the structured suite,
#                                                # the grammar replay (llguidance beside)
#   FP8_TEST_S=400 bash infra/device_engine.sh   # issue 20: tests (FP8 and the
#                                                # int8 KV cache; 200 s cut them short on
#                                                # an H100, PERF v0.96); FP8_S=520 alone in
#                                                # a call: the fp8 suite (366 s with four
#                                                # FP8 modes at 070d6db; five since v0.56,
#                                                # six since v1.07: ~80 s more;
#                                                # FP8_MODES=fp8-w8a8-keepqkv_int8kv,...
#                                                # runs those modes only, and their
#                                                # accuracy cases: bench.fp8_modes)
#   W8A16_S=120 ...                              # and the weight-only matmul's configs
#   GEMV_S=150 ...                               # and the batch-1 GEMV's configs alone,
#                                                # bf16 and FP8 (FP8 also with register
#                                                # caps, PERF v0.85, and the MLP in the
#                                                # engine's kinds, v0.88), then
#                                                # test_kernels.py's GEMV tests
#   GEMVAB_S=200 ...                             # and batch-1 FP8 decode with the last
#                                                # winning GEMV trials and without (PERF
#                                                # v0.87, v0.89: bench.gemv_trials_ab)
#   KERNELS_S=200 ...                            # and batch-1 FP8 decode's kernels under
#                                                # the profiler, the engine's picks (PERF
#                                                # v0.90, v0.92: bench.b1_kernels_ab), then each
#                                                # weight's read floor (v0.91)
#   HEAD_S=240 ...                               # and batch-1 FP8 decode with the FP8
#                                                # LM head against the 16-bit (v0.94)
#   HEADROWS_S=240 ...                           # and the FP8 LM head at 2-128 rows,
#                                                # then FP8 decode at batches 4-64 with
#                                                # it read in steps of one row and of up
#                                                # to 64, and its accuracy so (v0.96)
#   SPLIT_S=200 ...                              # and the weight-only matmul with K in
#                                                # slices (PERF v0.98), alone and in the step
#   TWO_S=300 ...                                # and weight-only FP8 with x in two FP8
#                                                # terms (v1.02): probe, tests, in the step
#   TWO_AB_S=330 ...                             # and v1.02's tests and step A/B alone
#                                                # (TWO_AB_LEAST rows, TWO_AB_BATCHES)
#   FUSED_S=330 ...                              # and v1.03 (two terms in one kernel):
#                                                # probe, tests, step A/B
#   FOLD2_S=330 ...                              # and v1.04 (the two terms' products
#                                                # added by the norm, SwiGLU): tests, A/B
#   NORM2_S=300 ...                              # and v1.06 (two terms made by the
#                                                # norm): A/B, v1.04's folds on
#   NEXT2_S=480 ...                              # and v1.04 + v1.06 in one call: tests,
#                                                # three arms (as now, +fold, +norm)
#                                                # (NEXT2_TEST_S, NEXT2_ARGS: shorter)
#   QUANTW_S=450 ...                             # and v1.05 (the row-quantizing kernels'
#                                                # warps): probe, A/B (QUANTW warps;
#                                                # QUANTW_AB=0: the probe alone)
#   BYK_S=200 ...                                # and FP8 decode at 96-152 sequences with
#                                                # the configs past 64 rows by K (v1.01)
#   DEQUANT_S=330 ...                            # and weight-only FP8 at 256 requests with
#                                                # a 256-row step widening or not (v1.00)
#   SLICES_S=200 ...                             # and W8A8's per-token tiles in slices
#                                                # (PERF v0.99), alone, tested, in the step
#   W8A8_S=150 ...                               # and W8A8's few-row matmul: Triton's
#                                                # configs against _scaled_mm at 16-256
#                                                # rows (PERF v0.62) and cuBLAS in runs
#                                                # of K (v0.71), then their GPU tests
#   ACC_S=200 ...                                # and W8A8's accuracy (-keepqkv, with
#                                                # the int8 cache, all W8A8) with
#                                                # gemv_kernels off (cuBLAS at every row
#                                                # count), then on (Triton's picks at a
#                                                # decode step's rows, PERF v0.62)
#                                                # ACC_FAST_ACCUM="0 1": each without
#                                                # and with fast accumulation (v0.82;
#                                                # on alone by default, as since v0.83)
#   ATTN_S=480 ...                               # and decode attention's tiles and splits
#                                                # at batch 1, 16, 32, 64 and 256 (bf16, int8,
#                                                # e4m3; the 8-bit caches' F16 form, PERF
#                                                # v0.70), then the probe's GPU test;
#                                                # ATTN_PDL=0: the probe without PDL, as
#                                                # the engine runs it (PERF v0.74), the
#                                                # other steps of the call unchanged
#   GAPS_S=120 ...                               # and where the GPU idles in the cached
#                                                # 256-request run (bench.decode_gaps,
#                                                # PERF v0.79), a process a mode in
#                                                # GAPS_MODES (default "fp8-w8a8 bf16")
#   NCU_S=120 ...                                # and ncu's counters (occupancy, stalls,
#                                                # throughput) of bench.ncu_subject's
#                                                # kernels, a CSV each (NCU_SUBJECTS; and
#                                                # gemv_ROLE / read_ROLE: batch-1 FP8
#                                                # decode's GEMV of a role and a read of
#                                                # its bytes, side by side)
#   FOLD_S=300 ...                               # and v0.80's A/B in one process
#                                                # (bench.w8a8_fold_ab: W8A8 at 256
#                                                # requests, runs of K added by the norm
#                                                # or not, two rounds), then its GPU tests
#   WIDE_S=300 ...                               # and bench.wide_tile_search (PERF
#                                                # v0.84): decode attention's candidate
#                                                # tiles at 256 sequences, then an A/B
#                                                # of the fastest in the engine; on the
#                                                # caches in WIDE_CACHES (default int8)
#   KV_S=120 ...                                 # and the KV formats' accuracy on the
#                                                # checkpoint trained on this GPU
#   PIECES_S=200 bash infra/device_engine.sh     # steps in CUDA-graph pieces: their GPU
#                                                # tests (and no Triton compile in the
#                                                # first turns, v0.49), then a step
#                                                # admitting 9 x 40 tokens eager and in
#                                                # pieces (PERF v0.44)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
bash infra/device_stack.sh install-engine || exit 1
. /tmp/tpserve-engine/env.sh
export PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers, triton, xgrammar
print("torch", torch.__version__, "transformers", transformers.__version__,
      "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0))'
if [ "${FP8_S:-0}" != 0 ]; then  # a mode name the suite lacks fails now, not after the rest
  TPSERVE_FP8_MODES="${FP8_MODES:-}" python3 -c "from replicas.bench import fp8_modes
fp8_modes()" || exit 1
fi
# the files' GPU: "_h200" in a results file's name becomes "_h100" on an H100
tag=$(python3 -c 'import torch; n = torch.cuda.get_device_name(0)
print(next((t for t in ("h100", "h200") if t in n.lower()), "gpu"))')
rows() {  # the JSON lines of a step's output, into $out/$1 and replicas/results/$2
  grep '^{' | tee -a "$out/${1/_h200/_$tag}" >> "replicas/results/${2/_h200/_$tag}"
}
bench_rows() {  # SECONDS FUNCTION [ARGS]: replicas.bench.FUNCTION(ARGS)'s rows as JSON
  # lines, each with the machine's environment and the command, in one process cut at
  # SECONDS
  timeout -s KILL "$1" python3 -c "import json
from replicas.bench import environment, $2
where = {**environment(), 'command': 'bench.$2(${3:-})'}
for row in $2(${3:-}):
    print(json.dumps({**row, **where}), flush=True)" 2>&1
}
two_terms_tests() {  # SECONDS: the two-FP8-terms GPU tests (PERF v1.02-v1.06), cut at
  # SECONDS; their tail into $out/two_terms_tests.log
  timeout -s KILL "$1" python3 -m pytest -q -s tests/test_gpu.py \
    -k "two_fp8_terms or two-terms" -p no:cacheprovider 2>&1 | grep -v '^$' | tail -14 |
    tee "$out/two_terms_tests.log"
}
if [ "${STRUCT_S:-0}" != 0 ]; then
  timeout -s KILL "$STRUCT_S" python3 -m pytest -q tests/test_structured.py \
    tests/test_toolcalls.py -k "not tp2 and not overflow" -p no:cacheprovider 2>&1 |
    tail -5 | tee "$out/structured_tests.log"
  timeout -s KILL "$STRUCT_S" python3 -m replicas.bench --suite structured 2>&1 |
    rows structured_h200.jsonl structured_h200.jsonl
  timeout -s KILL "$STRUCT_S" python3 -m replicas.grammar_replay 2>&1 |
    rows grammar_replay_h200.jsonl grammar_replay_h200.jsonl
fi
if [ "${FP8_TEST_S:-0}" != 0 ]; then
  timeout -s KILL "$FP8_TEST_S" python3 -m pytest -q -s tests/test_gpu.py tests/test_kernels.py \
    -k "fp8 or int8 or 8_bits" -p no:cacheprovider 2>&1 | tail -15 | tee "$out/fp8_tests.log"
  # (test_fp8.py's kernel tests run in the CPU interpreter; this one on the GPU too)
  timeout -s KILL "$FP8_TEST_S" python3 -m pytest -q tests/test_fp8.py -k widening \
    -p no:cacheprovider 2>&1 | tail -5 | tee -a "$out/fp8_tests.log"
fi
if [ "${PIECES_S:-0}" != 0 ]; then
  timeout -s KILL "$PIECES_S" python3 -m pytest -q -s tests/test_gpu.py -k "piece or first_turns" \
    -p no:cacheprovider 2>&1 | tee "$out/pieces_tests.log" | tail -8
  for set in "--set piece_graph_tokens=0" "--set piece_graph_tokens=512"; do
    timeout -s KILL "$PIECES_S" python3 -m replicas.multigpu --prefill-host \
      --probe glm4-9b --tp 1 $set 2>&1 | tee -a "$out/prefill_host.log" |
      rows prefill_host_h200.jsonl prefill_host_h200.jsonl
  done
fi
if [ "${W8A16_S:-0}" != 0 ]; then  # the FP8 weight-only batch matmul's configs (~1 min)
  timeout -s KILL "$W8A16_S" python3 -m replicas.bench --suite w8a16 2>&1 |
    rows w8a16_h200.jsonl w8a16_h200.jsonl
fi
if [ "${GEMV_S:-0}" != 0 ]; then  # every GEMV config on GLM-4-9B's shapes (~1 min)
  timeout -s KILL "$GEMV_S" python3 -m replicas.bench --suite gemv 2>&1 |
    rows gemv_h200.jsonl gemv_h200.jsonl
  # (pick_gemv checks every config against cuBLAS as it times it; and PERF v0.59-v0.61's
  # kernels against their references on the GPU)
  if [ "${GEMV_TESTS:-1}" != 0 ]; then  # GEMV_TESTS=0: the probe alone (~3 min less)
    timeout -s KILL "$GEMV_S" python3 -m pytest -q tests/test_kernels.py tests/test_gpu.py \
      -k "gemv or one_pass_equals or probe_variants_equal" -p no:cacheprovider 2>&1 |
      tail -5 | tee "$out/gemv_tests.log"
  fi
fi
if [ "${GEMVAB_S:-0}" != 0 ]; then  # PERF v0.87/v0.89, one process: batch-1 FP8 decode,
  # the engine's GEMVs picked with bench.GEMV_TRIAL_WINNERS and without (~40 s an engine, 4)
  bench_rows "$GEMVAB_S" gemv_trials_ab | rows gemv_trials_ab_h200.jsonl gemv_trials_ab_h200.jsonl
fi
if [ "${KERNELS_S:-0}" != 0 ]; then  # PERF v0.90, one process: batch-1 FP8 decode's
  # kernels under the profiler, the GEMVs' picks as they are
  bench_rows "$KERNELS_S" b1_kernels_ab | rows b1_kernels_h200.jsonl b1_kernels_h200.jsonl
  # and each weight's read floor: its bytes read by a kernel that only reads (PERF v0.91)
  bench_rows "$KERNELS_S" read_floor | rows read_floor_h200.jsonl read_floor_h200.jsonl
fi
if [ "${HEAD_S:-0}" != 0 ]; then  # PERF v0.94, one process: batch-1 FP8 decode with the
  # 16-bit LM head and with the FP8 head rescoring its top 16 (~60 s an engine); then the
  # FP8 head's accuracy in steps of one row, against the 16-bit model and the FP8 one
  bench_rows "$HEAD_S" b1_head_ab | rows b1_head_h200.jsonl b1_head_h200.jsonl
  for head in 0 16; do
    timeout -s KILL "$HEAD_S" python3 -m replicas.accuracy --dtype bfloat16 --chunk 1 \
      --fp8-lm-head $head 2>&1 | rows accuracy_h200.jsonl accuracy_h200.jsonl
  done
fi
if [ "${HEADROWS_S:-0}" != 0 ]; then  # PERF v0.96: the FP8 head's batch kernel at 2-128
  # rows against the 16-bit matmul; then FP8 decode at 4, 16, 32 and 64 sequences with the
  # FP8 head's rows read in steps of one row and of up to 64 (~60 s an engine, 2);
  # then its accuracy so, in the scorer's 64-token steps (parallel.FP8_HEAD_ROWS, 64)
  bench_rows "$HEADROWS_S" lm_head_rows | rows w8a16_h200.jsonl w8a16_h200.jsonl
  bench_rows "$HEADROWS_S" head_rows_ab | rows head_rows_h200.jsonl head_rows_h200.jsonl
  timeout -s KILL "$HEADROWS_S" python3 -m replicas.accuracy --dtype bfloat16 \
    --fp8-lm-head 16 2>&1 | sed 's/"changes": {/"fp8_head_rows": 64, "changes": {/' |
    rows accuracy_h200.jsonl accuracy_h200.jsonl
fi
if [ "${SPLIT_S:-0}" != 0 ]; then  # PERF v0.98: the weight-only FP8 matmul with K in
  # slices at 4-64 rows and at 128 and 256 (against widening for cuBLAS), the kernel alone
  # (~2 min), then FP8 decode at 4, 16, 32, 64 and 128 sequences with the configs before
  # v0.98 and now (v0.98, v1.00; ~60 s an engine, 2)
  bench_rows "$SPLIT_S" w8a16_split_probe | rows w8a16_split_h200.jsonl w8a16_split_h200.jsonl
  bench_rows "$SPLIT_S" w8a16_split_ab | rows w8a16_split_ab_h200.jsonl w8a16_split_ab_h200.jsonl
fi
if [ "${TWO_S:-0}" != 0 ]; then  # PERF v1.02: weight-only FP8 with x in two FP8 terms: the
  # products alone at 32-256 rows (~1 min), their GPU tests (the kernel against PyTorch,
  # graphs; the trained model's top-1 with two terms), then FP8 decode at 64 and 128
  # sequences and weight-only FP8 at 256 requests with them off and from 64 rows
  # (~60-70 s an engine, 4; ~7 min in all)
  bench_rows "$TWO_S" two_terms_probe | rows two_terms_h200.jsonl two_terms_h200.jsonl
  two_terms_tests "$TWO_S"
  bench_rows "$TWO_S" two_terms_ab | rows two_terms_ab_h200.jsonl two_terms_ab_h200.jsonl
fi
if [ "${TWO_AB_S:-0}" != 0 ]; then  # PERF v1.02's threshold: the GPU tests (each product's
  # error printed), then two_terms_ab from TWO_AB_LEAST rows at TWO_AB_BATCHES sequences
  # (~60-70 s an engine, 4)
  two_terms_tests "$TWO_AB_S"
  bench_rows "$TWO_AB_S" two_terms_ab \
    "least=${TWO_AB_LEAST:-96}, batches=(${TWO_AB_BATCHES:-96,128,160},)" |
    rows two_terms_ab_h200.jsonl two_terms_ab_h200.jsonl
fi
if [ "${FUSED_S:-0}" != 0 ]; then  # PERF v1.03: the two terms in one kernel: the probe
  # (v1.02's arms, the fused one, each TWO_TERMS_CONFIGS; ~1.5 min), the GPU tests, then
  # FP8 decode at 96-160 sequences and weight-only FP8 at 256 requests unfused and fused
  # (~60-70 s an engine, 4)
  bench_rows "$FUSED_S" two_terms_probe | rows two_terms_h200.jsonl two_terms_h200.jsonl
  two_terms_tests "$FUSED_S"
  bench_rows "$FUSED_S" two_terms_fused_ab | rows two_terms_ab_h200.jsonl two_terms_ab_h200.jsonl
fi
if [ "${FOLD2_S:-0}" != 0 ]; then  # PERF v1.04: the two terms' products added by the next
  # norm and SwiGLU: the GPU tests (two-terms ones), then FP8 decode at 96-160 sequences
  # and weight-only FP8 at 256 requests with TPSERVE_FP8_TWO_TERMS_FOLD 0 and 1 (~60-70 s
  # an engine, 4)
  two_terms_tests "$FOLD2_S"
  bench_rows "$FOLD2_S" two_terms_fold_ab | rows two_terms_ab_h200.jsonl two_terms_ab_h200.jsonl
fi
if [ "${NEXT2_S:-0}" != 0 ]; then  # PERF v1.04 + v1.06 in one call: the two-terms GPU
  # tests, then FP8 decode at 96-160 sequences and weight-only FP8 at 256 requests in
  # three arms: as now, v1.04 (folds), v1.04 + v1.06 (the norm's terms) (~60-70 s an
  # engine, 6; ~9 min in all)
  # (NEXT2_TEST_S: the tests' own cut; NEXT2_ARGS: the bench's, e.g. "batches=(128,)")
  two_terms_tests "${NEXT2_TEST_S:-$NEXT2_S}"
  bench_rows "$NEXT2_S" two_terms_next_ab "${NEXT2_ARGS:-}" |
    rows two_terms_ab_h200.jsonl two_terms_ab_h200.jsonl
fi
if [ "${NORM2_S:-0}" != 0 ]; then  # PERF v1.06: qkv's and gate_up's two terms made by the
  # norm before them, with v1.04's folds on (set NORM2_FOLD=0 for off): FP8 decode at
  # 96-160 sequences and weight-only FP8 at 256 requests, norm 0 and 1 (~60-70 s an
  # engine, 4; FOLD2_S runs the GPU tests, v1.06's among them)
  TPSERVE_FP8_TWO_TERMS_FOLD=${NORM2_FOLD:-1} bench_rows "$NORM2_S" two_terms_norm_ab |
    rows two_terms_ab_h200.jsonl two_terms_ab_h200.jsonl
fi
if [ "${QUANTW_S:-0}" != 0 ]; then  # PERF v1.05: the row-quantizing kernels' warps: the
  # kernels alone at 64-256 rows (~30 s), then FP8 decode at 128 sequences and weight-only
  # FP8 and W8A8 -keepqkv at 256 requests with the rule's warps and QUANTW (default 16;
  # ~60-70 s an engine, 6; QUANTW='32, batches=(), modes=("fp8-w8a8-keepqkv",)': the
  # arguments of bench.quant_warps_ab, here the 16-bit cache's -keepqkv at 256 requests
  # alone; double quotes inside, as the rows' command field is a single-quoted string)
  # (QUANTW_AB=0: the probe alone, as a short tail to another step's call)
  bench_rows "$QUANTW_S" quant_warps_probe | rows quant_warps_h200.jsonl quant_warps_h200.jsonl
  if [ "${QUANTW_AB:-1}" != 0 ]; then
    bench_rows "$QUANTW_S" quant_warps_ab "warps=${QUANTW:-16}" |
      rows quant_warps_ab_h200.jsonl quant_warps_ab_h200.jsonl
  fi
fi
if [ "${BYK_S:-0}" != 0 ]; then  # PERF v1.01: FP8 decode at 96, 128 and 152 sequences
  # with the narrower weights' configs past 64 rows as in v1.00 and by K (~60 s an engine, 2)
  bench_rows "$BYK_S" w8a16_by_k_ab | rows w8a16_by_k_ab_h200.jsonl w8a16_by_k_ab_h200.jsonl
fi
if [ "${DEQUANT_S:-0}" != 0 ]; then  # PERF v1.00's next: weight-only FP8 at 256 requests
  # with a 256-row step widening its weights for cuBLAS (DEQUANT_ROWS 160) and in the batch
  # kernel (257), two rounds, order reversed (~70 s an engine, 4)
  bench_rows "$DEQUANT_S" dequant_rows_ab | rows dequant_rows_h200.jsonl dequant_rows_h200.jsonl
fi
if [ "${SLICES_S:-0}" != 0 ]; then  # PERF v0.99: W8A8's per-token tiles in slices of K
  # beside cuBLAS at 16-256 rows (--suite w8a8, ~2 min: it times every config), the GPU
  # tests of the sliced products, then the 256-request -keepqkv run with the picks free to
  # take them and not (an engine each, its picks timed again: ~80 s an engine)
  timeout -s KILL "$SLICES_S" python3 -m replicas.bench --suite w8a8 2>&1 |
    rows w8a8_h200.jsonl w8a8_h200.jsonl
  timeout -s KILL "$SLICES_S" python3 -m pytest -q tests/test_gpu.py -k "slices" \
    -p no:cacheprovider 2>&1 | tail -5 | tee "$out/slices_tests.log"
  bench_rows "$SLICES_S" w8a8_slices_ab | rows w8a8_slices_ab_h200.jsonl w8a8_slices_ab_h200.jsonl
fi
if [ "${W8A8_S:-0}" != 0 ]; then  # W8A8 per token at a decode step's rows (~1 min)
  timeout -s KILL "$W8A8_S" python3 -m replicas.bench --suite w8a8 2>&1 |
    rows w8a8_h200.jsonl w8a8_h200.jsonl
  timeout -s KILL "$W8A8_S" python3 -m pytest -q tests/test_gpu.py tests/test_kernels.py \
    -k "w8a8_per_token or cublas_runs" -s -p no:cacheprovider 2>&1 |
    grep -E "mean relative|passed|failed|Error" | tee "$out/w8a8_tests.log"
fi
if [ "${ACC_S:-0}" != 0 ]; then  # W8A8's accuracy, cuBLAS then Triton (~20 s each)
  for fast in ${ACC_FAST_ACCUM:-1}; do  # "0 1": each also without fast accumulation
    for kernels in --no-gemv-kernels ""; do
      for mode in "--keep-16bit qkv_proj" "--keep-16bit qkv_proj --kv-cache-dtype int8" ""; do
        TPSERVE_W8A8_FAST_ACCUM=$fast timeout -s KILL "$ACC_S" python3 -m replicas.accuracy \
          --quantization fp8-w8a8 $mode $kernels 2>&1 | rows accuracy_h200.jsonl accuracy_h200.jsonl
      done
    done
  done
fi
if [ "${ATTN_S:-0}" != 0 ]; then  # decode attention's variants (~80 compiles, then timing)
  TPSERVE_PDL="${ATTN_PDL:-${TPSERVE_PDL:-}}" \
  timeout -s KILL "$ATTN_S" python3 -m replicas.bench --suite attention 2>&1 |
    rows attention_h200.jsonl attention_h200.jsonl
  timeout -s KILL 120 python3 -m pytest -q tests/test_gpu.py tests/test_kernels.py \
    -k "decode_attention" -p no:cacheprovider 2>&1 | tail -3 | tee "$out/attention_tests.log"
fi
if [ "${GAPS_S:-0}" != 0 ]; then  # a process each: PyTorch reads cuBLASLt's workspace once
  for mode in ${GAPS_MODES:-fp8-w8a8 bf16}; do
    timeout -s KILL "$GAPS_S" python3 -c "import json, sys
from replicas.bench import decode_gaps
for row in decode_gaps((sys.argv[1],)):
    print(json.dumps(row), flush=True)" "$mode" 2>&1 | rows decode_gaps_h200.jsonl decode_gaps_h200.jsonl
  done
fi
if [ "${NCU_S:-0}" != 0 ]; then  # hardware counters of a decode step's kernels (v0.82's next;
  # TPSERVE_NCU_GEMV_CONFIG="(4, 2048, 4, 3, 96, 1)": the gemv_ROLE subjects in an engine's pick;
  # NCU_SUBJECTS=w8a16_gate_up: the weight-only batch kernel at 256 rows beside cuBLAS)
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  for subject in ${NCU_SUBJECTS:-attention swiglu_quant gate_up_mm gemv}; do
    regex=$(python3 -c "from replicas.bench import NCU_SUBJECTS; print(NCU_SUBJECTS['$subject'])")
    timeout -s KILL "$NCU_S" "$ncu" --clock-control none --profile-from-start off \
      --kernel-name "regex:$regex" --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section ComputeWorkloadAnalysis --section SchedulerStats --csv --page details \
      python3 -c "from replicas.bench import ncu_subject; ncu_subject('$subject')" \
      > "$out/ncu_$subject.csv" 2> "$out/ncu_err.tmp"
    echo "ncu $subject: rc $?, $(wc -l < "$out/ncu_$subject.csv") lines"
    # (one log for every subject's stderr: a call brings back 8 files, PERF.md v0.96)
    { echo "== $subject"; tail -20 "$out/ncu_err.tmp"; } >> "$out/ncu.err"
    rm -f "$out/ncu_err.tmp"
  done
fi
if [ "${FOLD_S:-0}" != 0 ]; then  # PERF v0.80, one process (the fold is read at each call)
  timeout -s KILL "$FOLD_S" python3 -c "import json
from replicas.bench import w8a8_fold_ab
for row in w8a8_fold_ab():
    print(json.dumps(row), flush=True)" 2>&1 | rows w8a8_fold_ab_h200.jsonl w8a8_fold_ab_h200.jsonl
  timeout -s KILL 200 python3 -m pytest -q tests/test_gpu.py -k "runs_of_k" \
    -p no:cacheprovider 2>&1 | tail -3 | tee "$out/fold_tests.log"
fi
if [ "${WIDE_S:-0}" != 0 ]; then  # (a caches' A/B: ~40 s an engine, 4 engines)
  timeout -s KILL "$WIDE_S" python3 -c "import json, sys
from replicas.bench import environment, wide_tile_search
where = {**environment(), 'command': 'WIDE_CACHES=' + sys.argv[1] + ' bench.wide_tile_search'}
for row in wide_tile_search(caches=sys.argv[1].split(',')):
    print(json.dumps({**row, **where}), flush=True)" "${WIDE_CACHES:-int8}" 2>&1 |
    rows wide_tile_h200.jsonl wide_tile_h200.jsonl
fi
if [ "${KV_S:-0}" != 0 ]; then  # simulated in transformers on the CPU; the engine's check
  # on the GPU; the checkpoint trained here, on the GPU, as the accuracy test's is
  timeout -s KILL "$KV_S" python3 -m replicas.kv_formats 2>&1 |
    rows kv_formats_h200.jsonl kv_formats_h200.jsonl
fi
if [ "${FP8_S:-0}" != 0 ]; then
  TPSERVE_FP8_MODES="${FP8_MODES:-}" \
  timeout -s KILL "$FP8_S" python3 -m replicas.bench --suite fp8 --repeats 1 2>&1 |
    rows fp8_h200.jsonl fp8_h200.jsonl
fi
cat "$out"/*.jsonl 2>/dev/null | cut -c1-400  # the rows, in the call's output too
