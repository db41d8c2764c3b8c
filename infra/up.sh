#!/usr/bin/env bash
# The README's first command: install what is missing (into .venv, infra/install.sh), then
# start the local cluster with that environment's `tpserve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
exec tpserve up "$@"
