#!/usr/bin/env bash
# The README's first command: install what is missing, then start the local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh
exec tpserve up "$@"
