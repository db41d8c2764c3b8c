#!/usr/bin/env bash
# The README's second command: install what the tests need (into .venv, infra/install.sh),
# lint, then run the CPU tests in two tiers (GPU tests are marked `gpu` / `multigpu` and run
# on the device machine), both at once, in three pytest runs:
#   1. the fast tier: everything that starts no Ray (`-m "not stack"`), in 2 pytest-xdist
#      workers at a lower CPU priority (nice 10): it takes the CPU the other two leave;
#   2. the whole-stack tier (marker `stack`), in two runs of one process each, side by side:
#      a. the tests on one shared `tpserve up` stack (marker `shared_stack`,
#         tests/stack_tier.py), which starts before pytest collects;
#      b. the tests that start a Ray of their own (`ray up`, Ctrl-C on a foreground stack,
#         a Ray that dies at start). No two Rays start at once (tests/stack_tier.py's lock;
#         the shared stack takes it first).
#   The whole-stack tier mostly waits (Ray and Serve starting, replicas replaced), so the
#   tiers overlap well on 2 cores.
# The fast tier's output comes as it runs; each whole-stack run's output comes whole after
# it, with its exit status. Every run runs to its end even when another fails; the exit
# status is the first failure's (in the order above). Ctrl-C stops them all (the shared
# stack too). The tests' subprocesses (python, ray, tpserve) are .venv's: it comes first on
# PATH. Extra arguments go to every pytest run (e.g. --durations=30, -k router).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh --test
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
python -m ruff check .
logs=$(mktemp -d "${TMPDIR:-/tmp}/tpserve-tiers.XXXXXX")
pids=()
stop() {  # Ctrl-C or a SIGTERM: the whole-stack runs stop as on Ctrl-C (tests/conftest.py)
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
}
trap stop INT TERM
trap 'rm -rf "$logs"' EXIT

run() {  # NAME MARKERS [pytest arguments...]: one pytest run, then its exit status and time
  local name=$1 markers=$2 started=$SECONDS rc=0
  shift 2
  python -m pytest -q -m "($markers) and not gpu and not multigpu" "$@" || rc=$?
  echo "== $name: exit $rc in $((SECONDS - started)) s"
  return "$rc"
}

names=("whole-stack tier, on the shared stack" "whole-stack tier, Rays of their own")
set -m  # each in a process group of its own, which `stop` signals
run "${names[0]}" "stack and shared_stack" --start-shared-stack "$@" </dev/null >"$logs/0" 2>&1 &
pids+=($!)
run "${names[1]}" "stack and not shared_stack" "$@" </dev/null >"$logs/1" 2>&1 &
pids+=($!)
set +m
echo "== fast tier; the whole-stack tier runs meanwhile (its output comes after)"
status=0
nice -n 10 bash -c "$(declare -f run); run 'fast tier' 'not stack' -n 2 \"\$@\"" _ "$@" || status=$?
[ "$status" -eq 5 ] && status=0  # 5: none selected
for i in 0 1; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  echo "== ${names[$i]}:"
  cat "$logs/$i"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && [ "$status" -eq 0 ]; then
    status=$rc
  fi
done
exit $status
