#!/usr/bin/env bash
# The README's second command: install what the tests need (into .venv, infra/install.sh),
# lint, then run the CPU tests in two tiers, both at once (GPU tests are marked `gpu` /
# `multigpu` and run on the device machine):
#   1. the fast tier: everything that starts no Ray (`-m "not stack and not serial"`), in 2
#      pytest-xdist workers at the lowest CPU priority (nice 19): it takes the CPU the other
#      tier leaves;
#   2. the whole-stack tier (markers `stack` and `serial`), one process: first the `serial` tests
#      (several processes that wait on each other: tp=2 ranks, an engine's child; starved
#      to 3-7x their time at nice 19), while the shared `tpserve up` stack comes up for
#      the tests that use it (tests/stack_tier.py; started before pytest collects), then
#      the tests that start a Ray of their own (`ray up`, Ctrl-C on a foreground stack, a
#      Ray that dies at start), after it is down, so no two Rays start at once.
# The whole-stack tier is the longer one and much of it waits (Ray and Serve starting,
# replicas replaced), so the fast tier fits beside it: CI took 233-537 s so, 635-663 s
# with the tiers one after the other (fresh clones, 2 cores, machines of differing
# speed). They ran one after the other for a while because the chaos drill's router
# restart "never recovered" on the saturated cores: the drill read the routers to wait out after the redeploy, and on a
# busy machine Serve had replaced the router by then (fixed in infra/chaos.py). The fast
# tier's output comes as it runs, the whole-stack tier's whole after it; then each one's
# exit status and time. Both run to their end even when one fails; the exit status is
# the first failure's (fast tier first). Ctrl-C (or a SIGTERM) stops both, the shared
# stack too. The tests' subprocesses (python, ray, tpserve) are .venv's: it comes first on
# PATH. Extra arguments go to both pytest runs (e.g. --durations=30, -k router).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh --test
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
python -m ruff check .
log=$(mktemp "${TMPDIR:-/tmp}/tpserve-stack-tier.XXXXXX")
# tests/stack_tier.py lists the HOME of each shared stack it starts here: a stack whose
# pytest died without its clean-up (a crash, a kill) is stopped at the end
stacks=$(mktemp "${TMPDIR:-/tmp}/tpserve-test-stacks.XXXXXX")
export TPSERVE_TEST_STACKS="$stacks"
cleanup() {
  rm -f "$log"
  while read -r home; do
    if [ -f "$home/.tpserve/stack/stack.json" ]; then
      echo "== stopping a shared stack its test run left behind ($home)"
      HOME="$home" python -m infra.cli down --state-dir="$home/.tpserve/stack" || true
    fi
    rm -rf "$home"
  done <"$stacks"
  rm -f "$stacks"
}
trap cleanup EXIT
markers="and not gpu and not multigpu"
echo "== fast tier (-m \"not stack and not serial\"); the whole-stack tier runs meanwhile, its output after"
started=$SECONDS
python -m pytest -q -m "(stack or serial) $markers" --start-shared-stack "$@" </dev/null \
  >"$log" 2>&1 &
stack=$!
# Ray runs its workers at nice 15 (RAY_worker_niceness): the fast tier goes below them
nice -n 19 python -m pytest -q -n 2 -m "not stack and not serial $markers" "$@" </dev/null &
fast=$!
stop() {  # Ctrl-C or SIGTERM: both runs stop as on Ctrl-C (tests/conftest.py), once
  trap '' INT TERM
  kill -TERM "$stack" "$fast" 2>/dev/null || true
}
trap stop INT TERM
declare -A code=() took=()
running=("$stack" "$fast")
while [ "${#running[@]}" -gt 0 ]; do  # each run's exit status and time as it ends
  rc=0 ended=""
  wait -n -p ended "${running[@]}" || rc=$?
  [ -n "${ended:-}" ] || continue  # (a wait cut short by Ctrl-C: the runs are stopping)
  code[$ended]=$rc took[$ended]=$((SECONDS - started))
  running=("${running[@]/$ended}")
  running=(${running[@]})
done
echo "== fast tier: exit ${code[$fast]} in ${took[$fast]} s"
cat "$log"
echo "== whole-stack tier: exit ${code[$stack]} in ${took[$stack]} s"
status=0
for rc in "${code[$fast]}" "${code[$stack]}"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && [ "$status" -eq 0 ]; then  # 5: none selected
    status=$rc
  fi
done
exit $status
