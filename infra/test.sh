#!/usr/bin/env bash
# The README's second command: install what the tests need (into .venv, infra/install.sh),
# lint, then run the CPU tests in two tiers, both at once (GPU tests are marked `gpu` /
# `multigpu` and run on the device machine):
#   1. the fast tier: everything that starts no Ray (`-m "not stack"`), in 2 pytest-xdist
#      workers at a lower CPU priority (nice): it takes the CPU the other tier leaves;
#   2. the whole-stack tier (marker `stack`), one process: one shared `tpserve up` stack for
#      the tests that use it (tests/stack_tier.py; started before pytest collects), then the
#      tests that start a Ray of their own (`ray up`, Ctrl-C on a foreground stack, a Ray
#      that dies at start), after it is down, so no two Rays start at once.
# The whole-stack tier is the longer one and much of it waits (Ray and Serve starting,
# replicas replaced), so the fast tier fits beside it. The fast tier's output comes as it
# runs, the whole-stack tier's whole after it, each with its exit status and time. Both run
# to their end even when one fails; the exit status is the first failure's (fast tier
# first). Ctrl-C (or a SIGTERM) stops both, the shared stack too. The tests' subprocesses
# (python, ray, tpserve) are .venv's: it comes first on PATH. Extra arguments go to both
# pytest runs (e.g. --durations=30, -k router).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh --test
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
python -m ruff check .
log=$(mktemp "${TMPDIR:-/tmp}/tpserve-stack-tier.XXXXXX")
stack=""
stop() {  # the whole-stack run stops as on Ctrl-C (tests/conftest.py takes SIGTERM so)
  [ -n "$stack" ] && kill -TERM -- "-$stack" 2>/dev/null || true
}
trap stop INT TERM
trap 'rm -f "$log"' EXIT

tier() {  # NAME MARKERS [pytest arguments...]: one pytest run, then its exit status and time
  local name=$1 markers=$2 started=$SECONDS rc=0
  shift 2
  python -m pytest -q -m "($markers) and not gpu and not multigpu" "$@" || rc=$?
  echo "== $name: exit $rc in $((SECONDS - started)) s"
  return "$rc"
}

set -m  # the whole-stack run in a process group of its own, which `stop` signals
tier "whole-stack tier (-m stack)" "stack" --start-shared-stack "$@" </dev/null >"$log" 2>&1 &
stack=$!
set +m
echo "== fast tier (-m \"not stack\"); the whole-stack tier runs meanwhile, its output after"
fast=0
nice -n 10 bash -c "$(declare -f tier); tier 'fast tier (-m \"not stack\")' 'not stack' -n 2 \"\$@\"" \
  _ "$@" || fast=$?
rc=0
wait "$stack" || rc=$?
cat "$log"
status=0
for code in "$fast" "$rc"; do
  if [ "$code" -ne 0 ] && [ "$code" -ne 5 ] && [ "$status" -eq 0 ]; then  # 5: none selected
    status=$code
  fi
done
exit $status
