#!/usr/bin/env bash
# Creates target/pyenv, a Python virtual environment with the pinned Dapr Python SDK
# (tests/python/requirements.txt) that the Python SDK interop tests (tests/tests/python_sdk.rs)
# run. Idempotent: when the environment already matches the requirements it returns at once.
# Prints the interpreter path on stdout as its last line; progress goes to stderr.
#
# Needs Python >= 3.11 (the pinned FastAPI/Starlette require it) and PyPI. The interpreter is
# $TESSERA_PYTHON_BASE if set, else `python3` on PATH, else /usr/bin/python3. Getting pip into
# the venv, in order of preference:
#   1. `python3 -m venv` (needs the interpreter's ensurepip; pyenv/python.org builds have it);
#   2. `python3 -m venv --without-pip`, then the interpreter's own pip installs into the venv
#      with `pip --python <venv>` (pip >= 22.3), for builds that have pip but no ensurepip;
#   3. on Debian/Ubuntu as root: `apt-get install python3-venv python3-pip` (Debian splits
#      ensurepip out of python3 into python3-venv), then 1 with /usr/bin/python3.
# Usage: bash scripts/python-env.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/pyenv
req=$root/tests/python/requirements.txt
stamp=$venv/.tessera-requirements
log() { echo "python-env: $*" >&2; }

force=0
[ "${1:-}" = "--force" ] && force=1

mkdir -p "$root/target"
# Two concurrent runs (say scripts/test twice) must not build the same venv at once.
exec 9>"$root/target/.pyenv.lock"
flock 9

pick_python() {
  local c
  for c in "${TESSERA_PYTHON_BASE:-}" python3 /usr/bin/python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
    log "skipping $c: $("$c" --version 2>&1) is older than 3.11"
  done
  return 1
}

if ! base=$(pick_python); then
  log "no Python >= 3.11 found (tried \$TESSERA_PYTHON_BASE, python3, /usr/bin/python3)."
  log "on Debian: apt-get install python3 python3-venv; or set TESSERA_PYTHON_BASE"
  exit 1
fi
base_version=$("$base" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')
want="$(sha256sum "$req" | cut -d' ' -f1) python-$base_version"

if [ "$force" = 0 ] && [ -x "$venv/bin/python" ] && [ -f "$stamp" ] \
   && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import dapr.ext.fastapi, uvicorn' 2>/dev/null; then
  log "up to date ($venv/bin/python, Python $base_version)"
  echo "$venv/bin/python"
  exit 0
fi

log "creating $venv with $base (Python $base_version)"
rm -rf "$venv"
pip_in_venv=()
if "$base" -m venv "$venv" >/dev/null 2>"$root/target/pyenv-venv.err"; then
  pip_in_venv=("$venv/bin/python" -m pip)
else
  log "'$base -m venv' failed ($(tail -1 "$root/target/pyenv-venv.err")); trying without ensurepip"
  rm -rf "$venv"
  if "$base" -m venv --without-pip "$venv" 2>/dev/null \
     && "$base" -m pip --version >/dev/null 2>&1 \
     && "$base" -m pip --python "$venv/bin/python" --version >/dev/null 2>&1; then
    log "using $base's own pip to install into the venv (pip --python)"
    pip_in_venv=("$base" -m pip --python "$venv/bin/python")
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    rm -rf "$venv"
    log "installing Debian's python3-venv and python3-pip"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >&2
    if ! /usr/bin/python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
      log "/usr/bin/python3 is older than 3.11"; exit 1
    fi
    base=/usr/bin/python3
    base_version=$("$base" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')
    want="$(sha256sum "$req" | cut -d' ' -f1) python-$base_version"
    "$base" -m venv "$venv"
    pip_in_venv=("$venv/bin/python" -m pip)
  else
    log "cannot create a venv: $base has neither ensurepip nor pip >= 22.3, and apt-get is not usable."
    log "install python3-venv (Debian) or use a Python build with ensurepip (TESSERA_PYTHON_BASE=...)"
    exit 1
  fi
fi

log "installing tests/python/requirements.txt (dapr, dapr-ext-fastapi, uvicorn and their pinned dependencies)"
"${pip_in_venv[@]}" install --disable-pip-version-check --no-input --quiet --only-binary=:all: -r "$req" >&2
"$venv/bin/python" -c 'import dapr.ext.fastapi, dapr.actor, uvicorn' \
  || { log "the venv was built but 'import dapr.ext.fastapi, uvicorn' fails"; exit 1; }
echo "$want" > "$stamp"
log "ready: $venv/bin/python ($("$venv/bin/python" -c 'import importlib.metadata as m; print("dapr", m.version("dapr"), "dapr-ext-fastapi", m.version("dapr-ext-fastapi"), "uvicorn", m.version("uvicorn"))'))"
echo "$venv/bin/python"
