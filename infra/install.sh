#!/usr/bin/env bash
# Installs what tpserve needs on a fresh Debian-like machine: Python packages (torch
# pinned to its CPU build through infra/constraints.txt) and, with `--test`, what the
# tests need too. Safe to run again: pip and apt skip what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python3 -m pip install -q --disable-pip-version-check -c infra/constraints.txt torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -c infra/constraints.txt -e ".${extras}"
