#!/usr/bin/env bash
# Installs what tpserve needs on a fresh Debian-like machine: system packages through
# apt-get (redis-server and nginx for the stack; with --test also openssh-server and rsync
# for the `ray up` test, chromium and chromium-driver for the dashboard test) and the
# Python packages (torch pinned to its CPU build through infra/constraints.txt). Safe to
# run again: only what is missing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
packages=(nginx redis-server)
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  packages+=(openssh-server rsync chromium chromium-driver)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if ! command -v apt-get >/dev/null || { [ -n "$sudo" ] && ! command -v sudo >/dev/null; }; then
    echo "tpserve: please install ${missing[*]} with your package manager" >&2
    exit 1
  fi
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -c infra/constraints.txt torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -c infra/constraints.txt -e ".${extras}"
