#!/usr/bin/env bash
# The README's second command: install what the tests need (into .venv, infra/install.sh),
# lint, then run the CPU tests (GPU tests are marked `gpu` / `multigpu` and run on the
# device machine). The tests' subprocesses (python, ray, tpserve) are .venv's: it comes
# first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh --test
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
python -m ruff check .
python -m pytest -q -m "not gpu and not multigpu" "$@"
