#!/usr/bin/env bash
# Installs what tpserve needs on a fresh Debian-like machine: system packages through
# apt-get (redis-server and nginx for the stack; python3-venv when python3 cannot make a
# virtual environment; with --test also openssh-server and rsync for the `ray up` test,
# chromium and chromium-driver for the dashboard test) and the Python packages into the
# project's own virtual environment, .venv in the repository root (made with the first
# python3 on PATH, 3.11 or newer; Debian's own python3 refuses `pip install` outside one).
# torch is the CPU build, pinned in infra/constraints.txt: pip never picks a CUDA build.
# The Python packages go in with uv (pip brings it into .venv; ~49 s against pip's ~129 s
# on 2 cores), from the sources pip is configured with; where uv cannot be had or fails, pip
# installs them. Safe to run again: only what is missing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
extras=""
packages=(nginx redis-server)
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  packages+=(openssh-server rsync chromium chromium-driver)
fi

say() { echo "tpserve install: $*" >&2; }

if ! command -v python3 >/dev/null; then
  say "no python3 on PATH: install Python 3.11 or newer (Debian: apt-get install python3)"
  exit 1
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "python3 is $(python3 -V 2>&1); tpserve needs 3.11 or newer first on PATH"
  exit 1
fi
# a virtual environment that does not run (its python3 was removed) is made again
if [ -e "$venv" ] && ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  say "$venv does not run; making it again"
  rm -rf "$venv"
fi
# Debian's python3 makes virtual environments only with the python3-venv package
if [ ! -e "$venv" ] && ! python3 -c 'import ensurepip' 2>/dev/null; then
  packages+=(python3-venv)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if ! command -v apt-get >/dev/null || { [ -n "$sudo" ] && ! command -v sudo >/dev/null; }; then
    say "please install ${missing[*]} with your package manager"
    exit 1
  fi
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -e "$venv" ]; then
  echo "making the virtual environment $venv ($(python3 -V 2>&1))"
  if ! python3 -m venv "$venv"; then
    rm -rf "$venv"
    say "\`python3 -m venv $venv\` failed (Debian: apt-get install python3-venv)"
    exit 1
  fi
fi
# pip compiles the .pyc files as it installs; so does uv with --compile-bytecode (in
# parallel). Not compiling would leave it to the first import, and where
# PYTHONDONTWRITEBYTECODE is set (as on the machine this was measured on) every process compiles
# torch, transformers and Ray from source again: CI took 1.5x as long (1029 s, not 686 s).
# The test extra's own packages (litellm, langchain, lm-eval, openai, pandas, scikit-learn,
# selenium...: 12,200 of the 26,850 files) go in uncompiled: a few test processes import a
# few of their modules, and compiling them all took most of the install's time (the test
# install: 134 s and 216 busy core-seconds with them compiled, 86 s and 142 without; importing
# litellm uncompiled costs its one test ~11 s more).
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check
     -c infra/constraints.txt)
installer=""  # uv or pip, chosen at the first install
uv=()         # env's arguments that run uv pip install with pip's sources

# uv reads none of pip's configuration (config files, PIP_* variables), and where packages
# come from is the machine's business: infra/pip_uv.py hands uv what pip would use.
# unsafe-best-match: uv picks the best version across all indexes, as pip does (uv's
# default stops at the first index that has the package)
choose_installer() {
  [ -n "$installer" ] && return 0
  installer=pip
  local command
  # -qq: pip's warnings about the configured sources that do not have uv are noise here
  if [ ! -x "$venv/bin/uv" ] && ! "$venv/bin/python" -m pip install -qq \
        --disable-pip-version-check --no-compile -c infra/constraints.txt uv; then
    say "could not install uv with pip: installing with pip instead (slower)"
  elif ! command=$("$venv/bin/python" infra/pip_uv.py "$venv/bin/uv" pip install -q \
        --python "$venv/bin/python" --index-strategy unsafe-best-match --compile-bytecode \
        -c infra/constraints.txt); then
    say "could not read pip's settings for uv: installing with pip instead (slower)"
  else
    mapfile -t uv <<<"$command"
    installer=uv
  fi
}
install() {  # [--no-compile] PACKAGES...: compiled unless --no-compile
  choose_installer
  local compile=1
  if [ "$1" = --no-compile ]; then
    compile=0
    shift
  fi
  if [ "$installer" = uv ]; then
    local arg command=()
    for arg in "${uv[@]}"; do
      [ "$compile" = 0 ] && [ "$arg" = --compile-bytecode ] || command+=("$arg")
    done
    env "${command[@]}" "$@" && return 0
    say "uv failed to install $*: installing with pip instead (slower)"
    installer=pip
  fi
  if [ "$compile" = 0 ]; then
    "${pip[@]}" --no-compile "$@"
  else
    "${pip[@]}" "$@"
  fi
}

torch_pin=$(grep '^torch==' infra/constraints.txt)
installed_torch='import importlib.metadata as m; print("torch==" + m.version("torch"))'
if [ "$("$venv/bin/python" -c "$installed_torch" 2>/dev/null)" != "$torch_pin" ]; then
  choose_installer
  echo "installing torch (CPU build) into $venv with $installer"
  # the constraint names the CPU build's version (2.13.0+cpu), so a package index that
  # offers only CUDA builds (PyPI, for Linux) makes this fail at once instead of
  # downloading gigabytes of CUDA libraries
  if ! install torch; then
    say "pip found no CPU build of torch ($torch_pin): point" \
        "pip at one (PIP_FIND_LINKS=a directory holding its wheel, or PIP_EXTRA_INDEX_URL=" \
        "the URL of PyTorch's CPU wheel index) and run this again"
    exit 1
  fi
fi
# the install runs again only when what it installed from has changed (or another set of
# extras): tpserve and its dependencies compiled, then the test extra's packages not
product="$venv/.tpserve-installed" tested="$venv/.tpserve-installed-test"
want=$(cat pyproject.toml infra/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$tested" 2>/dev/null)" = "$want" ]; then
  exit 0  # (all of it)
fi
if [ "$(cat "$product" 2>/dev/null)" != "$want" ]; then
  choose_installer
  echo "installing tpserve into $venv with $installer"
  install -e .
  echo "$want" > "$product"
fi
if [ -n "$extras" ]; then
  choose_installer
  echo "installing tpserve's test extra into $venv with $installer (not compiled)"
  install --no-compile -e ".${extras}"
  echo "$want" > "$tested"
fi
