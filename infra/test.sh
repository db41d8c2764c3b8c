#!/usr/bin/env bash
# The README's second command: install what the tests need, lint, then run the CPU tests
# (GPU tests are marked `gpu` / `multigpu` and run on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh --test
python3 -m ruff check .
python3 -m pytest -q -m "not gpu and not multigpu" "$@"
